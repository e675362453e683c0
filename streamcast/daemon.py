"""The streaming service: read ticks with a consumer group, forecast in batches, publish and ack.

One consume loop handles a batch at a time, so every tick of a symbol is handled in stream order:

    read (XREADGROUP: own pending entries first, then new ones)
      -> validate each entry (bad ones become dead letters) and drop other shards' symbols
      -> push prices into the symbol windows
      -> engine, off the event loop: a 1-step forecast for every tick with a full window, and a
         multi-step path for the newest window of symbols whose path is due
      -> one MULTI/EXEC: forecasts (entry id = tick id), history, dead letters, XACK

A crash anywhere before EXEC redelivers the batch; after EXEC it is done. On restart the windows
are rebuilt from history, and a redelivered tick already in history is acknowledged without a
second forecast, so none is lost and none is doubled.

Beside the consume loop run housekeeping (heartbeat, lag, reclaiming), the model watcher (a new
current version in the registry is fetched, loaded and warmed off the event loop, then swapped in
between two batches: each forecast carries the version that computed it) and, when configured,
the retrain schedule.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from redis import exceptions as redis_errors
from redis.asyncio import Redis

from streamcast.keys import Keys, shard_of
from streamcast.metrics import Metrics
from streamcast.schema import (
    Tick,
    TickError,
    decode_tick,
    encode_forecast,
    id_key,
    parse_stream_reply,
)
from streamcast.skill import SkillTracker
from streamcast.windows import Windows

if TYPE_CHECKING:
    from streamcast.registry import Registry
    from streamcast.retrain import Retrainer

log = logging.getLogger(__name__)

REDIS_DOWN = (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError)


class Engine(Protocol):
    seq_len: int
    normalise: bool
    version: str

    def predict_next(self, prices: np.ndarray) -> np.ndarray: ...

    def rollout(self, prices: np.ndarray, steps: int = 50) -> np.ndarray: ...


@dataclass
class DaemonConfig:
    shard_index: int = 0
    shard_count: int = 1
    consumer: str = "replica-0"
    batch_max_size: int = 512
    batch_max_wait_ms: int = 20
    path_steps: int = 50
    path_refresh_s: float = 1.0
    paths_per_batch_max: int = 16
    history_maxlen: int = 10_000
    forecasts_maxlen: int = 10_000
    dead_maxlen: int = 100_000
    claim_idle_ms: int = 30_000
    claim_interval_s: float = 10.0
    read_block_ms: int = 500
    model_check_s: float = 30.0  # fallback poll of the registry when no announcement arrives
    retrain_interval_s: float = 0.0  # 0: no timed retrain
    retrain_after_ticks: int = 0  # 0: no retrain by count of ticks accepted on this replica
    skill_horizons: tuple[int, ...] = (1, 10, 50)
    skill_window: int = 2000  # scored forecasts per (horizon, version) in the rolling scores
    skill_symbols: tuple[str, ...] = ()  # symbols that get a labelled skill series of their own


@dataclass
class Batch:
    """One read's worth of entries on its way through prepare -> compute -> publish."""

    ack_ids: list[str] = field(default_factory=list)
    dead: list[tuple[str, str, str, dict[Any, Any]]] = field(default_factory=list)
    accepted: list[Tick] = field(default_factory=list)  # appended to history
    ready: list[Tick] = field(default_factory=list)  # with a full window: forecast
    windows: list[np.ndarray] = field(default_factory=list)  # one per ready tick
    due: list[int] = field(default_factory=list)  # indices into ready that get a path
    next_prices: np.ndarray = field(default_factory=lambda: np.empty(0))
    paths: np.ndarray = field(default_factory=lambda: np.empty((0, 0)))
    version: str = ""  # of the model that computed the forecasts
    read_at: float = 0.0  # wall-clock times of the stages, for the per-stage latency
    compute_started: float = 0.0
    computed_at: float = 0.0


@dataclass
class Stats:
    batches: int = 0
    forecasts: int = 0
    paths: int = 0
    dead: int = 0
    duplicates: int = 0


class Daemon:
    """The forecasting service for one shard. ``async with Daemon(...)`` starts and stops it."""

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
    ) -> None:
        self.redis = redis
        self.engine = engine
        self.metrics = metrics
        self.keys = keys or Keys()
        self.config = config or DaemonConfig()
        self.clock = clock
        self.group = self.keys.group(self.config.shard_index, self.config.shard_count)
        self.windows = Windows(engine.seq_len)
        self.stats = Stats()
        self.last_path: dict[str, float] = {}
        self.redis_ok = False
        self.heartbeat = 0.0
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._executor: ThreadPoolExecutor | None = None
        self._read_pending = True
        self._started = False
        # the model lifecycle: a registry to watch, how to load a version, what to retrain
        self.registry = registry
        self.loader = loader
        self.initial_model = initial_model
        self.retrainer = retrainer
        self.promoted_at: float | None = None
        self._next_engine: Engine | None = None
        self._refused: str | None = None  # a version that failed to load: not retried
        self._ticks_since_retrain = 0
        self._read_at = 0.0
        self.skill = SkillTracker(
            metrics,
            horizons=self.config.skill_horizons,
            window=self.config.skill_window,
            symbols=self.config.skill_symbols,
        )

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="engine")
        self.metrics.model_info.labels(self.engine.version).set(1)
        self._tasks = [
            asyncio.create_task(self._consume_forever(), name="consume"),
            asyncio.create_task(self._housekeeping(), name="housekeeping"),
        ]
        if self.registry is not None and self.loader is not None:
            self._tasks.append(asyncio.create_task(self._watch_models(), name="models"))
        cfg = self.config
        if self.retrainer is not None and (cfg.retrain_interval_s or cfg.retrain_after_ticks):
            self._tasks.append(asyncio.create_task(self._retrain_schedule(), name="retrain"))

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Stop reading, finish the batch in flight (publish and ack), then stop; idempotent."""
        if not self._started:
            return
        self._stopping.set()
        consume, *others = self._tasks
        for task in others:
            task.cancel()
        try:
            await asyncio.wait_for(asyncio.shield(consume), timeout_s)
        except TimeoutError:
            log.warning(
                "shutdown timeout (%.1f s): abandoning the batch in flight; it will be redelivered",
                timeout_s,
            )
            consume.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None
        if self._next_engine is not None:
            _close(self._next_engine)
            self._next_engine = None
        self.skill.publish()
        self._started = False
        log.info(
            "stopped: %d batches, %d forecasts, %d paths, %d dead letters, %d duplicates skipped",
            self.stats.batches,
            self.stats.forecasts,
            self.stats.paths,
            self.stats.dead,
            self.stats.duplicates,
        )

    async def __aenter__(self) -> Daemon:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def wait_stopped(self) -> None:
        if self._tasks:
            await asyncio.gather(self._tasks[0], return_exceptions=True)

    @property
    def ready(self) -> bool:
        return self.redis_ok and self._started and not self._stopping.is_set()

    # -- setup -----------------------------------------------------------------------------

    async def _setup(self) -> None:
        try:
            await self.redis.xgroup_create(self.keys.ticks, self.group, id="0", mkstream=True)
            log.info("created consumer group %s on %s", self.group, self.keys.ticks)
        except redis_errors.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        await self._restore_windows()
        self._read_pending = True

    async def _restore_windows(self) -> None:
        """Refill every owned symbol's window from its history, so a restart forecasts at once.

        History is written in the same transaction as the forecasts, so it is exactly what was
        processed: after a failed batch the windows are rebuilt from it, never trusted.
        """
        self.windows = Windows(self.engine.seq_len)
        members = await self.redis.smembers(self.keys.symbols)
        symbols = sorted(
            s
            for s in (m.decode() if isinstance(m, bytes) else str(m) for m in members)
            if shard_of(s, self.config.shard_count) == self.config.shard_index
        )
        seq_len = self.windows.seq_len
        for start in range(0, len(symbols), 200):
            chunk = symbols[start : start + 200]
            pipe = self.redis.pipeline(transaction=False)
            for symbol in chunk:
                pipe.xrevrange(self.keys.history(symbol), count=seq_len)
            replies = await pipe.execute()
            for symbol, entries in zip(chunk, replies, strict=True):
                rows = []
                for entry_id, fields in reversed(entries):
                    ts = fields.get(b"ts")
                    rows.append(
                        (entry_id.decode(), float(fields[b"price"]), int(ts) if ts else None)
                    )
                self.windows.restore(symbol, rows)
        self.metrics.symbols.set(len(self.windows))
        if symbols:
            log.info("restored windows of %d symbols from history", len(symbols))

    # -- the consume loop ------------------------------------------------------------------

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
        """Read, prepare and compute batch k+1 while batch k is being published."""
        backoff = 0.1
        setup_done = False
        pending: Batch | None = None  # computed, not yet published
        while True:
            try:
                if self._stopping.is_set():
                    if pending is not None:
                        await self._publish(pending)
                    return
                if self._next_engine is not None:
                    self._swap()  # between batches: none is being computed
                if not setup_done:
                    await self._setup()
                    setup_done = True
                    log.info(
                        "consuming %s as %s in group %s",
                        self.keys.ticks,
                        self.config.consumer,
                        self.group,
                    )
                entries = await self._read(block=pending is None)
                self.redis_ok = True
                backoff = 0.1
                if not entries:
                    if pending is not None:
                        batch, pending = pending, None
                        await self._publish(batch)
                    continue
                batch = self._prepare(entries)
                compute = asyncio.ensure_future(self._compute(batch))
                try:
                    if pending is not None:
                        previous, pending = pending, None
                        await self._publish(previous)
                except BaseException:
                    await asyncio.wait([compute])
                    raise
                await compute
                pending = batch
            except REDIS_DOWN as exc:
                pending = None  # unacknowledged: it will be read again from the pending list
                self.redis_ok = False
                self.metrics.redis_errors.inc()
                log.warning(
                    "redis unavailable (%s); retrying in %.1f s", type(exc).__name__, backoff
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), backoff)
                backoff = min(backoff * 2, 5.0)
                setup_done = False  # the batch may not have landed: rebuild windows from history
                if self._stopping.is_set():
                    return

    async def _read(self, block: bool = True) -> list[tuple[str, str, dict[Any, Any]]]:
        cfg = self.config
        if self._read_pending:
            reply = await self.redis.xreadgroup(
                self.group, cfg.consumer, {self.keys.ticks: "0"}, count=cfg.batch_max_size
            )
            entries = parse_stream_reply(reply)
            self._read_at = self.clock()
            if entries:
                return entries
            self._read_pending = False
        reply = await self.redis.xreadgroup(
            self.group,
            cfg.consumer,
            {self.keys.ticks: ">"},
            count=cfg.batch_max_size,
            block=cfg.read_block_ms if block else None,
        )
        entries = parse_stream_reply(reply)
        self._read_at = self.clock()  # a batch's wait (the fill below, prepare) counts from here
        if block and entries and len(entries) < cfg.batch_max_size and cfg.batch_max_wait_ms > 0:
            # flush on size or deadline: give a small batch a moment to fill
            await asyncio.sleep(cfg.batch_max_wait_ms / 1000)
            more = await self.redis.xreadgroup(
                self.group,
                cfg.consumer,
                {self.keys.ticks: ">"},
                count=cfg.batch_max_size - len(entries),
            )
            entries += parse_stream_reply(more)
        return entries

    def _prepare(self, entries: list[tuple[str, str, dict[Any, Any]]]) -> Batch:
        """Validate entries, push prices into windows, and choose which windows get a path."""
        cfg = self.config
        positive = self.engine.normalise
        batch = Batch(read_at=self._read_at or self.clock())
        ingest = self.metrics.stage_seconds.labels("ingest")
        for _, entry_id, fields in entries:
            batch.ack_ids.append(entry_id)
            if not fields:  # deleted from the stream while pending
                continue
            try:
                tick = decode_tick(entry_id, fields, positive=positive)
            except TickError as exc:
                batch.dead.append((entry_id, exc.reason, exc.detail, fields))
                continue
            if shard_of(tick.symbol, cfg.shard_count) != cfg.shard_index:
                self.metrics.ticks.labels("foreign").inc()
                continue
            if self.windows.seen(tick.symbol, entry_id):
                self.stats.duplicates += 1
                self.metrics.ticks.labels("duplicate").inc()
                continue
            last_ts = self.windows.get(tick.symbol).last_ts
            if tick.ts is not None and last_ts is not None and tick.ts < last_ts:
                detail = f"ts {tick.ts} is before the symbol's last {last_ts}"
                batch.dead.append((entry_id, "out_of_order", detail, fields))
                continue
            window = self.windows.push(tick.symbol, entry_id, tick.price, tick.ts)
            batch.accepted.append(tick)
            ingest.observe(max(0.0, batch.read_at - id_key(entry_id)[0] / 1000))
            if window is not None:
                batch.ready.append(tick)
                batch.windows.append(window)
            else:
                self.metrics.ticks.labels("filling").inc()

        # paths: only the newest window of a symbol in the batch (older ones are coalesced into
        # it), for symbols whose path is due, stalest first, at most paths_per_batch_max
        now = self.clock()
        newest = {tick.symbol: i for i, tick in enumerate(batch.ready)}
        due = [
            i for s, i in newest.items() if now - self.last_path.get(s, 0.0) >= cfg.path_refresh_s
        ]
        due.sort(key=lambda i: self.last_path.get(batch.ready[i].symbol, 0.0))
        batch.due = due[: cfg.paths_per_batch_max]
        for i in batch.due:
            self.last_path[batch.ready[i].symbol] = now
        self.metrics.queue_depth.set(len(entries))
        return batch

    async def _compute(self, batch: Batch) -> None:
        """Run the engine off the event loop; fills ``batch.next_prices`` and ``batch.paths``."""
        if not batch.ready:
            return
        engine, steps = self.engine, self.config.path_steps
        windows = np.stack(batch.windows)
        path_windows = windows[batch.due] if batch.due else None

        def run() -> tuple[np.ndarray, np.ndarray]:
            nxt = engine.predict_next(windows)
            paths = engine.rollout(path_windows, steps) if path_windows is not None else None
            return nxt, paths if paths is not None else np.empty((0, steps))

        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        batch.version = engine.version
        batch.compute_started = self.clock()
        batch.next_prices, batch.paths = await loop.run_in_executor(self._executor, run)
        batch.computed_at = self.clock()
        seconds = time.perf_counter() - started
        self.metrics.engine_seconds.observe(seconds)
        self.metrics.stage_seconds.labels("wait").observe(
            max(0.0, batch.compute_started - batch.read_at)
        )
        self.metrics.stage_seconds.labels("compute").observe(seconds)

    async def _publish(self, batch: Batch) -> None:
        # forecasts, history, dead letters and the ack land together or not at all, even if
        # we are cancelled mid-way: a crash before EXEC redelivers, never loses
        await asyncio.shield(self._write(batch))
        self.metrics.queue_depth.set(0)
        self.metrics.symbols.set(len(self.windows))

    async def _write(self, batch: Batch) -> None:
        cfg, keys = self.config, self.keys
        now_ms = int(self.clock() * 1000)
        version = batch.version or self.engine.version
        path_of = {i: batch.paths[k] for k, i in enumerate(batch.due)}
        pipe = self.redis.pipeline(transaction=True)
        for i, tick in enumerate(batch.ready):
            path = path_of.get(i)
            fields: dict[Any, Any] = encode_forecast(
                tick,
                float(batch.next_prices[i]),
                None if path is None else path.tolist(),
                version,
                now_ms,
            )
            pipe.xadd(
                keys.forecasts(tick.symbol),
                fields,
                id=tick.id,
                maxlen=cfg.forecasts_maxlen,
                approximate=True,
            )
        for tick in batch.accepted:
            fields = {"price": repr(tick.price)}
            if tick.ts is not None:
                fields["ts"] = str(tick.ts)
            pipe.xadd(
                keys.history(tick.symbol),
                fields,
                id=tick.id,
                maxlen=cfg.history_maxlen,
                approximate=True,
            )
        if batch.accepted:
            pipe.sadd(keys.symbols, *{t.symbol for t in batch.accepted})
        for entry_id, reason, detail, original in batch.dead:
            letter: dict[Any, Any] = {"reason": reason, "detail": detail, "tick_id": entry_id}
            for k, v in original.items():
                letter[b"field:" + (k if isinstance(k, bytes) else str(k).encode())] = v
            pipe.xadd(keys.dead, letter, maxlen=cfg.dead_maxlen, approximate=True)
        pipe.xack(keys.ticks, self.group, *batch.ack_ids)
        results = await pipe.execute(raise_on_error=False)
        for result in results:
            if isinstance(result, Exception):
                if "equal or smaller" in str(result):
                    continue  # already written before a crash: the id keeps it exactly once
                raise result
        # metrics after the write: only what is durable is counted
        self.stats.batches += 1
        self.stats.forecasts += len(batch.ready)
        self.stats.paths += len(batch.due)
        self.stats.dead += len(batch.dead)
        self._ticks_since_retrain += len(batch.accepted)
        self.metrics.batch_size.observe(len(batch.ack_ids))
        self.metrics.ticks.labels("forecast").inc(len(batch.ready))
        self.metrics.ticks.labels("dead").inc(len(batch.dead))
        self.metrics.forecasts.labels("next").inc(len(batch.ready))
        self.metrics.forecasts.labels("path").inc(len(batch.due))
        for _, reason, _, _ in batch.dead:
            self.metrics.dead_letters.labels(reason).inc()
        done_ms = int(self.clock() * 1000)
        for tick in batch.ready:
            self.metrics.latency.observe(max(0.0, done_ms - id_key(tick.id)[0]) / 1000)
            if tick.ts is not None:
                self.metrics.event_latency.observe(max(0.0, done_ms - tick.ts) / 1000)
        if batch.computed_at:
            self.metrics.stage_seconds.labels("publish").observe(
                max(0.0, done_ms / 1000 - batch.computed_at)
            )
        self.skill.record(batch)

    # -- background --------------------------------------------------------------------------

    async def _housekeeping(self) -> None:
        """Heartbeat, stream lag, path age, and reclaiming entries of dead consumers."""
        last_claim = 0.0
        while True:
            self.heartbeat = time.monotonic()
            try:
                if time.monotonic() - last_claim >= self.config.claim_interval_s and self.redis_ok:
                    last_claim = time.monotonic()
                    await self._claim()
                await self._measure_lag()
            except REDIS_DOWN:
                pass
            except redis_errors.ResponseError as exc:
                log.debug("housekeeping: %s", exc)
            except Exception:
                # keep the heartbeat and metrics going, but make the fault visible
                log.exception("housekeeping failed")
            now = self.clock()
            self.skill.publish()
            if self.promoted_at is not None:
                self.metrics.model_age.set(max(0.0, time.time() - self.promoted_at))
            self.metrics.path_age.set(max((now - t for t in self.last_path.values()), default=0.0))
            self.metrics.ready.set(1 if self.ready else 0)
            await asyncio.sleep(1.0)

    async def _claim(self) -> None:
        """XAUTOCLAIM entries idle past claim_idle_ms (a consumer that died) into our pending list."""
        start = "0-0"
        claimed = 0
        while True:
            reply = await self.redis.xautoclaim(
                self.keys.ticks,
                self.group,
                self.config.consumer,
                self.config.claim_idle_ms,
                start_id=start,
                count=1000,
            )
            # [next start, claimed entries, deleted ids]; JUSTID would make redis-py drop the cursor
            start = reply[0].decode() if isinstance(reply[0], bytes) else str(reply[0])
            claimed += len(reply[1])
            if start == "0-0":
                break
        if claimed:
            log.info("reclaimed %d entries left pending by another consumer", claimed)
            self._read_pending = True

    async def _measure_lag(self) -> None:
        groups = await self.redis.xinfo_groups(self.keys.ticks)
        for group in groups:
            name = group.get("name", b"")
            if (name.decode() if isinstance(name, bytes) else name) == self.group:
                lag = group.get("lag")
                if lag is not None:
                    self.metrics.stream_lag.set(int(lag))

    # -- the model lifecycle -------------------------------------------------------------------

    def _swap(self) -> None:
        new, self._next_engine = self._next_engine, None
        assert new is not None
        old_version = self.engine.version
        apply = getattr(new, "apply", None)
        if apply is not None:
            # staged weights for the running engine: its compiled programs serve the new version
            if getattr(new, "engine", None) is not self.engine:
                log.warning("dropping weights staged for an engine no longer serving")
                return
            apply()
        else:
            old, self.engine = self.engine, new
            _close(old)
        self.metrics.model_info.clear()
        self.metrics.model_info.labels(self.engine.version).set(1)
        self.metrics.model_swaps.inc()
        log.info("serving model %s (was %s)", self.engine.version, old_version)

    async def _watch_models(self) -> None:
        """Load each new current version (announced, or found by the periodic check)."""
        assert self.registry is not None
        pubsub: Any = None
        while True:
            try:
                if pubsub is None:
                    pubsub = self.registry.redis.pubsub()
                    await pubsub.subscribe(self.keys.model_channel)
                await self._check_model()
                await pubsub.get_message(
                    ignore_subscribe_messages=True, timeout=self.config.model_check_s
                )
            except asyncio.CancelledError:
                if pubsub is not None:
                    with contextlib.suppress(Exception):
                        await pubsub.aclose()
                raise
            except (*REDIS_DOWN, redis_errors.RedisError) as exc:
                if pubsub is not None:
                    with contextlib.suppress(Exception):
                        await pubsub.aclose()
                    pubsub = None
                log.debug("model watcher: %s", exc)
                await asyncio.sleep(min(5.0, self.config.model_check_s))
            except Exception:
                log.exception("model watcher failed; checking again later")
                await asyncio.sleep(self.config.model_check_s)

    async def _check_model(self) -> None:
        from streamcast.model import ModelError

        assert self.registry is not None and self.loader is not None
        current = await self.registry.current()
        if current is None:
            if self.initial_model is not None:
                await self.registry.ensure_current(self.initial_model)
            return
        self.promoted_at = current.promoted_at
        waiting = self._next_engine.version if self._next_engine is not None else None
        version = current.version
        if version in (self.engine.version, waiting, self._refused):
            return
        log.info("model %s was promoted (%s): loading it", version, current.reason)
        started = time.perf_counter()
        serving, loader = self.engine, self.loader

        def prepare(path: Path) -> Engine:
            # same architecture: only the weights change, no compile; else a new engine
            stage = getattr(serving, "stage", None)
            staged = stage(path) if stage is not None else None
            return staged if staged is not None else loader(path)

        try:
            path = await self.registry.fetch(version)
            engine = await _in_background(prepare, path)
        except ModelError as exc:
            self._refuse(version, "invalid", str(exc))
            return
        except (*REDIS_DOWN, redis_errors.RedisError):
            raise
        except Exception as exc:
            log.exception("loading model %s failed", version)
            self._refuse(version, "error", f"{type(exc).__name__}: {exc}")
            return
        if engine.seq_len != self.windows.seq_len:
            _close(engine)
            self._refuse(
                version,
                "mismatch",
                f"window length {engine.seq_len}, but this replica keeps {self.windows.seq_len}",
            )
            return
        if self._next_engine is not None:
            _close(self._next_engine)
        self._next_engine = engine
        how = "weights staged" if hasattr(engine, "apply") else "loaded and warmed"
        log.info("model %s %s in %.1f s", version, how, time.perf_counter() - started)

    def _refuse(self, version: str, reason: str, detail: str) -> None:
        self._refused = version
        self.metrics.model_load_failures.labels(reason).inc()
        log.error("refusing model %s, still serving %s: %s", version, self.engine.version, detail)

    async def _retrain_schedule(self) -> None:
        """Retrain every ``retrain_interval_s`` and/or after ``retrain_after_ticks`` ticks."""
        assert self.retrainer is not None
        cfg = self.config
        last = time.monotonic()
        while True:
            await asyncio.sleep(1.0)
            timed = cfg.retrain_interval_s > 0 and time.monotonic() - last >= cfg.retrain_interval_s
            counted = (
                cfg.retrain_after_ticks > 0 and self._ticks_since_retrain >= cfg.retrain_after_ticks
            )
            if not (timed or counted) or not self.redis_ok:
                continue
            last = time.monotonic()
            self._ticks_since_retrain = 0
            try:
                await self.retrainer.run_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # run_once reports its own failures; this would be a bug
                log.exception("retrain schedule: unexpected failure")


LOAD_NICE = 10  # loading and compiling a new version yields the cores to serving


async def _in_background(load: Callable[[Path], Engine], path: Path) -> Engine:
    """Load (and compile) a model on a fresh thread at a lower CPU priority.

    On Linux a thread has its own nice value and the threads it starts inherit it, so the compile
    and the engine's warm-up workers run behind serving. The warm-up workers are stopped afterwards
    (``close``); the engine starts new ones, at normal priority, from the thread that serves.
    """

    def run() -> Engine:
        with contextlib.suppress(OSError, AttributeError):  # per-thread nice: Linux only
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), LOAD_NICE)
        engine = load(path)
        _close(engine)
        return engine

    executor = ThreadPoolExecutor(1, thread_name_prefix="model-load")
    try:
        return await asyncio.get_running_loop().run_in_executor(executor, run)
    finally:
        executor.shutdown(wait=False)


def _close(engine: Any) -> None:
    close = getattr(engine, "close", None)
    if close is not None:
        close()
