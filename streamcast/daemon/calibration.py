"""Prediction intervals on every forecast, calibrated online per partition (streamcast.intervals).

Each partition this replica consumes has a :class:`~streamcast.intervals.Calibrator`, stored in
Redis (``keys.calibration(p)``, JSON, in the partition's slot) so that it survives a restart and
moves with the partition to whichever replica takes it. A batch's forecasts get their bands from
their partition's calibrator (:meth:`Calibration.bands`); when the ticks that are their truth
arrive (:meth:`Calibration.record`), every resolved forecast (the 1-step ``next`` and each step
of a path, up to the path's length) is scored and fed back, and the bands' coverage, width and
interval score are exported at the tracked horizons.

A calibrator belongs to one model version. A new version starts from the warm-up band (a widened
random-walk band on the window's own volatility) and its own scores, never from another model's
calibration; a stored state of another version is not used.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from redis import exceptions as redis_errors
from redis.asyncio import Redis

from streamcast.daemon.config import DaemonConfig
from streamcast.daemon.faults import REDIS_DOWN
from streamcast.intervals import Calibrator, IntervalConfig, window_volatility, wire
from streamcast.keys import Keys
from streamcast.metrics import Metrics
from streamcast.wire import Forecast, Tick, loads

log = logging.getLogger(__name__)

KEEP_VERSIONS = 3  # model versions whose interval metrics are exported
FEED_EVERY_S = 0.05  # resolved scores wait at most about this long to reach their calibrator


@dataclass
class _Pending:
    """A published forecast waiting for its truth: the next value, or a path step by step."""

    values: np.ndarray  # (steps,) the forecast at horizons 1.. (one value for ``next``)
    price: float  # the price it was made at
    vol: float  # the window's volatility then
    version: str
    partition: int
    bands: Mapping[str, Any]  # as published
    elapsed: int = 0


@dataclass
class _Rolling:
    """Coverage, width and interval score of the last ``size`` resolved forecasts."""

    size: int
    hits: deque[float] = field(default_factory=deque)
    widths: deque[float] = field(default_factory=deque)
    scores: deque[float] = field(default_factory=deque)

    def add(self, hit: bool, width: float, score: float) -> None:
        for values, value in ((self.hits, float(hit)), (self.widths, width), (self.scores, score)):
            values.append(value)
            if len(values) > self.size:
                values.popleft()


class Calibration:
    """The bands of this replica's forecasts and what their truths say of them."""

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        metrics: Metrics,
        *,
        config: IntervalConfig | None = None,
        horizons: Sequence[int] = (1, 10, 50),
        window: int = 2000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.metrics = metrics
        self.config = config or IntervalConfig()
        self.tracked = tuple(sorted(set(h for h in horizons if h <= self.config.horizons)))
        self.window = window
        self.calibrators: dict[int, Calibrator] = {}
        self._next: dict[str, _Pending] = {}
        self._paths: dict[str, deque[_Pending]] = {}
        self._rolling: dict[tuple[str, int, str], _Rolling] = {}
        # per partition, the resolved forecasts of this batch: horizon, forecast, truth, price, vol
        self._resolved: dict[int, list[tuple[int, float, float, float, float]]] = {}
        self._versions: list[str] = []  # oldest first; the newest KEEP_VERSIONS are exported
        self.clock = clock
        self._fed_at = clock()  # when the resolved scores were last fed to the calibrators

    @classmethod
    def of(
        cls, redis: Redis, keys: Keys, metrics: Metrics, config: DaemonConfig
    ) -> Calibration | None:
        """The daemon's, from its config; None when no interval levels are configured."""
        if not config.interval_levels:
            return None
        levels = tuple(level / 100 for level in config.interval_levels)
        return cls(
            redis,
            keys,
            metrics,
            config=IntervalConfig(horizons=config.path_steps, levels=levels),
            horizons=config.skill_horizons,
            window=config.skill_window,
        )

    # -- the partitions' calibrators ---------------------------------------------------------

    async def adopt(self, partitions: Iterable[int], version: str) -> None:
        """Load the stored calibrators of ``partitions`` (a fresh one where there is none, or
        one of another model version, or one that does not parse)."""
        for p in partitions:
            cal = Calibrator(self.config, version)
            try:
                raw = await self.redis.get(self.keys.calibration(p))
            except redis_errors.ResponseError as exc:
                if "WRONGTYPE" not in str(exc):
                    raise  # a refusal (BUSY, NOPERM, ...): the hand-over is tried again
                log.warning(
                    "calibration of partition %d is not a string (%s): starting over; the next "
                    "save replaces it",
                    p,
                    str(exc)[:120],
                )
                raw = None
            if raw:
                try:
                    stored = Calibrator.from_dict(loads(raw))
                    if stored.model_version == version and stored.config == self.config:
                        cal = stored
                except ValueError as exc:  # json's errors are ValueErrors too
                    log.warning(
                        "calibration of partition %d is unreadable (%s): starting over", p, exc
                    )
            self.calibrators[p] = cal

    def forget(self, partitions: Iterable[int]) -> None:
        for p in partitions:
            self.calibrators.pop(p, None)
            self._resolved.pop(p, None)

    def model_changed(self, version: str) -> None:
        """A new model serves: its forecasts start from the warm-up band, not the old model's
        calibration; forecasts of the old model still pending are scored for its metrics only."""
        self.feed()  # the old model's scores resolved so far, to its calibration, which then resets
        for cal in self.calibrators.values():
            cal.reset(version)

    async def save(self, partitions: Iterable[int] | None = None) -> None:
        """Store the calibrators of ``partitions`` (default all: housekeeping, stop), e.g. of
        those given up, for their next holder."""
        chosen = self.calibrators if partitions is None else set(partitions)
        self.feed([p for p in self._resolved if p in chosen])
        mine = {p: c for p, c in self.calibrators.items() if p in chosen}
        if not mine:
            return
        pipe = self.redis.pipeline(transaction=False)
        for p, cal in mine.items():
            try:
                state = json.dumps(cal.to_dict(), allow_nan=False)
            except ValueError as exc:  # a bug: a value that is not finite; keep serving
                log.error("calibration of partition %d not saved: %s", p, exc)
                continue
            pipe.set(self.keys.calibration(p), state)
        try:
            await pipe.execute()
        except (*REDIS_DOWN, redis_errors.RedisError) as exc:
            log.debug("saving the calibration: %s", exc)

    # -- bands for a batch -------------------------------------------------------------------

    def bands(
        self,
        ticks: Sequence[Tick],
        windows: np.ndarray,
        next_values: np.ndarray,
        paths: dict[int, np.ndarray],
    ) -> tuple[list[dict[str, Any] | None], np.ndarray]:
        """Each row's bands (the wire's JSON, None for a row without) and its window's
        volatility; ``paths`` maps a row to its path."""
        n = len(ticks)
        out: list[dict[str, Any] | None] = [None] * n
        if n == 0:
            return out, np.full(0, np.nan)
        rows_of: dict[int, list[int]] = {}  # by partition (a batch holds a few: no numpy here)
        for r, tick in enumerate(ticks):
            rows_of.setdefault(self.keys.partition(tick.symbol), []).append(r)
        # every calibrator has this config: one pass for the batch
        vols = window_volatility(windows, self.config.volatility_halflife_ticks)
        for p, rows in rows_of.items():
            cal = self.calibrators.get(p)
            if cal is None:
                vols[rows] = np.nan
                continue
            vol = vols[rows]
            steps = max((len(paths[r]) for r in rows if r in paths), default=0)
            grid = None
            if steps:
                grid = np.full((len(rows), steps), np.nan)
                for k, r in enumerate(rows):
                    if r in paths:
                        grid[k, : len(paths[r])] = paths[r]
            made = wire(cal.bands(windows[rows, -1], next_values[rows], grid, vol))
            for k, r in enumerate(rows):
                out[r] = made[k]
        return out, vols

    def path_bands(
        self, ticks: Sequence[Tick], windows: np.ndarray, paths: Sequence[np.ndarray]
    ) -> tuple[list[dict[str, Any] | None], np.ndarray]:
        """The path lane's: each path's bands ({level: {"path": ...}}) and window volatility."""
        nothing = np.full(len(ticks), np.nan)  # no ``next`` band: that is the tick's entry's
        return self.bands(ticks, windows, nothing, dict(enumerate(paths)))

    # -- truths --------------------------------------------------------------------------------

    def record(
        self,
        ticks: Iterable[Tick],
        forecasts: Iterable[Forecast],
        vols: dict[tuple[str, str], float],
    ) -> None:
        """Score pending forecasts against ``ticks`` (in stream order), feed the scores to the
        calibrators, then remember the new ``forecasts`` (``vols``: by symbol and tick id)."""
        made = {(f.tick.symbol, f.tick.id): f for f in forecasts}
        for tick in ticks:
            self._observe(tick.symbol, tick.price)
            f = made.get((tick.symbol, tick.id))
            if f is not None and f.bands:
                self._remember(f, vols.get((tick.symbol, tick.id), float("nan")))
        due = self.clock() - self._fed_at >= FEED_EVERY_S
        self.feed([p for p, r in self._resolved.items() if due or len(r) >= self.config.batch_cap])

    def feed(self, partitions: Iterable[int] | None = None) -> None:
        """Feed the scores resolved so far (of ``partitions``, default all) to their calibrators.

        :meth:`record` feeds a partition's once it has ``batch_cap`` of them, and every
        partition's every :data:`FEED_EVERY_S`: an update costs ~0.1 ms of numpy whatever its
        size, and a quiet partition's batches hold a tick or two. Up to ``batch_cap`` scores a
        horizon, one update steps as far as their updates one by one would (to first order)."""
        chosen = list(self._resolved) if partitions is None else list(partitions)
        for p in chosen:
            resolved = self._resolved.pop(p, None)
            cal = self.calibrators.get(p)
            if cal is not None and resolved:
                h, value, truth, price, vol = np.array(resolved).T
                cal.update(h, cal.score(value, truth, price, vol))
        if partitions is None or not self._resolved:
            self._fed_at = self.clock()

    def remember_path(self, forecast: Forecast, vol: float, after: Sequence[float] = ()) -> None:
        """A path published by the path lane when the prices ``after`` had already followed its
        tick: those resolve its first steps at once (fed to the calibrator with the next
        batch's), the rest resolve as ticks arrive."""
        if forecast.path is None or not forecast.bands:
            return
        tick = forecast.tick
        self._see(forecast.model)
        pending = _Pending(
            np.asarray(forecast.path),
            tick.price,
            vol,
            forecast.model,
            self.keys.partition(tick.symbol),
            forecast.bands,
        )
        for truth in after:
            self._step(pending, truth)
        if pending.elapsed < len(pending.values):
            self._paths.setdefault(tick.symbol, deque()).append(pending)

    def forget_symbols(self, symbols: Iterable[str]) -> None:
        for symbol in symbols:
            self._next.pop(symbol, None)
            self._paths.pop(symbol, None)

    def _remember(self, forecast: Forecast, vol: float) -> None:
        tick = forecast.tick
        self._see(forecast.model)
        p = self.keys.partition(tick.symbol)
        if forecast.next is not None:
            self._next[tick.symbol] = _Pending(
                np.array([forecast.next]), tick.price, vol, forecast.model, p, forecast.bands or {}
            )
        if forecast.path is not None:
            pending = _Pending(
                np.asarray(forecast.path), tick.price, vol, forecast.model, p, forecast.bands or {}
            )
            self._paths.setdefault(tick.symbol, deque()).append(pending)

    def _see(self, version: str) -> None:
        if version not in self._versions:
            self._versions = [*self._versions, version][-KEEP_VERSIONS:]

    def _observe(self, symbol: str, price: float) -> None:
        pending = self._next.pop(symbol, None)
        if pending is not None:
            self._resolve(pending, 1, float(pending.values[0]), price, "next")
        paths = self._paths.get(symbol)
        if not paths:
            return
        for path in paths:
            self._step(path, price)
        while paths and paths[0].elapsed >= len(paths[0].values):
            paths.popleft()

    def _step(self, path: _Pending, price: float) -> None:
        path.elapsed += 1
        if 2 <= path.elapsed <= len(path.values):  # step 1 is ``next``'s, scored with it
            self._resolve(path, path.elapsed, float(path.values[path.elapsed - 1]), price, "path")

    def _resolve(self, f: _Pending, h: int, value: float, truth: float, kind: str) -> None:
        scale = abs(f.price) or 1.0
        cal = self.calibrators.get(f.partition)
        if cal is not None and cal.model_version == f.version:  # not the old model's scores
            self._resolved.setdefault(f.partition, []).append((h, value, truth, f.price, f.vol))
        if h not in self.tracked:
            return
        for level, band in f.bands.items():
            pair = band.get(kind)
            if pair is None:
                continue
            lo, hi = pair if kind == "next" else pair[h - 1]
            alpha = 1.0 - float(level) / 100.0
            miss = max(0.0, lo - truth) + max(0.0, truth - hi)
            winkler = ((hi - lo) + 2.0 / alpha * miss) / scale
            key = (f.version, h, level)
            rolling = self._rolling.get(key)
            if rolling is None:
                rolling = self._rolling[key] = _Rolling(self.window)
            rolling.add(miss == 0.0, (hi - lo) / scale, winkler)
            labels = (str(h), level, f.version)
            self.metrics.intervals.resolved.labels(*labels).inc()
            misses = self.metrics.intervals.misses.labels(*labels)  # exported from 0 on
            if miss:
                misses.inc()

    # -- metrics -------------------------------------------------------------------------------

    def publish(self) -> None:
        """Rolling coverage, width and interval score per (horizon, level) of the newest
        versions; the series of older ones are dropped."""
        keep = set(self._versions)
        m = self.metrics.intervals
        for key in list(self._rolling):
            version, h, level = key
            labels = (str(h), level, version)
            if version not in keep:
                del self._rolling[key]
                for gauge in (m.coverage, m.width, m.score):
                    with contextlib.suppress(KeyError):
                        gauge.remove(*labels)
                continue
            r = self._rolling[key]
            if r.hits:
                m.coverage.labels(*labels).set(float(np.mean(r.hits)))
                m.width.labels(*labels).set(float(np.mean(r.widths)))
                m.score.labels(*labels).set(float(np.mean(r.scores)))
