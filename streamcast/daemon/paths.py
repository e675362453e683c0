"""The path lane: multi-step paths, computed apart from the 1-step forecasts and after them.

A tick's 1-step forecast never waits for a path. Once a batch is published, the newest window of
each of its symbols is offered here; a symbol is queued when its path is due (``path_refresh_s``
since its last one), and a queued symbol's window is replaced by each newer one. The lane waits
until ``paths_per_batch_max`` are queued or the first one queued has waited ``path_gather_s``
(on a lightly loaded replica paths come due one by one, and a path rolled alone costs more than
its share of a group's rollout), takes up to ``paths_per_batch_max`` queued symbols, the longest
waiting first, and rolls their windows forward a few steps at a time on the engine's one thread:
each step is sized to take about ``path_chunk_ms``, so a 1-step batch submitted meanwhile waits
for one step at most. While ticks flow, the lane pauses after each step so that it takes at
most ``path_share`` of the engine's time (and of the CPU), a quarter of that while ticks are
backlogged: paths never starve the 1-step forecasts; on a quiet stream it runs on. A finished
path goes to its symbol's paths stream (``Keys.paths``), its entry id the tick it starts from.

Paths are refreshes, not deliveries: a path lost to a crash, a Redis error or a partition given
up is not redone; the symbol's next due window gets one. A path is a function of its window, so
two replicas that both compute one from the same tick (a hand-over) write the same values; the
second is refused as a duplicate id and counted. A path whose model was swapped out while it was
computed is started again with the new one: no path mixes two versions.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from redis import exceptions as redis_errors
from redis.asyncio import Redis

from streamcast.daemon.batch import Batch, Stats
from streamcast.daemon.calibration import Calibration
from streamcast.daemon.compute import rows_apart
from streamcast.daemon.config import DaemonConfig
from streamcast.daemon.faults import REDIS_DOWN, write_refusal
from streamcast.engine import Engine
from streamcast.keys import Keys
from streamcast.logs import RateLimitedLog
from streamcast.metrics import Metrics
from streamcast.skill import SkillTracker
from streamcast.wire import Forecast, Tick

log = logging.getLogger(__name__)

LANE_STEPS = (1, 5)  # a call rolls 1 or 5 steps: the step counts compiled at start
ENCODE_SLICE = 8  # path entries encoded between two turns of the event loop


@dataclass
class Job:
    """A symbol's path to compute: from the newest window offered."""

    tick: Tick  # the tick the path starts from
    window: np.ndarray  # (seq_len,) raw prices ending at the tick
    waiting_since: float  # when the symbol's previous path was published, or first queued
    offered_at: float  # when this window was offered (its tick published)
    queued_at: float  # when the symbol was queued (its path came due and a tick arrived)
    after: list[float] = field(default_factory=list)  # prices published since the tick


class PathLane:
    """Queues due paths and computes them in steps between the 1-step batches."""

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        config: DaemonConfig,
        metrics: Metrics,
        skill: SkillTracker,
        calibration: Calibration | None = None,
        stats: Stats | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.redis, self.keys, self.config, self.metrics = redis, keys, config, metrics
        self.skill, self.calibration, self.clock = skill, calibration, clock
        self.stats = stats or Stats()
        # what serves: set by :meth:`serve` (the daemon's engine and its thread change)
        self.engine: Callable[[], Engine] = lambda: _no_engine()
        self.executor: Callable[[], Executor | None] = lambda: None
        self.owned: Callable[[int], bool] = lambda partition: True
        self.load: Callable[[], str] = lambda: "quiet"  # quiet, flowing or backlogged
        self.queue: dict[str, Job] = {}
        self.computing: dict[str, Job] = {}  # the group in flight
        self.last_path: dict[str, float] = {}  # when each symbol's last path was due
        self._ready = asyncio.Event()
        self._full = asyncio.Event()  # a whole group is queued
        self._call_s: dict[tuple[int, int], float] = {}  # by (group size, steps)
        self._say = RateLimitedLog(log)

    def serve(
        self,
        engine: Callable[[], Engine],
        executor: Callable[[], Executor | None],
        owned: Callable[[int], bool],
        load: Callable[[], str] = lambda: "quiet",
    ) -> None:
        """Compute with ``engine()`` on ``executor()`` (the 1-step batches' thread); publish
        only for partitions ``owned``; take at most ``path_share`` of the engine's time while
        ``load()`` says ticks are flowing, a quarter of that while they are backlogged."""
        self.engine, self.executor, self.owned, self.load = engine, executor, owned, load

    # -- fed by the consume loop -----------------------------------------------------------------

    def offer(self, batch: Batch) -> None:
        """After ``batch`` is published: note its prices for the paths waiting or in flight (the
        truths of their first steps), and queue the newest window of each symbol whose path is
        due (or replace the window of one already queued)."""
        steps = self.config.path_steps
        for jobs in (self.queue, self.computing):
            if jobs:
                for tick in batch.accepted:
                    job = jobs.get(tick.symbol)
                    if job is not None and len(job.after) < steps:
                        job.after.append(tick.price)
        now = self.clock()
        refresh = self.config.path_refresh_s
        for symbol, (tick, window) in batch.newest().items():
            queued = self.queue.get(symbol)
            if queued is not None:
                queued.tick, queued.window, queued.offered_at = tick, window, now
                queued.after = []
                continue
            last = self.last_path.get(symbol)
            if last is not None and now - last < refresh:
                continue
            self.queue[symbol] = Job(tick, window, now if last is None else last, now, now)
        if self.queue:
            self._ready.set()
        if len(self.queue) >= self.config.paths_per_batch_max:
            self._full.set()

    def forget(self, symbols: Iterable[str]) -> None:
        for symbol in symbols:
            self.queue.pop(symbol, None)
            self.computing.pop(symbol, None)  # computed, but not published
            self.last_path.pop(symbol, None)

    def forget_partitions(self, partitions: set[int]) -> None:
        if partitions:
            known = set(self.queue) | set(self.computing) | set(self.last_path)
            self.forget([s for s in known if self.keys.partition(s) in partitions])

    def reset(self) -> None:
        """After a failed batch: the windows are not trusted, nor is anything queued from them."""
        self.forget(list(set(self.queue) | set(self.computing) | set(self.last_path)))

    def path_age(self, now: float) -> float:
        """The longest any queued symbol has waited since its last path was published."""
        return max((now - job.waiting_since for job in self.queue.values()), default=0.0)

    # -- the lane --------------------------------------------------------------------------------

    async def run_forever(self) -> None:
        try:
            while True:
                await self._ready.wait()
                if self.queue:
                    await self._gather()
                if not self.queue:  # forgotten meanwhile
                    self._ready.clear()
                    continue
                await self._one_group()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("the path lane failed")  # a bug: the 1-step forecasts go on
            raise

    async def _gather(self) -> None:
        """Let due paths gather into a group: wait until ``paths_per_batch_max`` are queued or
        the first one queued has waited ``path_gather_s``. A path rolled alone costs two to
        three times its share of a group's rollout (each engine call's overhead, ten calls
        over), and on a lightly loaded replica due paths trickle in. A queued window is replaced
        by each newer one, so the wait delays a path, it does not age its start."""
        gather = self.config.path_gather_s
        if gather <= 0 or len(self.queue) >= self.config.paths_per_batch_max:
            return
        first = min(job.queued_at for job in self.queue.values())
        # never longer than the gather time: a clock stepped back must not stall the lane
        left = min(gather, first + gather - self.clock())
        if left > 0:
            self._full.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._full.wait(), left)

    async def _one_group(self) -> None:
        cfg = self.config
        group = sorted(self.queue.values(), key=lambda j: j.waiting_since)[
            : cfg.paths_per_batch_max
        ]
        now = self.clock()
        for job in group:
            del self.queue[job.tick.symbol]
            self.computing[job.tick.symbol] = job
            self.last_path[job.tick.symbol] = now
            self.metrics.stage_seconds.labels("path_wait").observe(max(0.0, now - job.offered_at))
        try:
            started = time.perf_counter()
            paths, version = await self._roll(np.stack([j.window for j in group]))
            computed = self.clock()
            self.metrics.stage_seconds.labels("path_compute").observe(time.perf_counter() - started)
            # a symbol forgotten meanwhile (its partition moved, a failed batch) is not published
            kept = [
                (j, p)
                for j, p in zip(group, paths, strict=True)
                if self.computing.get(j.tick.symbol) is j
            ]
            await self._publish(kept, version, computed)
        finally:
            for job in group:
                if self.computing.get(job.tick.symbol) is job:
                    del self.computing[job.tick.symbol]

    async def _roll(self, windows: np.ndarray) -> tuple[np.ndarray, str]:
        """Roll ``windows`` forward ``path_steps`` steps, a few at a time; (paths, version)."""
        steps = self.config.path_steps
        loop = asyncio.get_running_loop()
        while True:
            engine = self.engine()
            state, done, out = windows, 0, np.empty((len(windows), steps))
            failed: dict[int, str] = {}
            while done < steps:
                k = self._chunk(len(windows), steps - done)
                # timed on the engine's thread: the wait behind 1-step batches is not the lane's
                (part, bad), took = await loop.run_in_executor(
                    self.executor(), _run_timed, rows_apart, _rollout(engine, k), state, (k,)
                )
                self._timed(len(windows), k, took)
                share = self._share()
                if share < 1:  # ticks are flowing: the lane takes its share of the engine
                    await asyncio.sleep(took * (1 - share) / share)
                for row, why in bad.items():
                    failed.setdefault(row, why)
                    part[row] = state[row, -1]  # a failed row rolls on flat; withheld below
                out[:, done : done + k] = part
                state = np.concatenate([state[:, k:], part], axis=1)
                done += k
                if self.engine() is not engine:
                    break  # a new model: start again with it
            else:
                out[list(failed)] = np.nan  # published without a path, with the reason
                return out, engine.version

    def _share(self) -> float:
        load = self.load()
        if load == "quiet":
            return 1.0
        share = self.config.path_share
        return share / 4 if load == "backlogged" else share

    def _chunk(self, rows: int, left: int) -> int:
        """Steps for the next call: the most of :data:`LANE_STEPS` (the step counts the engine
        compiled) expected to take at most ``path_chunk_ms``."""
        budget = self.config.path_chunk_ms / 1000
        size = _bucket(rows)
        one = self._call_s.get((size, 1))
        if one is None:
            return 1
        best = 1
        for k in LANE_STEPS:
            if 1 < k <= left:
                # not measured yet: a few steps cost about 2.5 times one (the call's overhead)
                expected = self._call_s.get((size, k), one * k / 2)
                if expected <= budget:
                    best = max(best, k)
        return best

    def _timed(self, rows: int, steps: int, seconds: float) -> None:
        key = (_bucket(rows), steps)
        old = self._call_s.get(key)
        self._call_s[key] = seconds if old is None else 0.8 * old + 0.2 * seconds

    async def _publish(
        self, group: list[tuple[Job, np.ndarray]], version: str, computed: float
    ) -> None:
        group = [(j, p) for j, p in group if self.owned(self.keys.partition(j.tick.symbol))]
        if not group:
            return
        forecasts, vols = self._forecasts(group, version)
        now_ms = int(self.clock() * 1000)
        cfg, keys = self.config, self.keys
        pipe = self.redis.pipeline(transaction=False)
        for k, f in enumerate(forecasts):
            if k and k % ENCODE_SLICE == 0:
                # a path entry is ~250 numbers to text (~0.3 ms): the consume loop runs between
                # slices instead of waiting for the whole group's
                await asyncio.sleep(0)
            fields: dict[Any, Any] = f.encode(now_ms)
            pipe.xadd(
                keys.paths(f.tick.symbol),
                fields,
                id=f.tick.id,
                maxlen=cfg.forecasts_maxlen,
                approximate=True,
            )
        try:
            results = await pipe.execute(raise_on_error=False)
        except (*REDIS_DOWN, redis_errors.RedisError) as exc:
            self.metrics.write_errors.labels("path", type(exc).__name__.lower()).inc(len(forecasts))
            self._say(
                logging.WARNING,
                "paths-down",
                "%d paths were not published (%s): their symbols get new ones when next due",
                len(forecasts),
                str(exc)[:120],
            )
            return
        written = _written(forecasts, results, self.metrics, self._say)
        self.metrics.stage_seconds.labels("path_publish").observe(max(0.0, self.clock() - computed))
        made = [f for f, ok in zip(forecasts, written, strict=True) if ok]
        withheld = sum(f.path is None for f in made)
        self.metrics.forecasts.labels("path").inc(len(made) - withheld)
        if withheld:
            self.metrics.forecasts_withheld.labels("path").inc(withheld)
        self.stats.paths += len(made) - withheld
        self._record(group, made, vols)

    def _forecasts(
        self, group: list[tuple[Job, np.ndarray]], version: str
    ) -> tuple[list[Forecast], np.ndarray]:
        """The group's path entries (with their bands) and each one's window volatility."""
        ticks = [j.tick for j, _ in group]
        bands: list[dict[str, Any] | None] = [None] * len(group)
        vols = np.full(len(group), np.nan)
        if self.calibration is not None:
            windows = np.stack([j.window for j, _ in group])
            bands, vols = self.calibration.path_bands(ticks, windows, [p for _, p in group])
        made = [
            Forecast.path_of(tick, version, path.tolist(), band)
            for tick, (_, path), band in zip(ticks, group, bands, strict=True)
        ]
        return made, vols

    def _record(
        self, group: list[tuple[Job, np.ndarray]], made: list[Forecast], vols: np.ndarray
    ) -> None:
        """Score the published paths: their first steps at once, the rest as ticks arrive."""
        job_of = {(j.tick.symbol, j.tick.id): (k, j) for k, (j, _) in enumerate(group)}
        for f in made:
            if f.path is None:
                continue
            k, job = job_of[(f.tick.symbol, f.tick.id)]
            # the prices published since its tick are the truths of its first steps
            self.skill.path(f.tick.symbol, f.tick.price, f.path, f.model, job.after)
            if self.calibration is not None:
                self.calibration.remember_path(f, float(vols[k]), job.after)


def _written(
    forecasts: list[Forecast], results: list[object], metrics: Metrics, say: RateLimitedLog
) -> list[bool]:
    """Which path entries were written; each refusal counted (a duplicate id: written before,
    by the replica that computed it first) and, but for a duplicate, said."""
    written = []
    for f, result in zip(forecasts, results, strict=True):
        if not isinstance(result, Exception):
            written.append(True)
            continue
        said = str(result)
        reason = write_refusal(result)
        metrics.write_errors.labels("path", reason).inc()
        if reason != "duplicate_id":  # a duplicate: written already (a hand-over)
            say(
                logging.ERROR,
                "err-path",
                "writing the path of %s %s failed: %s",
                f.tick.symbol,
                f.tick.id,
                said[:200],
            )
        written.append(False)
    return written


def _no_engine() -> Engine:
    raise RuntimeError("the path lane has no engine: call serve() first")


def lane_steps(path_steps: int) -> tuple[int, ...]:
    """The step counts the lane calls the engine with (the engine compiles each at start)."""
    return tuple(sorted({k for k in LANE_STEPS if k <= path_steps}))


def _run_timed(call: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    """``call(*args)`` and the seconds it took (on the thread that ran it)."""
    began = time.perf_counter()
    out = call(*args)
    return out, time.perf_counter() - began


def _rollout(engine: Engine, steps: int) -> Callable[[np.ndarray], np.ndarray]:
    return lambda windows: engine.rollout(windows, steps)


def _bucket(rows: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, rows))))
