"""Prediction intervals (issue 15): the calibrator against three other bands, on the same forecasts.

    python bench/intervals.py [--model DIR] [--record] [--naive]

The shipped engine forecasts the next price and a 50-step path from every window of each replay;
the replay then runs in time order, as the daemon would: at each tick the forecasts whose truth
has just arrived are scored and learnt, then the new forecasts get their bands. Bands compared,
each a half-width around the same forecast:

* ``calibrator``: streamcast.intervals with its defaults (log-score quantile tracker per horizon,
  scaled by the window's volatility where that gives the lower running interval score);
* ``calibrator, always scaled`` and ``calibrator, unscaled``: the same with the scaling forced
  on and off (ablations);
* ``rolling quantile``: the conformal quantile of the newest 1,000 resolved relative errors at
  that horizon (all symbols pooled);
* ``split conformal``: the conformal quantile of the relative errors resolved in the first 15 %
  of the ticks, fixed afterwards;
* ``random walk``: ``z * sigma * sqrt(h)``, sigma the sd of the window's relative 1-tick changes.

A third replay gives the S&P returns to a quiet (x0.5), a plain and a wild (x2) symbol at once,
and shows each symbol's coverage: what the volatility scaling is for.

Replays: the S&P 500 closes as 3 symbols (the series' daily returns rotated by 0, 1/3 and 2/3 of
their length, so each symbol is the whole series starting at another day) and the synthetic feed
of streamcast.data (8 symbols, 2,000 ticks, seed 1). Coverage is over the newest 10,000 resolved
forecasts at each horizon; widths are in % of the price the forecast was made at. "width / rolling
at equal coverage" scales the rolling quantile's bands by the factor that gives them the
calibrator's coverage on the same forecasts, then divides the widths.

The volatility jump: the S&P returns as 16 symbols (rotations), every return tripled from the
middle of the series on; the 1-step coverage over a sliding window of the last 100 ticks (1,600
forecasts), and the ticks after the jump until it is back within 3 points of nominal for good.

Compute: the engine's predict_next + 50-step rollout at B = 512 against the calibrator's work for
the same 512 forecasts (volatility, bands, scores, and an update with 512 x 50 resolved scores:
the most one batch can bring), timed side by side in this run; medians. And ``wire()``, the
bands as the JSON-ready lists a forecast carries: for 512 paths, with and without ``gc.freeze()``
(TensorFlow's objects make each full collection long), and for 512 rows of which 16 have paths,
as in a daemon batch with the default settings.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import numpy as np  # noqa: E402
from results import Report  # noqa: E402  (bench/results.py)

from streamcast.data import SEQ_LEN, load_series, synthetic_prices  # noqa: E402
from streamcast.intervals import Calibrator, IntervalConfig, level_key, wire  # noqa: E402

SP500 = ROOT.parent / "shared" / "data" / "sp500.csv"
H = 50
LEVELS = (0.8, 0.95)
SHOWN = (1, 10, 50)  # horizons in the tables
LAST = 10_000  # resolved forecasts the coverage is measured on
ROLLING = 1_000
SPLIT = 0.15  # the share of the ticks split conformal calibrates on
JUMP_WINDOW = 100
PATHS_PER_BATCH = 16  # DaemonConfig.paths_per_batch_max's default
B = 512


@dataclass
class Replay:
    """Forecasts made at each tick t of each symbol s, and what they are scored on."""

    name: str
    origin: np.ndarray  # (T, S) the price each forecast was made at
    forecast: np.ndarray  # (T, S, H) next at [..., 0], the path's steps after it
    truth: np.ndarray  # (T, S, H) NaN past the series' end
    error: np.ndarray  # (T, S, H) |truth - forecast| / |origin|, NaN past the series' end
    vol: np.ndarray  # (T, S) the calibrator's window volatility
    sigma: np.ndarray  # (T, S) sd of the window's relative 1-tick changes


def rotated(returns: np.ndarray, symbols: int) -> np.ndarray:
    """(symbols, len) the log returns rotated by k / symbols of their length."""
    shifts = [round(k * len(returns) / symbols) for k in range(symbols)]
    return np.stack([np.roll(returns, -s) for s in shifts])


def prices_of(returns: np.ndarray, start: float = 100.0) -> np.ndarray:
    """(S, len + 1) prices from (S, len) log returns."""
    steps = np.concatenate([np.zeros((len(returns), 1)), np.cumsum(returns, axis=1)], axis=1)
    return start * np.exp(steps)


def forecasts(engine: object, prices: np.ndarray, steps: int, naive: bool) -> np.ndarray:
    """(T, S, steps) forecasts from every window of every symbol (rows of ``prices``)."""
    windows = np.lib.stride_tricks.sliding_window_view(prices, SEQ_LEN, axis=1)[:, :-1]
    flat = windows.transpose(1, 0, 2).reshape(-1, SEQ_LEN)
    if naive:
        out = np.repeat(flat[:, -1:], steps, axis=1)
    else:
        out = np.asarray(engine.predict_next(flat))[:, None]  # type: ignore[attr-defined]
        if steps > 1:
            path = engine.rollout(flat, steps)  # type: ignore[attr-defined]
            out = np.concatenate([out, path[:, 1:]], axis=1)
    return out.reshape(windows.shape[1], windows.shape[0], steps)


def replay(name: str, prices: np.ndarray, engine: object, steps: int, naive: bool) -> Replay:
    windows = np.lib.stride_tricks.sliding_window_view(prices, SEQ_LEN, axis=1)[:, :-1]
    windows = windows.transpose(1, 0, 2)  # (T, S, SEQ_LEN)
    t_count, s_count = windows.shape[:2]
    forecast = forecasts(engine, prices, steps, naive)
    origin = windows[..., -1]
    truth = np.full(forecast.shape, np.nan)
    for h in range(1, steps + 1):
        end = min(t_count, prices.shape[1] - SEQ_LEN - h + 1)
        truth[:end, :, h - 1] = prices[:, SEQ_LEN - 1 + h : SEQ_LEN - 1 + h + end].T
    cal = Calibrator()
    vol = cal.volatility(windows.reshape(-1, SEQ_LEN)).reshape(t_count, s_count)
    changes = np.diff(windows, axis=2) / windows[..., :-1]
    error = np.abs(truth - forecast) / origin[..., None]
    return Replay(name, origin, forecast, truth, error, vol, np.std(changes, axis=2, ddof=1))


# -- the bands: each a relative half-width (T, S, H) per level -------------------------------


def calibrator_bands(rep: Replay, config: IntervalConfig) -> dict[float, np.ndarray]:
    """Run a Calibrator through the replay in time order: learn what resolves, then band."""
    cal = Calibrator(config)
    t_count, _, steps = rep.forecast.shape
    half = {level: np.full(rep.forecast.shape, np.nan) for level in config.levels}
    horizons = np.arange(1, steps + 1)
    for t in range(t_count):
        made = t - horizons  # the forecasts whose truth arrives now
        ok = made >= 0
        h, m = horizons[ok], made[ok]
        fc, truth = rep.forecast[m, :, h - 1], rep.truth[m, :, h - 1]  # (n, S)
        scores = cal.score(fc, truth, rep.origin[m], rep.vol[m])
        cal.update(np.repeat(h, fc.shape[1]), scores.reshape(-1, 2))
        bands = cal.bands(rep.origin[t], rep.forecast[t, :, 0], rep.forecast[t], rep.vol[t])
        for level, band in bands.items():
            assert band.path_lo is not None and band.path_hi is not None
            half[level][t] = (band.path_hi - band.path_lo) / 2 / rep.origin[t][:, None]
    return half


def conformal(scores: np.ndarray, level: float) -> float:
    """The ceil((n + 1) level)-th smallest of the (finite) scores."""
    scores = np.sort(scores[np.isfinite(scores)])
    return float(scores[min(len(scores), math.ceil((len(scores) + 1) * level)) - 1])


def rolling_bands(rep: Replay, horizons: tuple[int, ...]) -> dict[float, np.ndarray]:
    """The conformal quantile of the newest ROLLING resolved errors (all symbols) per horizon."""
    half = {level: np.full(rep.forecast.shape, np.nan) for level in LEVELS}
    t_count, s_count, _ = rep.forecast.shape
    for h in horizons:
        stream = rep.error[:, :, h - 1].reshape(-1)  # in the order they resolve
        for t in range(h, t_count):
            known = (t - h + 1) * s_count  # resolved by tick t: made at t - h or before
            window = stream[max(0, known - ROLLING) : known]
            if np.isfinite(window).sum() >= 50:
                for level in LEVELS:
                    half[level][t, :, h - 1] = conformal(window, level)
    return half


def split_bands(rep: Replay, horizons: tuple[int, ...]) -> dict[float, np.ndarray]:
    """The conformal quantile of the errors resolved in the first 15 % of the ticks (before the
    newest 10,000 of every replay here)."""
    half = {level: np.full(rep.forecast.shape, np.nan) for level in LEVELS}
    first = round(rep.forecast.shape[0] * SPLIT)
    for h in horizons:
        fixed = rep.error[: max(1, first - h + 1), :, h - 1]
        for level in LEVELS:
            half[level][first:, :, h - 1] = conformal(fixed.reshape(-1), level)
    return half


def random_walk_bands(rep: Replay) -> dict[float, np.ndarray]:
    sqrt_h = np.sqrt(np.arange(1, rep.forecast.shape[2] + 1))
    return {
        level: NormalDist().inv_cdf((1 + level) / 2) * rep.sigma[..., None] * sqrt_h
        for level in LEVELS
    }


# -- scoring the bands ------------------------------------------------------------------------


def newest(rep: Replay, h: int) -> np.ndarray:
    """Flat indices into (T, S) of the newest LAST resolved forecasts at horizon h."""
    resolved = np.flatnonzero(np.isfinite(rep.error[:, :, h - 1].reshape(-1)))
    return resolved[-LAST:]


def coverage_and_width(rep: Replay, half: np.ndarray, h: int) -> tuple[float, float, int]:
    idx = newest(rep, h)
    err, hw = rep.error[:, :, h - 1].reshape(-1)[idx], half[:, :, h - 1].reshape(-1)[idx]
    assert np.isfinite(hw).all(), "a band missing among the forecasts measured"
    return float(np.mean(err <= hw)), float(np.mean(2 * hw)), len(idx)


def equal_coverage_ratio(rep: Replay, ours: np.ndarray, other: np.ndarray, h: int) -> float:
    """Our mean width over the other's, once the other's bands are scaled to our coverage."""
    idx = newest(rep, h)
    err = rep.error[:, :, h - 1].reshape(-1)[idx]
    mine, theirs = ours[:, :, h - 1].reshape(-1)[idx], other[:, :, h - 1].reshape(-1)[idx]
    target = np.mean(err <= mine)
    needed = np.sort(err / theirs)
    k = needed[max(0, math.ceil(target * len(needed)) - 1)]
    return float(np.mean(mine) / (k * np.mean(theirs)))


def compare(rep: Replay, out: Report) -> list[tuple[str, bool]]:
    """The table for one replay; returns its targets (text, met)."""
    started = time.perf_counter()
    methods = {
        "calibrator": calibrator_bands(rep, IntervalConfig(horizons=H)),
        "calibrator, always scaled": calibrator_bands(
            rep, IntervalConfig(horizons=H, scaling="volatility")
        ),
        "calibrator, unscaled": calibrator_bands(rep, IntervalConfig(horizons=H, scaling="none")),
        f"rolling quantile ({ROLLING:,})": rolling_bands(rep, SHOWN),
        "split conformal (first 15%)": split_bands(rep, SHOWN),
        "random walk z.sigma.sqrt(h)": random_walk_bands(rep),
    }
    ours, rolling = methods["calibrator"], methods[f"rolling quantile ({ROLLING:,})"]
    out(f"## {rep.name}")
    out(
        f"# {rep.error.shape[1]} symbols x {rep.error.shape[0]} ticks; bands computed in {time.perf_counter() - started:.1f} s"
    )
    out()
    out(
        "| method | level | h | coverage (newest resolved) | n | mean width (% of price) | width / rolling at equal coverage |"
    )
    out("|---|---:|---:|---:|---:|---:|---:|")
    targets = []
    for name, half in methods.items():
        for level in LEVELS:
            for h in SHOWN:
                cov, width, n = coverage_and_width(rep, half[level], h)
                ratio = ""
                if name == "calibrator":
                    r = equal_coverage_ratio(rep, ours[level], rolling[level], h)
                    ratio = f"{r:.2f}x"
                    tolerance = {1: 0.02, 50: 0.04}.get(h)
                    if tolerance is not None:
                        ok = abs(cov - level) <= tolerance
                        targets.append(
                            (
                                f"{rep.name}: |coverage - {level_key(level)}%| <= {tolerance * 100:.0f} pt at h={h}: {cov:.1%}",
                                ok,
                            )
                        )
                    targets.append(
                        (
                            f"{rep.name}: width <= 1.2x rolling quantile's at equal coverage, {level_key(level)}% h={h}: {r:.2f}x",
                            r <= 1.2,
                        )
                    )
                out(
                    f"| {name} | {level_key(level)}% | {h} | {cov:.1%} | {n:,} | {width:.2%} | {ratio} |"
                )
    out()
    return targets


def quiet_and_wild(returns: np.ndarray, engine: object, naive: bool, out: Report) -> None:
    """Coverage per symbol when symbols differ in volatility: what the scaling is for."""
    scaled = rotated(returns, 3) * np.array([[0.5], [1.0], [2.0]])
    name = "S&P 500 returns as a quiet (x0.5), a plain and a wild (x2) symbol"
    rep = replay(name, prices_of(scaled), engine, H, naive)
    methods = {
        "calibrator": calibrator_bands(rep, IntervalConfig(horizons=H)),
        "calibrator, always scaled": calibrator_bands(
            rep, IntervalConfig(horizons=H, scaling="volatility")
        ),
        "calibrator, unscaled": calibrator_bands(rep, IntervalConfig(horizons=H, scaling="none")),
        f"rolling quantile ({ROLLING:,})": rolling_bands(rep, (1, H)),
    }
    out(f"## {name}")
    out("# coverage and mean width per symbol over the newest 10,000 resolved at each horizon")
    out()
    out(
        "| method | level | h | coverage quiet / plain / wild | mean width quiet / plain / wild (% of price) |"
    )
    out("|---|---:|---:|---|---|")
    for method, half in methods.items():
        for level in LEVELS:
            for h in (1, H):
                idx = newest(rep, h)
                err = rep.error[:, :, h - 1].reshape(-1)[idx]
                hw = half[level][:, :, h - 1].reshape(-1)[idx]
                symbol = idx % rep.error.shape[1]
                cov = [np.mean(err[symbol == s] <= hw[symbol == s]) for s in range(3)]
                width = [np.mean(2 * hw[symbol == s]) for s in range(3)]
                out(
                    f"| {method} | {level_key(level)}% | {h} | "
                    f"{' / '.join(f'{c:.1%}' for c in cov)} | {' / '.join(f'{w:.2%}' for w in width)} |"
                )
    out()


# -- the volatility jump ----------------------------------------------------------------------


def jump_recovery(
    rep: Replay, half: np.ndarray, level: float, jump_tick: int
) -> tuple[int | None, float]:
    """(ticks after the jump until the sliding 1-step coverage is within 3 pt of nominal for
    good, None if never; the lowest sliding coverage after the jump)."""
    covered = (rep.error[:, :, 0] <= half[:, :, 0]).mean(axis=1)  # per tick made
    resolved_at = np.arange(len(covered)) + SEQ_LEN  # the price index of each 1-step truth
    ok = np.isfinite(rep.error[:, 0, 0]) & np.isfinite(half[:, 0, 0])
    return sliding_recovery(covered[ok], resolved_at[ok], level, jump_tick)


def sliding_recovery(
    covered: np.ndarray, ticks: np.ndarray, level: float, jump_tick: int
) -> tuple[int | None, float]:
    """:func:`jump_recovery` from ``covered`` (T,), each tick's share of 1-step bands that held
    their truth, and ``ticks`` (T,), the price index each resolved at."""
    sliding = np.convolve(covered, np.ones(JUMP_WINDOW) / JUMP_WINDOW, mode="valid")
    ticks = ticks[JUMP_WINDOW - 1 :]
    after = ticks >= jump_tick
    off = np.abs(sliding[after] - level) > 0.03
    lowest = float(sliding[after].min())
    if not off.any():
        return 0, lowest
    last_off = int(np.flatnonzero(off)[-1])
    if last_off == off.size - 1:
        return None, lowest
    return int(ticks[after][last_off + 1] - jump_tick), lowest


def volatility_jump(
    returns: np.ndarray, engine: object, naive: bool, out: Report
) -> list[tuple[str, bool]]:
    jumped = rotated(returns, 16)
    jump_at = len(returns) // 2
    jumped[:, jump_at:] *= 3.0  # every symbol's returns at once, as a market-wide shock
    prices = prices_of(jumped)
    rep = replay(
        "S&P 500 returns as 16 symbols, tripled from the middle on", prices, engine, 1, naive
    )
    jump_tick = jump_at + 1  # the price index of the first tripled return
    methods = {
        "calibrator": calibrator_bands(rep, IntervalConfig(horizons=1)),
        "calibrator, always scaled": calibrator_bands(
            rep, IntervalConfig(horizons=1, scaling="volatility")
        ),
        "calibrator, unscaled": calibrator_bands(rep, IntervalConfig(horizons=1, scaling="none")),
        f"rolling quantile ({ROLLING:,})": rolling_bands(rep, (1,)),
        "split conformal (first 15%)": split_bands(rep, (1,)),
        "random walk z.sigma.sqrt(h)": random_walk_bands(rep),
    }
    out(f"## Volatility jump: {rep.name}")
    out(
        f"# 1-step coverage over the forecasts of the last {JUMP_WINDOW} ticks ({JUMP_WINDOW * 16:,}), jump at tick {jump_tick} of {prices.shape[1]}"
    )
    out()
    out(
        "| method | level | coverage before the jump | lowest after | ticks to recover (within 3 pt for good) |"
    )
    out("|---|---:|---:|---:|---:|")
    targets = []
    for name, half in methods.items():
        for level in LEVELS:
            before = (
                rep.error[: jump_tick - SEQ_LEN, :, 0] <= half[level][: jump_tick - SEQ_LEN, :, 0]
            )
            start = rep.error.shape[0] // 4  # past every method's warm-up
            ticks, lowest = jump_recovery(rep, half[level], level, jump_tick)
            shown = "never" if ticks is None else str(ticks)
            out(
                f"| {name} | {level_key(level)}% | {before[start:].mean():.1%} | {lowest:.1%} | {shown} |"
            )
            if name == "calibrator":
                met = ticks is not None and ticks <= 300
                targets.append(
                    (
                        f"volatility jump: 1-step {level_key(level)}% coverage within 3 pt within 300 ticks: {shown} ticks",
                        met,
                    )
                )
    out()
    return targets


# -- compute ----------------------------------------------------------------------------------


def median_seconds(fn: Callable[[], object], reps: int) -> float:
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def compute(engine: object, prices: np.ndarray, naive: bool, out: Report) -> list[tuple[str, bool]]:
    """The engine's time for B forecasts against the calibrator's, in the same run."""
    windows = np.ascontiguousarray(prices[:B, :SEQ_LEN])
    cal = Calibrator()
    rng = np.random.default_rng(0)
    cal.update(np.repeat(np.arange(1, H + 1), 100), np.abs(rng.normal(size=H * 100)))  # warm
    if naive:
        engine_s = float("nan")
        nxt, path = windows[:, -1], np.repeat(windows[:, -1:], H, axis=1)
    else:
        nxt = engine.predict_next(windows)  # type: ignore[attr-defined]  # compiles
        path = engine.rollout(windows, H)  # type: ignore[attr-defined]
        engine_s = median_seconds(
            lambda: (engine.predict_next(windows), engine.rollout(windows, H)), 5
        )  # type: ignore[attr-defined]
        next_s = median_seconds(lambda: engine.predict_next(windows), 5)  # type: ignore[attr-defined]
    truth = path * (1 + rng.normal(0, 0.01, path.shape))
    horizons = np.tile(np.arange(1, H + 1), B)
    price = windows[:, -1]

    def calibrate() -> None:
        vol = cal.volatility(windows)
        cal.bands(price, nxt, path, vol)
        cal.update(horizons, cal.score(path, truth, price[:, None], vol[:, None]).reshape(-1, 2))

    def next_only() -> None:
        vol = cal.volatility(windows)
        cal.bands(price, nxt, None, vol)
        cal.update(np.ones(B), cal.score(nxt, truth[:, 0], price, vol))

    bands = cal.bands(price, nxt, path, cal.volatility(windows))
    few_paths = path.copy()
    few_paths[PATHS_PER_BATCH:] = np.nan  # the daemon's default: at most 16 paths a batch
    daemon_like = cal.bands(price, nxt, few_paths, cal.volatility(windows))
    ours = median_seconds(calibrate, 21)
    ours_next = median_seconds(next_only, 21)
    wire_s = median_seconds(lambda: wire(bands), 21)
    wire_daemon_s = median_seconds(lambda: wire(daemon_like), 21)
    # with TensorFlow loaded the process tracks ~10^5 objects: the ~51,000 lists of 512 path
    # bands set off full collections of all of them; frozen, they are not scanned again
    gc.freeze()
    wire_frozen_s = median_seconds(lambda: wire(bands), 21)
    gc.unfreeze()
    ratio = ours / engine_s
    out(f"## Compute at B = {B}")
    out()
    out("| work | ms |")
    out("|---|---:|")
    out(f"| engine: predict_next + 50-step rollout | {engine_s * 1e3:.1f} |")
    if not naive:
        out(f"| engine: predict_next alone | {next_s * 1e3:.1f} |")
    out(
        f"| calibrator: volatility + bands (next and 50-step paths) + scores + update of {B * H:,} | {ours * 1e3:.2f} |"
    )
    out(f"| calibrator: the same for next alone (update of {B}) | {ours_next * 1e3:.2f} |")
    out(f"| wire(): the bands as JSON-ready lists, {B} rows with paths | {wire_s * 1e3:.2f} |")
    out(
        f"| wire(): the same after gc.freeze() ({len(gc.get_objects()):,} objects tracked) | {wire_frozen_s * 1e3:.2f} |"
    )
    out(f"| wire(): {B} rows, {PATHS_PER_BATCH} of them with paths | {wire_daemon_s * 1e3:.2f} |")
    out()
    if not naive:
        out(
            f"calibrator / engine with paths: {ratio:.2%}; next alone: {ours_next / next_s:.2%}; with wire(): {(ours + wire_s) / engine_s:.2%}"
        )
    return [(f"extra compute <= 10% of the engine's at B={B}: {ratio:.2%}", bool(ratio <= 0.10))]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, help="model directory (default: the shipped model)")
    parser.add_argument(
        "--naive",
        action="store_true",
        help="forecast 'no change' instead of the model (a quick check of the script; no targets)",
    )
    parser.add_argument("--record", action="store_true", help="write docs/results/intervals.md")
    args = parser.parse_args()
    out = Report("intervals")
    engine: object = None
    version = "naive (no change)"
    if not args.naive:
        from streamcast import Forecaster
        from streamcast.model import DEFAULT_MODEL_DIR

        engine = Forecaster.load(args.model or DEFAULT_MODEL_DIR)
        version = engine.version  # type: ignore[attr-defined]
    config = IntervalConfig()
    out(f"# bench/intervals.py: model {version}, {os.cpu_count()} CPUs")
    out(
        f"# calibrator defaults: levels {', '.join(level_key(v) for v in config.levels)}%, learning rate {config.learning_rate}, batch cap {config.batch_cap}, warm-up {config.warmup_scores} scores, volatility half-life {config.volatility_halflife_ticks:g} ticks"
    )
    out()
    returns = np.diff(np.log(load_series(SP500)))
    started = time.perf_counter()
    sp = replay(
        "S&P 500 closes as 3 symbols (returns rotated)",
        prices_of(rotated(returns, 3)),
        engine,
        H,
        args.naive,
    )
    synthetic = replay(
        "synthetic feed (streamcast.data, 8 symbols, seed 1)",
        synthetic_prices(8, 2000, seed=1),
        engine,
        H,
        args.naive,
    )
    out(f"# engine forecasts for both replays in {time.perf_counter() - started:.0f} s")
    out()
    targets = compare(sp, out) + compare(synthetic, out)
    quiet_and_wild(returns, engine, args.naive, out)
    targets += volatility_jump(returns, engine, args.naive, out)
    targets += compute(engine, synthetic_prices(B, SEQ_LEN, seed=2), args.naive, out)
    out()
    out("## Targets")
    for text, met in targets:
        out(f"- {text}: {'met' if met else 'NOT met'}")
    if engine is not None:
        engine.close()  # type: ignore[attr-defined]
    out.save(args.record and not args.naive)


if __name__ == "__main__":
    main()
