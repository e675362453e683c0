"""The daemon: wires the tick source, the plan, the engine, the sink, the partitions' ownership
and the model watcher into one consume loop, and runs the path lane and housekeeping beside it.

The consume loop handles a batch at a time, so every tick of a symbol is handled in stream order;
it reads, plans and computes batch k+1 while batch k is being published. A read that found the
stream busy waits up to ``batch_max_wait_ms`` for its batch to fill, while the batch before it is
published; one that found it nearly empty does not wait. Between two batches it swaps in a new
model version when the watcher has one ready, gives up partitions over its share (after
publishing what it read of them) and sets up the partitions it took. Multi-step paths are
computed by the path lane, between the 1-step batches, never inside one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from redis import exceptions as redis_errors
from redis.asyncio import Redis

from streamcast.daemon.batch import Batch, Stats
from streamcast.daemon.calibration import Calibration
from streamcast.daemon.compute import compute
from streamcast.daemon.config import DaemonConfig
from streamcast.daemon.faults import REDIS_DOWN, refusal
from streamcast.daemon.housekeeping import Housekeeping
from streamcast.daemon.models import ModelWatcher, RetrainSchedule
from streamcast.daemon.ownership import Ownership
from streamcast.daemon.ownership import stale as stale_partitions
from streamcast.daemon.paths import PathLane
from streamcast.daemon.plan import Planner
from streamcast.daemon.sink import ForecastSink, Sink
from streamcast.daemon.source import Source, TickSource
from streamcast.daemon.trim import Trimmer
from streamcast.engine import Engine
from streamcast.keys import Keys
from streamcast.logs import RateLimitedLog
from streamcast.metrics import Metrics
from streamcast.skill import SkillTracker
from streamcast.tasks import cancelled, within
from streamcast.windows import Windows

if TYPE_CHECKING:
    from streamcast.registry import Registry
    from streamcast.retrain import Retrainer

log = logging.getLogger(__name__)


class Daemon:
    """One replica of the forecasting service. ``async with Daemon(...)`` starts and stops it.

    ``registry`` and ``loader`` (a version's directory -> a warmed engine) turn on the model
    watcher; ``retrainer`` the retrain schedule; ``publisher`` is the client of the publish
    script and of the reads (one that never retries by itself: a retried publish whose reply
    was lost would write its dead letters twice, a retried read reads on past the entries it
    had delivered; default ``redis``).
    """

    def __init__(
        self,
        redis: Redis,
        engine: Engine,
        metrics: Metrics,
        *,
        keys: Keys | None = None,
        config: DaemonConfig | None = None,
        clock: Callable[[], float] = time.time,
        registry: Registry | None = None,
        loader: Callable[[Path], Engine] | None = None,
        initial_model: Path | None = None,
        retrainer: Retrainer | None = None,
        refused: str | None = None,
        publisher: Redis | None = None,
    ) -> None:
        self.redis, self.engine, self.metrics = redis, engine, metrics
        self.keys = keys = keys or Keys()
        self.config = cfg = config or DaemonConfig()
        self.clock, self.group, self.stats = clock, keys.group, Stats()
        self.source: Source = TickSource(redis, keys, cfg, metrics, clock, reader=publisher)
        self.planner = Planner(redis, keys, cfg, metrics, self.stats, engine, clock)
        self.sink: Sink = ForecastSink(
            publisher or redis, redis, keys, cfg.consumer, cfg, metrics, self.stats, clock
        )
        self.ownership = Ownership(redis, keys, cfg, metrics)
        self.trimmer = Trimmer(redis, keys, metrics)
        self.calibration = Calibration.of(redis, keys, metrics, cfg)  # the forecasts' bands
        self.skill = SkillTracker(
            metrics, horizons=cfg.skill_horizons, window=cfg.skill_window, symbols=cfg.skill_symbols
        )
        self.paths = PathLane(redis, keys, cfg, metrics, self.skill, self.calibration, self.stats)
        self.models: ModelWatcher | None = None
        if registry is not None and loader is not None:
            self.models = ModelWatcher(registry, keys, loader, cfg, metrics, lambda: self.engine)
            self.models.initial_model, self.models.refused = initial_model, refused
        self.retrain: RetrainSchedule | None = None
        if retrainer is not None:
            self.retrain = RetrainSchedule(retrainer, self.stats, cfg, lambda: self.redis_ok)
        self.housekeeping = Housekeeping(
            self.source,
            self.planner,
            self.skill,
            self.paths,
            cfg,
            metrics,
            calibration=self.calibration,
            ready=lambda: self.ready,
            owned=self.ownership.readable,
            promoted_at=lambda: self.models.promoted_at if self.models else None,
            clock=clock,
        )
        self.redis_ok = False
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._executor: ThreadPoolExecutor | None = None
        self._writing: asyncio.Future[set[int]] | None = None  # the publish in flight
        self._started = False
        self._say = RateLimitedLog(log)

    # -- what the service and the tests look at ---------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.redis_ok and self._started and not self.standby and not self._stopping.is_set()

    @property
    def standby(self) -> bool:
        """Owning no partition (other replicas hold them all); this one waits to take one."""
        return self.ownership.standby

    @property
    def windows(self) -> Windows:
        return self.planner.windows

    @property
    def heartbeat(self) -> float:
        return self.housekeeping.heartbeat

    @property
    def trim_rounds(self) -> int:
        return self.trimmer.rounds

    # -- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        self._executor = executor = ThreadPoolExecutor(1, thread_name_prefix="engine")
        lane, engine = self.paths, lambda: self.engine
        lane.serve(engine, lambda: executor, self.ownership.valid, self.source.fill.load)
        self.metrics.model_info.labels(self.engine.version).set(1)
        jobs = {
            "consume": self._consume_forever(),
            "housekeeping": self.housekeeping.run_forever(),
            "lease": self.ownership.keep_forever(),
            "paths": self.paths.run_forever(),
        }
        if self.config.ticks_trim_interval_s > 0:
            jobs["trim"] = self.trimmer.run_forever(
                self.config.ticks_trim_interval_s, lambda: self.redis_ok, self.ownership.readable
            )
        if self.models is not None:
            jobs["models"] = self.models.watch_forever()
        if self.retrain is not None and self.retrain.enabled:
            jobs["retrain"] = self.retrain.run_forever()
        self._tasks = [asyncio.create_task(job, name=name) for name, job in jobs.items()]

    async def stop(self, timeout_s: float | None = None) -> None:
        """Stop reading, finish the batch in flight (publish and ack) within ``timeout_s``
        (default ``shutdown_timeout_s``), then stop; idempotent."""
        if not self._started:
            return
        if timeout_s is None:
            timeout_s = self.config.shutdown_timeout_s
        self._stopping.set()
        await drain(self._tasks, timeout_s)
        self._tasks = []
        if self._writing is not None and not self._writing.done():
            self._writing.cancel()  # abandoned with its batch: its clients are closed next
            await cancelled([self._writing], rounds=4)
        if self.calibration is not None:
            # bounded: the next holder goes on from it, or from the last periodic save
            with contextlib.suppress(Exception):
                await within(self.calibration.save(), 2.0)
        await self.ownership.leave()  # the others take the partitions at once, not after the TTL
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None
        if self.models is not None:
            self.models.close()
        self.skill.publish()
        self._started = False
        log.info("stopped: %s", self.stats)

    async def __aenter__(self) -> Daemon:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def wait_stopped(self) -> None:
        if self._tasks:
            await asyncio.gather(self._tasks[0], return_exceptions=True)

    # -- the consume loop -------------------------------------------------------------------------

    async def _consume_forever(self) -> None:
        try:
            await self._consume()
        except asyncio.CancelledError:
            raise
        except Exception:
            # not a Redis outage and not bad input (both handled below): a bug, so say so loudly
            log.exception("the consume loop failed")
            raise

    async def _consume(self) -> None:
        self._backoff = 0.1
        self._set_up = False
        self._in_flight: Batch | None = None  # computed, not yet published
        while True:
            try:
                if not await self._step():
                    return
            except (*REDIS_DOWN, redis_errors.ResponseError) as exc:
                # a partition a failed publish had found another's is not set up again
                self.ownership.drop(self.sink.found_lost)
                self.sink.found_lost = set()
                self._in_flight = None  # unacknowledged: it will be read again from pending
                self._set_up = False  # the batch may not have landed: rebuild windows
                self.redis_ok, pause, self._backoff = redis_failed(
                    exc, self._backoff, self.metrics, self._say, self.group
                )
                await self._pause(pause)
                if self._stopping.is_set():
                    return

    async def _step(self) -> bool:
        """One turn of the loop: read, plan and compute a batch while the previous one is
        published; False when the loop is done (stopped)."""
        if self._stopping.is_set():
            await self._flush()
            return False
        if self.models is not None and self.models.incoming is not None:
            self._swap()  # between batches: none is being computed
        if not self._set_up:
            await self._setup()
        await hand_over(self)
        partitions = self.ownership.readable()
        if not partitions:  # standing by: the ownership rounds take one when they can
            await self._flush()
            self.redis_ok = self.ownership.round_ok
            await self.ownership.wait_for_change()
            return True
        if self.source.rereads_in_flight:
            await self._flush()  # it may drop (fence) partitions: read only what is still held
            partitions = self.ownership.readable()
            if not partitions:
                return True
        # a batch is published under the tenure its partitions were read in (no await between)
        tenure = {p: self.ownership.tenure.get(p) for p in partitions}
        # a busy stream's batch fills while the one before it is published
        entries = await self.source.read(
            partitions, block=self._in_flight is None, meanwhile=self._flush
        )
        self.redis_ok = True
        self._backoff = 0.1
        if not entries:
            await self._flush()
            return True
        await self.planner.restore(entries)
        batch = self.planner.prepare(entries, self.source.read_at, self.source.partition_of)
        batch.tenure = tenure
        computing = asyncio.ensure_future(
            compute(
                batch,
                self.engine,
                executor=self._executor,
                metrics=self.metrics,
                clock=self.clock,
                calibration=self.calibration,
            )
        )
        try:
            await self._flush()
        except BaseException:
            await asyncio.wait([computing])
            raise
        await computing
        self._in_flight = batch
        # the batch in flight's ticks are in its symbols' windows but not yet in their history:
        # those symbols stay; any other comes back from history when it ticks
        self._evict(protect={t.symbol for t in batch.accepted})
        return True

    async def _setup(self) -> None:
        """After a start or a failure: every held partition set up again, the windows rebuilt
        from history."""
        self.ownership.reset()
        # windows are rebuilt from history as their symbols' ticks arrive: after a failed batch
        # they are never trusted, nor the pending scores (which of its ticks landed is unknown)
        forget_symbols(self.planner.windows.symbols(), self.skill, self.paths, self.calibration)
        self.planner.reset()
        self.paths.reset()
        self._set_up = True

    async def _flush(self) -> None:
        """Publish the batch in flight, if any."""
        batch, self._in_flight = self._in_flight, None
        if batch is not None:
            await self._publish(batch)

    async def _publish(self, batch: Batch) -> None:
        # forecasts, history, dead letters and the ack land together or not at all, even if
        # we are cancelled mid-way: a crash before the publish redelivers, never loses
        # a partition not surely ours since the batch was read is not published (Ownership.stale)
        stale = stale_partitions(self.ownership, batch.parts, batch.tenure)
        batch.drop(stale)
        self.ownership.drop(stale)
        self._writing = asyncio.ensure_future(self.sink.write(batch))
        self.ownership.drop(await asyncio.shield(self._writing))  # the fence found them lost
        self.skill.record(batch.accepted, batch.forecasts)
        if self.calibration is not None:
            self.calibration.record(batch.accepted, batch.forecasts, batch.vols)
        self.paths.offer(batch)  # published: its symbols' newest windows may get a path
        self.metrics.queue_depth.set(0)
        self.metrics.symbols.set(len(self.planner.windows))

    async def _pause(self, seconds: float) -> None:
        """Sleep, but wake at once when stopping."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    def _swap(self) -> None:
        assert self.models is not None
        old = self.engine.version
        self.engine = self.models.swap(self.engine)
        self.planner.model_changed(self.engine.normalise)
        if self.calibration is not None and self.engine.version != old:
            self.calibration.model_changed(self.engine.version)

    def _evict(self, protect: set[str]) -> None:
        for symbols in self.planner.evict(self.clock(), protect).values():
            forget_symbols(symbols, self.skill, self.paths, self.calibration)


def forget_symbols(
    symbols: list[str], skill: SkillTracker, paths: PathLane, calibration: Calibration | None
) -> None:
    """What this replica tracks of ``symbols`` (evicted): their pending scores and paths."""
    if symbols:
        skill.forget(symbols)
        paths.forget(symbols)
        if calibration is not None:
            calibration.forget_symbols(symbols)


async def drain(tasks: list[asyncio.Task[None]], timeout_s: float) -> None:
    """Stop the daemon's tasks: the first (the consume loop) finishes the batch in flight within
    ``timeout_s`` while the lease is still renewed; the others are cancelled at once."""
    consume, *others = tasks
    lease_task = next((t for t in others if t.get_name() == "lease"), None)
    for task in others:
        if task is not lease_task:  # renewing goes on while the batch in flight drains
            task.cancel()
    try:
        await asyncio.wait_for(asyncio.shield(consume), timeout_s)
    except TimeoutError:
        log.warning(
            "shutdown timeout (%.1f s): abandoning the batch in flight; it will be redelivered",
            timeout_s,
        )
        consume.cancel()
    except Exception:
        pass  # the consume loop failed (logged there, a bug): stop the rest all the same
    if lease_task is not None:
        lease_task.cancel()
    await cancelled(tasks)


async def hand_over(daemon: Daemon) -> None:
    """At a batch boundary: publish, then give up the partitions over this replica's share and
    forget the lost ones; set up the partitions taken (with their interval calibration, of the
    model in use)."""
    own, source, planner, paths = daemon.ownership, daemon.source, daemon.planner, daemon.paths
    calibration, flush = daemon.calibration, daemon._flush
    lost = own.take_lost()
    giving = set(own.releasing)
    if lost or giving:
        await flush()  # the fence drops the share of a partition lost meanwhile
        if calibration is not None:
            await calibration.save(giving)  # the next holder goes on from it
            calibration.forget(giving | lost)
        await own.release(giving | lost)  # a lost one is released only if still ours
        source.forget(lost | giving)
        planner.forget_partitions(lost | giving)
        paths.forget_partitions(lost | giving)
    adopt = await source.setup(own.to_adopt(), daemon.sink.acked_high)
    if adopt:
        if calibration is not None:
            await calibration.adopt(adopt, daemon.engine.version)
        # another replica may have moved these on since this one last held them
        planner.forget_partitions(adopt)
        paths.forget_partitions(adopt)
        own.active |= adopt
        own.changed.clear()
        log.info(
            "consuming partitions %s as %s",
            ",".join(str(p) for p in sorted(own.active)),
            source.consumer,
        )


def redis_failed(
    exc: Exception, backoff: float, metrics: Metrics, say: RateLimitedLog, group: str
) -> tuple[bool, float, float]:
    """Say what Redis did; (whether Redis is up, how long to wait, the next backoff)."""
    if isinstance(exc, redis_errors.ResponseError):
        reason = refusal(exc)
        if reason == "NOGROUP":
            say(
                logging.WARNING,
                "nogroup",
                "consumer group %s on a partition stream is gone (%s); recreating it",
                group,
                str(exc)[:120],
            )
            return True, 0.1, backoff  # a short pause: a loop of DELs cannot spin us
        metrics.redis_refusals.labels(reason).inc()
        log.warning(
            "redis refused a command (%s); not ready, retrying in %.1f s", str(exc)[:160], backoff
        )
    else:
        metrics.redis_errors.inc()
        log.warning("redis unavailable (%s); retrying in %.1f s", type(exc).__name__, backoff)
    return False, backoff, min(backoff * 2, 5.0)
