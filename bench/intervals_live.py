"""Prediction intervals through a running daemon (issue 15): the bands `streamcast serve` published,
scored against the prices that followed.

    python bench/intervals_live.py [--rate 1000] [--sp-symbols 24] [--synthetic-symbols 32] [--record]

bench/intervals.py runs the calibrator over the replays in-process; this runs the product: one
private redis-server, a `streamcast serve` process with the shipped model per replay, the replay
offered at --rate ticks/s (paced in 10 ms slices, bench/daemon.py's producer), drained, and every
published forecast and path read back from Redis. A forecast's ``next`` band is scored against
the symbol's next tick, a path's step ``h`` against the tick ``h`` after its origin. Coverage and
mean width (% of the price the forecast was made at) over the newest 10,000 resolved at each
horizon (all of them where fewer resolved), at every level.

Paths are computed as often as the path lane can (``STREAMCAST_PATH_REFRESH_S=0``,
``STREAMCAST_PATH_SHARE=1``) so that the 50-step bands resolve by the thousand; everything else
is the daemon's defaults, including its calibration (stored per partition, learnt from every
resolved forecast as ticks arrive).

The volatility jump, as in bench/intervals.py: the S&P returns as 16 symbols, every return
tripled from the middle on, offered with the daemon's default path settings; the 1-step coverage
over a sliding window of the last 100 ticks, and the ticks after the jump until it is back within
3 points of nominal for good.

Replays, as in bench/intervals.py but with more symbols, so that 10,000 paths resolve: the S&P
500 closes as 24 symbols (daily returns rotated by k/24 of the series) and the synthetic feed of
streamcast.data (32 symbols, 2,000 ticks, seed 1). Each symbol's first 50 prices are its history
(seeded, so the first tick has a full window); the rest is offered.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import daemon as bench  # noqa: E402  (bench/daemon.py: redis-server, serve, load, collection)
import numpy as np  # noqa: E402
from intervals import (  # noqa: E402  (bench/intervals.py's replays)
    JUMP_WINDOW,
    SP500,
    prices_of,
    rotated,
    sliding_recovery,
)
from results import Report  # noqa: E402  (bench/results.py)

from streamcast.connect import make_redis  # noqa: E402
from streamcast.data import load_series, synthetic_prices  # noqa: E402
from streamcast.keys import Keys  # noqa: E402

HORIZONS = (1, 10, 50)
NEWEST = 10_000
TARGET_PT = {1: 2.0, 50: 4.0}  # |coverage - nominal| at these horizons, in points
HISTORY = 50


async def read_back(redis, keys: Keys, names: list[str]) -> dict[str, dict]:
    """Per symbol: its ticks' prices in order, and the bands published for each (by tick index):
    ``next`` {level: (lo, hi)} and ``path`` {level: [(lo, hi), ...]}."""
    out = {}
    for name in names:
        prices, index, nxt = [], {}, {}
        async for eid, fields in bench.entries_of(redis, keys.forecasts(name)):
            index[eid.decode()] = len(prices)
            prices.append(float(fields[b"price"]))
            if b"bands" in fields:
                nxt[len(prices) - 1] = {
                    level: band["next"]
                    for level, band in json.loads(fields[b"bands"]).items()
                    if "next" in band
                }
        paths = {}
        async for eid, fields in bench.entries_of(redis, keys.paths(name)):
            origin = index.get(eid.decode())
            if origin is not None and b"bands" in fields:
                paths[origin] = {
                    level: band["path"]
                    for level, band in json.loads(fields[b"bands"]).items()
                    if "path" in band
                }
        out[name] = {"prices": np.array(prices), "next": nxt, "path": paths}
    return out


def resolved(book: dict[str, dict], level: str, h: int) -> tuple[np.ndarray, np.ndarray]:
    """(covered, relative width) of every band at horizon ``h`` whose truth arrived, in the
    order they resolved (by the truth's tick index, symbols interleaved)."""
    rows = []
    for symbol in book.values():
        prices = symbol["prices"]
        made = (
            {i: b[level] for i, b in symbol["next"].items() if level in b}
            if h == 1
            else {
                i: b[level][h - 1] for i, b in symbol["path"].items() if len(b.get(level, ())) >= h
            }
        )
        if h == 1:  # a path's first step is a next band too: count both
            made_paths = {
                i: b[level][0] for i, b in symbol["path"].items() if len(b.get(level, ())) >= 1
            }
            items = [*made.items(), *made_paths.items()]
        else:
            items = list(made.items())
        for i, (lo, hi) in items:
            if i + h < len(prices):
                truth = prices[i + h]
                rows.append((i + h, lo <= truth <= hi, (hi - lo) / abs(prices[i])))
    rows.sort(key=lambda r: r[0])
    covered = np.array([r[1] for r in rows], dtype=bool)
    width = np.array([r[2] for r in rows], dtype=float)
    return covered, width


def next_covered(book: dict[str, dict], level: str) -> tuple[np.ndarray, np.ndarray]:
    """(T,) each tick's share of the symbols' 1-step bands that held their truth, and (T,) the
    price index each resolved at (the truth of tick i's forecast is price HISTORY + i + 1)."""
    length = min(len(s["prices"]) for s in book.values())
    held = np.full((length - 1, len(book)), np.nan)
    for k, symbol in enumerate(book.values()):
        prices = symbol["prices"]
        for i, band in symbol["next"].items():
            if i + 1 < length and level in band:
                lo, hi = band[level]
                held[i, k] = lo <= prices[i + 1] <= hi
    made = ~np.isnan(held).all(axis=1)
    ticks = HISTORY + np.arange(length - 1) + 1
    return np.nanmean(held[made], axis=1), ticks[made]


def jump_report(name: str, run: dict, jump_tick: int, out: Report) -> list[tuple[str, bool]]:
    out(f"## {name}")
    out(
        f"# {run['sent']} ticks offered, {run['done']} forecast; 1-step coverage over the "
        f"forecasts of the last {JUMP_WINDOW} ticks, jump at tick {jump_tick}; default paths"
    )
    out()
    out(
        "| level | coverage before the jump | lowest after | ticks to recover (within 3 pt for good) |"
    )
    out("|---:|---:|---:|---:|")
    targets = []
    for level in ("80", "95"):
        covered, ticks = next_covered(run["book"], level)
        nominal = float(level) / 100
        before = covered[(ticks >= ticks[0] + len(ticks) // 4) & (ticks < jump_tick)].mean()
        recovered, lowest = sliding_recovery(covered, ticks, nominal, jump_tick)
        shown = "never" if recovered is None else str(recovered)
        out(f"| {level}% | {before:.1%} | {lowest:.1%} | {shown} |")
        targets.append(
            (
                f"volatility jump, through the daemon: 1-step {level}% coverage within 3 pt "
                f"within 300 ticks: {shown} ticks",
                recovered is not None and recovered <= 300,
            )
        )
    out()
    return targets


async def run_replay(
    redis, url, tmp, prefix, prices: np.ndarray, rate: float, env: list[str]
) -> dict:
    names = [f"{prefix.upper()}{k}" for k in range(len(prices))]
    args = argparse.Namespace(
        rate=rate,
        seconds=(prices.shape[1] - HISTORY) * len(names) / rate,
        drain_timeout=120.0,
        env=env,
        retrain=False,
        capacity_ticks=0,
    )
    started = time.perf_counter()
    run = await bench.run_daemon(redis, url, tmp, prefix, names, prices, args, [])
    book = await read_back(redis, Keys(prefix), names)
    run["book"], run["wall_s"] = book, time.perf_counter() - started
    return run


def report(name: str, run: dict, out: Report) -> list[tuple[str, bool]]:
    book = run["book"]
    paths = sum(len(s["path"]) for s in book.values())
    out(f"## {name}")
    out(
        f"# {run['sent']} ticks offered, {run['done']} forecast, {paths} paths published; "
        f"{run['wall_s']:.0f} s with the daemon's start"
    )
    out()
    out("| level | h | coverage (newest resolved) | n | mean width (% of price) |")
    out("|---:|---:|---:|---:|---:|")
    targets = []
    for level in ("80", "95"):
        for h in HORIZONS:
            covered, width = resolved(book, level, h)
            covered, width = covered[-NEWEST:], width[-NEWEST:]
            coverage = 100 * covered.mean() if len(covered) else float("nan")
            out(
                f"| {level}% | {h} | {coverage:.1f}% | {len(covered):,} | "
                f"{100 * width.mean() if len(width) else float('nan'):.2f}% |"
            )
            if h in TARGET_PT:
                off = abs(coverage - float(level))
                targets.append(
                    (
                        f"{name}, through the daemon: |coverage - {level}%| <= "
                        f"{TARGET_PT[h]:g} pt at h={h}: {coverage:.1f}% (n = {len(covered):,})",
                        bool(off <= TARGET_PT[h]),
                    )
                )
    out()
    return targets


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rate", type=float, default=1000.0, help="ticks/s offered")
    parser.add_argument("--sp-symbols", type=int, default=24, help="S&P rotations")
    parser.add_argument("--synthetic-symbols", type=int, default=32, help="synthetic symbols")
    parser.add_argument(
        "--record", action="store_true", help="write docs/results/intervals-live.md"
    )
    args = parser.parse_args()
    out = Report("intervals-live")
    out(
        f"# bench/intervals_live.py: `streamcast serve`, {os.cpu_count()} CPUs, {args.rate:g} ticks/s"
    )
    out("# paths as often as the lane can: STREAMCAST_PATH_REFRESH_S=0, STREAMCAST_PATH_SHARE=1")
    out()
    returns = np.diff(np.log(load_series(SP500)))
    replays = {
        f"S&P 500 closes as {args.sp_symbols} symbols (returns rotated)": (
            "spx",
            prices_of(rotated(returns, args.sp_symbols)),
        ),
        f"synthetic feed (streamcast.data, {args.synthetic_symbols} symbols, seed 1)": (
            "syn",
            synthetic_prices(args.synthetic_symbols, 2000, seed=1),
        ),
    }
    jumped = rotated(returns, 16)
    jump_at = len(returns) // 2
    jumped[:, jump_at:] *= 3.0  # every symbol's returns at once, as a market-wide shock
    many_paths = ["STREAMCAST_PATH_REFRESH_S=0", "STREAMCAST_PATH_SHARE=1"]
    targets = []
    with tempfile.TemporaryDirectory() as tmp:
        server, url = bench.start_redis(tmp)
        redis = make_redis(url, timeout_s=30.0)
        try:
            for name, (prefix, prices) in replays.items():
                run = await run_replay(redis, url, tmp, prefix, prices, args.rate, many_paths)
                targets += report(name, run, out)
            run = await run_replay(redis, url, tmp, "jump", prices_of(jumped), args.rate, [])
            targets += jump_report(
                "S&P 500 returns as 16 symbols, tripled from the middle on", run, jump_at + 1, out
            )
        finally:
            await redis.aclose()
            server.terminate()
            server.wait(10)
    out("## Targets")
    for text, met in targets:
        out(f"- {text}: {'met' if met else 'NOT met'}")
    out.save(args.record)


if __name__ == "__main__":
    asyncio.run(main())
