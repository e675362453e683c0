"""Prediction intervals for every forecast: online conformal calibration, per horizon.

A forecast ``y_hat`` made at price ``p`` for ``h`` ticks ahead gets, at each coverage level, the
band ``y_hat +/- q[h, level] * v * |p|``, where ``v`` is the symbol's recent volatility (below)
and ``q`` is tracked online from resolved forecasts' scale-free scores
``s = |y - y_hat| / (|p| * v)``: the error relative to the price the forecast was made at, as
:func:`streamcast.scoring.relative_errors`, divided by the volatility at that time.

**Method: a quantile tracker on the log of the score** (the "P" part of Angelopoulos, Candès and
Tibshirani, "Conformal PID control", 2023). Each resolved score moves its horizon's quantile::

    log q <- log q + lr * (1{s > q} - (1 - level))

A miss raises the band by ``lr * level``, a hit lowers it by ``lr * (1 - level)``; the steps cancel
exactly when a share ``1 - level`` of the scores miss. As the paper proves for any sequence of
scores, shifted or not, the long-run miss rate is ``1 - level`` up to ``|log q_T - log q_0| /
(lr * T)`` after ``T`` scores: no i.i.d. assumption, so coverage holds when volatility changes. Chosen over ACI
(Gibbs and Candès 2021), which adapts the level fed to a quantile of stored scores: the tracker
keeps one number per horizon and level (no score windows to sort, store or persist), it is
vectorised over a batch in a few numpy calls, and in log space one learning rate fits every
horizon and level (the step is a fraction of the band). The PID paper's integral term and
scorecaster are left out: the volatility scaling already follows the changes they would chase.

**Volatility scaling** (``scaling``): ``v`` is an exponentially weighted mean of the
absolute relative 1-tick changes in the forecast's own input window (:func:`window_volatility`,
half-life ``volatility_halflife_ticks``). The score is then close to stationary when a symbol's
volatility moves, and a quiet and a wild symbol get bands in proportion. It is computed from the
window the engine forecasts from, which the daemon always holds (rebuilt from history after a
restart): there is no per-symbol state to persist, and no cold start for a new symbol.

Scaling is not free: where the errors ahead do not follow the recent volatility (a model's bias
over 50 steps, symbols that share one volatility), dividing by a noisy ``v`` fattens the score's
tail and widens the band (synthetic feed, 95 %, h=50: 1.26x a rolling quantile's width). So
both scores are tracked, the scaled ``s`` and the unscaled ``s * v``, each with its own quantile,
and with ``scaling="auto"`` (the default) each horizon and level is banded by the one whose recent
interval (Winkler) score, ``2 w + (2 / alpha) * max(0, |e| - w)`` in units of the price, is lower:
both are calibrated, so the lower score is the narrower band at the same coverage.
``"volatility"`` and ``"none"`` force one.

**Warm-up**: until a horizon has ``warmup_scores`` resolved scores its band is a random walk's,
widened: ``warmup_inflation * z * sigma * sqrt(h)`` with ``sigma = v * sqrt(pi / 2)`` (``v`` is a
mean absolute change; for a normal one the sd is that much larger) and ``z`` the normal quantile
of the level. Then the tracker starts from the split-conformal quantile of those scores (the
``ceil((n + 1) * level)``-th smallest).

**Delay**: a score at horizon ``h`` is compared with the quantile in force when it resolves, not
the one its band was made with, ``h`` ticks earlier; and the errors of the ``h`` forecasts made in
a row overlap (they share most of their future), so misses at long horizons come in runs. A
tracker stepping at full rate on such runs overshoots and swings: the step at horizon ``h`` is
``learning_rate / h`` (on the S&P closes forecast by "no change", the 50-step coverage at the
80 % level went from 75 % with a step of ``learning_rate`` to 80 %). Where not every tick's
forecast reaches ``h`` (the daemon refreshes a symbol's path now and then) fewer overlap, and a
step of ``lr / h`` would leave the band where it started: the divisor is ``h`` times the share of
horizon 1's resolved count that horizon ``h`` has (:meth:`Calibrator.overlap`), at least 1.

**Batches**: a batch's scores at one horizon step together. A batch of more than ``batch_cap``
scores at one horizon takes the step of ``batch_cap`` scores with the batch's miss rate: hundreds
of symbols resolving at once (and moving together, as a market does) move a band a bounded step.

Use, per batch (the daemon; ``streamcast evaluate`` and ``bench/intervals.py`` do the same)::

    vol = calibrator.volatility(windows)  # (B,): keep each row's with its forecast
    bands = calibrator.bands(windows[:, -1], next_values, paths, vol)
    rows = wire(bands)  # per row: the forecast's "intervals" JSON, or None
    # later, as truths arrive (forecast, price and vol as they were when it was made):
    calibrator.update(horizons, calibrator.score(forecast, truth, price, vol))
    state = json.dumps(calibrator.to_dict())  # and Calibrator.from_dict(json.loads(state))

Everything here is numpy and the standard library.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from statistics import NormalDist
from typing import Any, NamedTuple

import numpy as np

FORMAT = 2  # of to_dict(); 2: the unscaled tracker and the interval scores
SCALINGS = ("auto", "volatility", "none")
SCORE_MEMORY = 500  # resolved scores the running interval score mostly remembers
Q_MIN, Q_MAX = 1e-6, 1e6  # the tracked quantile's range (normalised units): log q stays finite
VOL_MIN = 1e-9  # a volatility floor: a window of equal prices still gives a finite score


@dataclass(frozen=True)
class IntervalConfig:
    """How bands are calibrated; every default declared here once."""

    horizons: int = 50  # steps of a path: horizon 1 is ``next`` and a path's first step
    levels: tuple[float, ...] = (0.8, 0.95)  # coverage levels
    learning_rate: float = 0.05  # change of log q per resolved score at horizon 1 (/ h at h)
    batch_cap: int = 20  # the most scores one update's step counts per horizon
    warmup_scores: int = 50  # resolved scores a horizon needs before its tracked band
    warmup_inflation: float = 1.5  # the warm-up random-walk band is this much wider
    volatility_halflife_ticks: float = 20.0  # of the window's volatility
    scaling: str = "auto"  # bands scaled by the window's volatility: auto (per horizon), or not

    def __post_init__(self) -> None:
        checks = {
            "horizons must be >= 1": self.horizons >= 1,
            "levels must be between 0 and 1, each once": len(self.levels) > 0
            and len(set(self.levels)) == len(self.levels)
            and all(0.0 < level < 1.0 for level in self.levels),
            "learning_rate must be > 0": self.learning_rate > 0,
            "batch_cap must be >= 1": self.batch_cap >= 1,
            "warmup_scores must be >= 1": self.warmup_scores >= 1,
            "warmup_inflation must be > 0": self.warmup_inflation > 0,
            "volatility_halflife_ticks must be > 0": self.volatility_halflife_ticks > 0,
            f"scaling must be one of {', '.join(SCALINGS)}": self.scaling in SCALINGS,
        }
        failed = [text for text, ok in checks.items() if not ok]
        if failed:
            raise ValueError(f"interval config: {'; '.join(failed)}")


class Band(NamedTuple):
    """One level's band for a batch: NaN where a row has no band (a non-finite input)."""

    next_lo: np.ndarray  # (B,)
    next_hi: np.ndarray  # (B,)
    path_lo: np.ndarray | None  # (B, steps); None when the batch had no paths
    path_hi: np.ndarray | None


Bands = dict[float, Band]


def level_key(level: float) -> str:
    """A level as the wire names it: 0.8 -> "80", 0.95 -> "95", 0.995 -> "99.5"."""
    return format(round(level * 100, 6), "g")


def price_scale(prices: np.ndarray) -> np.ndarray:
    """|p|, or 1 where p is 0: :func:`streamcast.scoring.relative_errors`' divisor."""
    return np.abs(prices) + (prices == 0)


def window_volatility(windows: np.ndarray, halflife_ticks: float = 20.0) -> np.ndarray:
    """Recent volatility (B,) of price windows (B, L): the exponentially weighted mean of
    ``|p[t] / p[t-1] - 1|`` (the newest change weighs most), at least ``VOL_MIN``; NaN for a
    window with a non-finite price or fewer than two."""
    windows = np.asarray(windows, dtype=np.float64)
    if windows.ndim != 2:
        raise ValueError(f"windows must be (B, L), got shape {windows.shape}")
    if windows.shape[1] < 2:
        return np.full(len(windows), np.nan)
    with np.errstate(invalid="ignore", over="ignore"):
        changes = np.abs(np.diff(windows, axis=1)) / price_scale(windows[:, :-1])
    weights = 0.5 ** (np.arange(changes.shape[1])[::-1] / halflife_ticks)
    vol = changes @ (weights / weights.sum())
    return np.where(np.isfinite(vol), np.maximum(vol, VOL_MIN), np.nan)


@dataclass(eq=False)
class Calibrator:
    """Tracked quantiles of the scale-free score, per horizon and level, for one model version.

    ``bands`` gives a batch its bands; ``update`` feeds resolved forecasts' ``score``s back;
    ``to_dict``/``from_dict`` persist the state (JSON-safe), tagged with ``model_version``.
    """

    config: IntervalConfig = field(default_factory=IntervalConfig)
    model_version: str = ""
    log_q: np.ndarray = field(init=False)  # (H, L) log of the tracked quantiles of s
    log_q_raw: np.ndarray = field(init=False)  # (H, L) the same of the unscaled s * v
    seen: np.ndarray = field(init=False)  # (H,) resolved scores per horizon
    interval_score: np.ndarray = field(init=False)  # (2, H, L) running: scaled, unscaled
    _warmup: np.ndarray = field(init=False, repr=False)  # (2, H, warmup_scores), NaN-filled

    def __post_init__(self) -> None:
        c = self.config
        self.log_q = np.zeros((c.horizons, len(c.levels)))
        self.log_q_raw = np.zeros_like(self.log_q)
        self.seen = np.zeros(c.horizons, dtype=np.int64)
        self.interval_score = np.zeros((2, c.horizons, len(c.levels)))
        self._warmup = np.full((2, c.horizons, c.warmup_scores), np.nan)
        z = np.array([NormalDist().inv_cdf((1 + level) / 2) for level in c.levels])
        sqrt_h = np.sqrt(np.arange(1, c.horizons + 1))[:, None]
        # the warm-up band in normalised units: sd = mean |change| * sqrt(pi / 2)
        self._warm_q = c.warmup_inflation * math.sqrt(math.pi / 2) * sqrt_h * z[None, :]

    @property
    def levels(self) -> tuple[float, ...]:
        return self.config.levels

    def volatility(self, windows: np.ndarray) -> np.ndarray:
        """:func:`window_volatility` of the engine's input windows, with this half-life."""
        return window_volatility(windows, self.config.volatility_halflife_ticks)

    def warm(self) -> np.ndarray:
        """(H,) whether each horizon's band is its tracked quantile (past the warm-up)."""
        return self.seen >= self.config.warmup_scores

    def scaled(self) -> np.ndarray:
        """(H, L) whether each horizon and level is banded by the volatility-scaled score."""
        if self.config.scaling != "auto":
            return np.full(self.log_q.shape, self.config.scaling == "volatility")
        return self.interval_score[0] <= self.interval_score[1]

    def quantiles(self) -> np.ndarray:
        """(H, L) the half-widths in use, in units of ``|p| * v`` where :meth:`scaled` (else
        ``|p|``), the warm-up band's where a horizon is not warm yet (in units of ``|p| * v``)."""
        tracked = np.where(self.scaled(), self.log_q, self.log_q_raw)
        return np.where(self.warm()[:, None], np.exp(tracked), self._warm_q)

    # -- bands -------------------------------------------------------------------------------

    def bands(
        self,
        prices: np.ndarray,
        next_values: np.ndarray,
        paths: np.ndarray | None = None,
        vol: np.ndarray | None = None,
    ) -> Bands:
        """Each level's band for a batch of forecasts.

        Args:
            prices: (B,) the price each forecast was made at (its window's last).
            next_values: (B,) the 1-step forecasts.
            paths: (B, steps) forecast paths, steps <= horizons; a row of NaN has no path.
            vol: (B,) :meth:`volatility` of the rows' windows; None (or a NaN) means unknown,
                and a row with an unknown volatility gets no band.
        """
        prices = np.asarray(prices, dtype=np.float64).reshape(-1)
        n = len(prices)
        vol = np.full(n, np.nan) if vol is None else np.asarray(vol, dtype=np.float64)
        nxt = np.asarray(next_values, dtype=np.float64).reshape(-1)
        if nxt.shape != (n,) or vol.shape != (n,):
            raise ValueError(f"prices, next_values and vol must all be ({n},)")
        steps = 1 if paths is None else np.shape(paths)[1]
        if paths is not None and (np.shape(paths)[0] != n or steps > self.config.horizons):
            raise ValueError(f"paths must be ({n}, <= {self.config.horizons})")
        half = self._half_widths(prices, vol, max(steps, 1))  # (L, B, steps)
        out: Bands = {}
        for i, level in enumerate(self.levels):
            next_lo, next_hi = _band(nxt, half[i, :, 0])
            path_lo = path_hi = None
            if paths is not None:
                path_lo, path_hi = _band(np.asarray(paths, dtype=np.float64), half[i])
            out[level] = Band(next_lo, next_hi, path_lo, path_hi)
        return out

    def _half_widths(self, prices: np.ndarray, vol: np.ndarray, steps: int) -> np.ndarray:
        """(L, B, steps) half-widths in price units; NaN where price or volatility is unknown
        (and inf where they overflow, which :func:`_band` turns into no band)."""
        vol = np.where(np.isfinite(vol), np.maximum(vol, VOL_MIN), np.nan)
        unit = np.where(np.isnan(vol), np.nan, 1.0)
        scale = price_scale(prices)
        scaled = self.scaled()[:steps].T[:, None, :]  # (L, 1, steps)
        q = np.where(scaled, self.log_q[:steps].T[:, None, :], self.log_q_raw[:steps].T[:, None, :])
        with np.errstate(invalid="ignore", over="ignore"):
            units = np.where(scaled, (scale * vol)[None, :, None], (scale * unit)[None, :, None])
            tracked = np.exp(q) * units
            warm_up = self._warm_q[:steps].T[:, None, :] * (scale * vol)[None, :, None]
        return np.where(self.warm()[:steps][None, None, :], tracked, warm_up)

    # -- learning ----------------------------------------------------------------------------

    def score(
        self, forecast: np.ndarray, truth: np.ndarray, price: np.ndarray, vol: np.ndarray
    ) -> np.ndarray:
        """What :meth:`update` learns from, per resolved forecast (shape of the inputs + (2,)):
        the relative error ``|truth - forecast| / |price|`` and ``vol`` (as given to
        :meth:`bands` when the forecast was made); NaN where an input is not finite."""
        forecast, truth, price, vol = (
            np.asarray(a, dtype=np.float64) for a in (forecast, truth, price, vol)
        )
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            e = np.abs(truth - forecast) / price_scale(price)
        vol = np.broadcast_to(np.maximum(vol, VOL_MIN), e.shape)
        ok = np.isfinite(e) & np.isfinite(vol)
        return np.stack([np.where(ok, e, np.nan), np.where(ok, vol, np.nan)], axis=-1)

    def update(self, horizons: np.ndarray, scores: np.ndarray) -> int:
        """Learn from resolved forecasts: ``horizons`` (n,) in 1..H, ``scores`` (n, 2) from
        :meth:`score` (or (n,) scores already scale-free: a volatility of 1). Pairs with a score
        that is not finite or a horizon out of range are skipped; returns how many were used."""
        steps = np.asarray(horizons, dtype=np.float64).reshape(-1)
        given = np.asarray(scores, dtype=np.float64)
        if given.size == 2 * steps.size and given.shape[-1:] == (2,):
            pairs = given.reshape(-1, 2)
        elif given.size == steps.size:
            pairs = np.stack([given.reshape(-1), np.ones(given.size)], axis=1)
        else:
            raise ValueError(f"{steps.size} horizons for {given.size} scores")
        e, vol = pairs[:, 0], pairs[:, 1]
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            scaled = e / vol
        ok = np.isfinite(e) & (e >= 0) & np.isfinite(vol) & (vol > 0) & np.isfinite(scaled)
        keep = ok & (steps >= 1) & (steps <= self.config.horizons)
        h = steps[keep].astype(np.int64) - 1
        e, vol = e[keep], vol[keep]
        warming = ~self.warm()[h]
        self._collect(h[warming], np.stack([scaled[keep], e])[:, warming])
        self._track(h[~warming], e[~warming], vol[~warming])
        return int(h.size)

    def _collect(self, h: np.ndarray, s: np.ndarray) -> None:
        """Warm-up: keep the scores; a horizon that has enough starts from their quantile."""
        if h.size == 0:
            return
        order = np.argsort(h, kind="stable")
        h, s = h[order], s[:, order]
        rank = np.arange(h.size) - np.searchsorted(h, h, side="left")
        slot = self.seen[h] + rank
        fits = slot < self.config.warmup_scores
        self._warmup[:, h[fits], slot[fits]] = s[:, fits]
        before = self.warm()
        np.add.at(self.seen, h, 1)
        done = self.warm() & ~before
        if done.any():
            self.log_q[done] = np.log(self._conformal_quantiles(self._warmup[0, done]))
            self.log_q_raw[done] = np.log(self._conformal_quantiles(self._warmup[1, done]))
            self._warmup[:, done] = np.nan

    def _conformal_quantiles(self, scores: np.ndarray) -> np.ndarray:
        """(rows, L) the ``ceil((n + 1) * level)``-th smallest of each row of n scores."""
        n = scores.shape[1]
        ranks = [min(n, math.ceil((n + 1) * level)) - 1 for level in self.levels]
        return np.clip(np.sort(scores, axis=1)[:, ranks], Q_MIN, Q_MAX)

    def _track(self, h: np.ndarray, e: np.ndarray, vol: np.ndarray) -> None:
        """The quantile trackers' step for every (horizon, level) the relative errors ``e``
        (n,) fall in (made with volatilities ``vol``), and both trackers' running interval
        scores."""
        if h.size == 0:
            return
        horizons = self.config.horizons
        counts = np.bincount(h, minlength=horizons).astype(np.float64)
        alpha = 1.0 - np.asarray(self.levels)
        shrink = np.minimum(1.0, self.config.batch_cap / np.maximum(counts, 1.0))
        rate = self.config.learning_rate / self.overlap()  # see "Delay" above
        # the running interval scores remember about SCORE_MEMORY scores of each horizon
        keep = (1.0 - 1.0 / SCORE_MEMORY) ** counts[:, None]
        err = e[:, None]
        units = (vol[:, None], np.ones((len(vol), 1)))
        for kind, (log_q, unit) in enumerate(zip((self.log_q, self.log_q_raw), units, strict=True)):
            # the half-width relative to the price (bounded: an absurd one is no band anyway)
            half = np.minimum(np.exp(log_q[h]) * unit, Q_MAX)  # (n, L)
            # relative to the price: 2 w + (2 / alpha) * max(0, |e| - w)
            interval = np.minimum(2 * half + 2 / alpha * np.maximum(0.0, err - half), 1e300)
            misses, intervals = (
                np.stack(
                    [
                        np.bincount(h, weights=x[:, i], minlength=horizons)
                        for i in range(x.shape[1])
                    ],
                    axis=1,
                )
                for x in (err > half, interval)
            )
            step = rate[:, None] * (misses - counts[:, None] * alpha) * shrink[:, None]
            log_q[:] = np.clip(log_q + step, math.log(Q_MIN), math.log(Q_MAX))
            mean = intervals / np.maximum(counts, 1.0)[:, None]
            seen = counts[:, None] > 0
            self.interval_score[kind] = np.where(
                seen,
                keep * self.interval_score[kind] + (1 - keep) * mean,
                self.interval_score[kind],
            )

    def overlap(self) -> np.ndarray:
        """(H,) how many resolved forecasts at each horizon share most of their future: ``h``
        where every tick's forecast reaches that horizon, fewer where only some do (the daemon's
        paths are refreshes), estimated by each horizon's resolved count against horizon 1's."""
        steps = np.arange(1, self.config.horizons + 1)
        share = np.minimum(1.0, self.seen / max(int(self.seen[0]), 1))
        return np.maximum(1.0, steps * share)

    # -- state -------------------------------------------------------------------------------

    def reset(self, model_version: str) -> None:
        """Start over for another model version (warm-up again)."""
        fresh = Calibrator(self.config, model_version)
        self.model_version = model_version
        self.log_q, self.log_q_raw, self.seen = fresh.log_q, fresh.log_q_raw, fresh.seen
        self.interval_score, self._warmup = fresh.interval_score, fresh._warmup

    def to_dict(self) -> dict[str, Any]:
        """The whole state as JSON-safe values; :meth:`from_dict` restores it exactly."""
        config = asdict(self.config)
        config["levels"] = list(self.config.levels)
        warming = {
            str(h + 1): self._warmup[:, h, : self.seen[h]].tolist()
            for h in np.flatnonzero(~self.warm() & (self.seen > 0))
        }
        return {
            "format": FORMAT,
            "model_version": self.model_version,
            "config": config,
            "log_q": self.log_q.tolist(),
            "log_q_raw": self.log_q_raw.tolist(),
            "interval_score": self.interval_score.tolist(),
            "seen": self.seen.tolist(),
            "warmup": warming,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Calibrator:
        """A calibrator from :meth:`to_dict`'s output; ValueError when it is not one."""
        try:
            if data["format"] != FORMAT:
                raise ValueError(f"format {data['format']!r}, expected {FORMAT}")
            raw = dict(data["config"])
            config = IntervalConfig(**{**raw, "levels": tuple(raw["levels"])})
            cal = cls(config, str(data["model_version"]))
            log_q, log_q_raw, interval, seen = (
                np.asarray(data[name], dtype=np.float64)
                for name in ("log_q", "log_q_raw", "interval_score", "seen")
            )
            shapes = (log_q.shape, log_q_raw.shape, interval.shape, seen.shape)
            if shapes != (
                cal.log_q.shape,
                cal.log_q.shape,
                cal.interval_score.shape,
                cal.seen.shape,
            ):
                raise ValueError("log_q, log_q_raw, interval_score or seen has the wrong shape")
            if not all(np.isfinite(a).all() for a in (log_q, log_q_raw, interval, seen)):
                raise ValueError("log_q, log_q_raw, interval_score or seen not finite")
            if (seen < 0).any() or (seen != np.round(seen)).any():
                raise ValueError("seen holds a negative or fractional count")
            cal.log_q, cal.log_q_raw, cal.interval_score = log_q, log_q_raw, interval
            cal.seen = seen.astype(np.int64)
            for key, scores in data["warmup"].items():
                h, rows = int(key) - 1, np.asarray(scores, dtype=np.float64)
                width = min(cal.seen[h], config.warmup_scores) if 0 <= h < config.horizons else -1
                if rows.shape != (2, width):
                    raise ValueError(f"warm-up scores of horizon {key} do not fit")
                cal._warmup[:, h, :width] = rows
        except (KeyError, TypeError, IndexError) as exc:
            raise ValueError(f"not a calibrator state: {exc!r}") from None
        return cal


def _band(centre: np.ndarray, half: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """centre -/+ half, NaN on both sides wherever either is not finite."""
    with np.errstate(invalid="ignore", over="ignore"):
        lo, hi = centre - half, centre + half
    ok = np.isfinite(lo) & np.isfinite(hi) & (lo <= centre) & (centre <= hi)
    return np.where(ok, lo, np.nan), np.where(ok, hi, np.nan)


def wire(bands: Bands) -> list[dict[str, Any] | None]:
    """Each row's intervals as the wire carries them, None for a row without a band::

        {"80": {"next": [lo, hi], "path": [[lo, hi], ...]}, "95": {...}}

    ``next`` and ``path`` only where the row has that band (a path band only whole).
    A path band is 50 small lists: in a process that has loaded TensorFlow (~10^5 objects the
    garbage collector tracks), hundreds of them at once set off full collections; calling
    ``gc.freeze()`` once the engine is loaded keeps those short (bench/intervals.py measures).
    """
    if not bands:
        return []
    rows: list[dict[str, Any]] = [{} for _ in next(iter(bands.values())).next_lo]
    for level, band in bands.items():
        key = level_key(level)
        has_next = np.isfinite(band.next_lo) & np.isfinite(band.next_hi)
        next_pairs = np.stack([band.next_lo, band.next_hi], axis=1).tolist()
        path_of: dict[int, Any] = {}
        if band.path_lo is not None and band.path_hi is not None and band.path_lo.shape[1]:
            finite = np.isfinite(band.path_lo) & np.isfinite(band.path_hi)
            with_path = np.flatnonzero(finite.all(axis=1))  # lists for these rows only
            pairs = np.stack([band.path_lo[with_path], band.path_hi[with_path]], axis=2)
            path_of = dict(zip(with_path.tolist(), pairs.tolist(), strict=True))
        for row, entry in enumerate(rows):
            item: dict[str, Any] = {}
            if has_next[row]:
                item["next"] = next_pairs[row]
            if row in path_of:
                item["path"] = path_of[row]
            if item:
                entry[key] = item
    return [entry or None for entry in rows]
