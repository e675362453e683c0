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
import math
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from redis import exceptions as redis_errors
from redis.asyncio import Redis

from streamcast.keys import Keys, shard_of
from streamcast.lease import Lease
from streamcast.logs import RateLimitedLog
from streamcast.metrics import Metrics
from streamcast.skill import SkillTracker
from streamcast.windows import Windows
from streamcast.wire import (
    SYMBOL_RE,
    Tick,
    TickError,
    TickLimits,
    decode_tick,
    encode_dead_letter,
    encode_forecast,
    id_key,
    parse_price,
    parse_stream_reply,
)

if TYPE_CHECKING:
    from streamcast.registry import Registry
    from streamcast.retrain import Retrainer

log = logging.getLogger(__name__)

REDIS_DOWN = (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError)


class LeaseLost(Exception):
    """Another process holds this shard now: publish nothing more, stand by."""


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
    limits: TickLimits = field(default_factory=TickLimits)  # the edge: price range, ts ahead
    read_max_bytes: int = 16 * 1024 * 1024  # about the most one read pulls in
    lease_ttl_s: float = 10.0  # one live consumer per group; a dead one's lease lapses after this
    ticks_trim_interval_s: float = 10.0  # trim what every group has acknowledged (0: never)
    symbols_max: int = 100_000  # windows kept; the least recently ticked go first
    symbol_idle_s: float = 86_400.0  # forget a symbol after this long without a tick (0: never)


@dataclass
class Batch:
    """One read's worth of entries on its way through prepare -> compute -> publish."""

    ack_ids: list[str] = field(default_factory=list)
    dead: list[tuple[str, str, str, dict[Any, Any]]] = field(default_factory=list)
    accepted: list[Tick] = field(default_factory=list)  # appended to history
    ready: list[Tick] = field(default_factory=list)  # with a full window: forecast
    windows: list[np.ndarray] = field(default_factory=list)  # one per ready tick
    due: list[int] = field(default_factory=list)  # indices into ready that get a path
    failed: dict[int, str] = field(default_factory=dict)  # ready index -> why no forecast
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
        refused: str | None = None,
        publisher: Redis | None = None,
    ) -> None:
        self.redis = redis
        # the publish transaction goes through a client that never retries it by itself: a
        # retried EXEC whose reply was lost would write its dead letters twice
        self.publisher = publisher or redis
        self.engine = engine
        self.metrics = metrics
        self.keys = keys or Keys()
        self.config = config or DaemonConfig()
        self.clock = clock
        self.group = self.keys.group(self.config.shard_index, self.config.shard_count)
        self.lease = Lease(
            redis,
            self.keys.lease(self.group),
            self.config.consumer,
            int(self.config.lease_ttl_s * 1000),
        )
        self.windows = Windows(engine.seq_len)
        self.stats = Stats()
        self.last_path: dict[str, float] = {}
        self.redis_ok = False
        self.standby = False  # another live process consumes this shard; we wait to take over
        self.heartbeat = 0.0
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._executor: ThreadPoolExecutor | None = None
        self._read_pending = True
        self._started = False
        self._lease_held = False
        self._lease_lost = False
        self._lease_until = 0.0  # monotonic: past this, the lease may have lapsed unseen
        self._lease_epoch = 0  # bumped at each acquisition: a renewal of an older one is void
        self._pending_from = "0"  # where the next read of our pending entries starts
        self._acked_high: tuple[int, int] = (0, 0)  # the newest id this process acknowledged
        self._read_count = min(self.config.batch_max_size, 64)  # grows while entries are small
        self._say = RateLimitedLog(log)
        self._idle_checked = 0.0
        self.trim_rounds = 0  # times the trim ran (what it removed is in the metrics)
        # the model lifecycle: a registry to watch, how to load a version, what to retrain
        self.registry = registry
        self.loader = loader
        self.initial_model = initial_model
        self.retrainer = retrainer
        self.promoted_at: float | None = None
        self._next_engine: Engine | None = None
        self._refused = refused  # a version that failed to load: not retried
        self._ticks_since_retrain = 0
        self._read_at = 0.0
        self.limits = replace(self.config.limits, positive=engine.normalise)
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
            asyncio.create_task(self._keep_lease(), name="lease"),
        ]
        if self.config.ticks_trim_interval_s > 0:
            self._tasks.append(asyncio.create_task(self._trim_forever(), name="trim"))
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
        if lease_task is not None:
            lease_task.cancel()
        await _cancelled(self._tasks)
        self._tasks = []
        if self._lease_held:
            # a standby takes over at once instead of after the lease's time to live
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.lease.release(), 2.0)
            self._lease_held = False
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
        return self.redis_ok and self._started and not self.standby and not self._stopping.is_set()

    # -- setup -----------------------------------------------------------------------------

    async def _setup(self) -> bool:
        """Hold the shard's lease (standing by while another process does), make sure the group
        exists, take over what earlier consumers left pending; False if stopped meanwhile."""
        if not await self._hold_lease():
            return False
        self._lease_lost = False
        start = await self._group_start()
        try:
            await self.redis.xgroup_create(self.keys.ticks, self.group, id=start, mkstream=True)
            if start == "0":
                log.info("created consumer group %s on %s", self.group, self.keys.ticks)
            else:
                # destroyed (XGROUP DESTROY, DEL of the stream, FLUSHDB): resume after what was
                # acknowledged, so nothing is read twice and nothing unacknowledged is skipped
                self.metrics.recoveries.labels("group_recreated").inc()
                log.warning(
                    "consumer group %s on %s was gone: recreated it after %s, the newest tick "
                    "it had acknowledged",
                    self.group,
                    self.keys.ticks,
                    start,
                )
        except redis_errors.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        await self._take_over_pending()
        # windows are rebuilt from history as their symbols' ticks arrive (_restore_new): after
        # a failed batch they are never trusted
        self.windows = Windows(self.engine.seq_len)
        self.last_path.clear()
        self._read_pending = True
        self._pending_from = "0"
        return True

    async def _group_start(self) -> str:
        """Where a (re)created group starts: after the newest acknowledged tick, else at 0; never
        past the newest entry the stream has had (a hand-made far-future mark skips nothing)."""
        high = self._acked_high
        with contextlib.suppress(ValueError, redis_errors.ResponseError):
            stored = await self.redis.get(self.keys.acked(self.group))
            if stored:
                high = max(high, id_key(_str(stored)))
        if high == (0, 0):
            return "0"
        with contextlib.suppress(ValueError, redis_errors.ResponseError):
            info = await self.redis.xinfo_stream(self.keys.ticks)
            newest = id_key(_str(info.get("last-generated-id", b"0-0")))
            if newest != (0, 0):
                high = min(high, newest)
        return f"{high[0]}-{high[1]}"

    async def _hold_lease(self) -> bool:
        """Acquire the shard's lease, waiting as a standby while another live process holds it."""
        last_said = -1e9
        while not self._stopping.is_set():
            asked = time.monotonic()
            if await self.lease.acquire():
                self._lease_epoch += 1
                self._lease_until = asked + self._lease_valid_s()
                self._lease_held = True
                if self.standby:
                    log.warning("took over %s: this replica consumes it now", self.group)
                self.standby = False
                self.metrics.standby.set(0)
                return True
            self._lease_held = False
            holder = await self.lease.holder()
            if time.monotonic() - last_said >= 60.0:
                last_said = time.monotonic()
                log.warning(
                    "another process (%s) consumes %s with these settings: standing by, not "
                    "ready; this one takes over within %.0f s of that one stopping or dying",
                    holder,
                    self.group,
                    self.config.lease_ttl_s,
                )
            self.standby = True
            self.metrics.standby.set(1)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.config.lease_ttl_s / 3)
        return False

    def _lease_valid_s(self) -> float:
        """How long after a renewal was asked for the lease is surely still ours: its time to
        live less a margin for a blocking read that started just before."""
        ttl = self.config.lease_ttl_s
        return ttl - min(ttl / 3, self.config.read_block_ms / 1000 + 0.5)

    def _check_lease(self) -> None:
        """Raise LeaseLost unless the lease is surely ours: before every read and publish, so a
        process that stalled past its lease neither reads nor publishes for the shard."""
        if self._lease_lost or time.monotonic() > self._lease_until:
            raise LeaseLost(f"the lease of {self.group} is lost or may have lapsed")

    async def _keep_lease(self) -> None:
        """Renew the lease well inside its time to live; losing it stops publishing at once."""
        while True:
            await asyncio.sleep(self.config.lease_ttl_s / 3)
            if not self._lease_held:
                continue
            epoch, asked = self._lease_epoch, time.monotonic()
            try:
                kept = await self.lease.renew()
            except (*REDIS_DOWN, redis_errors.RedisError):
                continue  # the consume loop sees the outage too; it rebuilds and re-acquires
            except Exception:
                log.exception("renewing the lease of %s failed", self.group)
                continue
            if epoch != self._lease_epoch:
                continue  # re-acquired meanwhile: this renewal was of the old one
            if kept:
                self._lease_until = asked + self._lease_valid_s()
                continue
            self._lease_held = False
            self._lease_lost = True
            self.metrics.recoveries.labels("lease_lost").inc()
            log.error(
                "lost the lease of %s (another process holds it now, or it lapsed while this "
                "process stalled): reading and publishing nothing until it is held again",
                self.group,
            )

    async def _take_over_pending(self) -> None:
        """Claim, in id order, every entry earlier consumers of the group left unacknowledged,
        then drop those consumers; we hold the lease, so none of them is alive."""
        claimed = await self._claim(min_idle_ms=0)
        # a consumer is dropped only when it has nothing pending and has been idle past any
        # lease it could still think it holds (DELCONSUMER drops what it has pending)
        quiet_ms = int(self.config.lease_ttl_s * 1000) + self.config.read_block_ms + 1000
        for info in await self.redis.xinfo_consumers(self.keys.ticks, self.group):
            name = _str(info.get("name", b""))
            pending = int(info.get("pending", 0) or 0)
            idle = int(info.get("idle", 0) or 0)
            if name != self.config.consumer and not pending and idle >= quiet_ms:
                await self.redis.xgroup_delconsumer(self.keys.ticks, self.group, name)
        if claimed:
            log.info(
                "took over %d entries earlier consumers of %s left pending", claimed, self.group
            )

    async def _restore_new(self, entries: list[tuple[str, str, dict[Any, Any]]]) -> None:
        """Rebuild from history the window of each symbol in ``entries`` not yet held."""
        cfg = self.config
        symbols = set()
        for _, _, fields in entries:
            raw = fields.get(b"symbol")
            if isinstance(raw, bytes) and len(raw) <= 64:
                symbol = raw.decode("utf-8", "replace")
                if (
                    symbol not in self.windows
                    and SYMBOL_RE.fullmatch(symbol)
                    and shard_of(symbol, cfg.shard_count) == cfg.shard_index
                ):
                    symbols.add(symbol)
        if not symbols:
            return
        seq_len = self.windows.seq_len
        ordered = sorted(symbols)
        for start in range(0, len(ordered), 200):
            chunk = ordered[start : start + 200]
            pipe = self.redis.pipeline(transaction=False)
            for symbol in chunk:
                # twice the window: entries that break the rules are skipped, the rest fill it
                pipe.xrevrange(self.keys.history(symbol), count=2 * seq_len)
            replies = await pipe.execute(raise_on_error=False)
            now = self.clock()
            for symbol, history in zip(chunk, replies, strict=True):
                if isinstance(history, redis_errors.ResponseError):
                    # e.g. WRONGTYPE: someone wrote another kind of key there. The symbol fills
                    # its window from live ticks; the shard goes on
                    self.metrics.history_skipped.inc()
                    self._say(
                        logging.WARNING,
                        "history-unreadable",
                        "history of %s cannot be read (%s): its window fills from live ticks",
                        symbol,
                        str(history)[:120],
                    )
                    history = []
                self.windows.restore(symbol, self._valid_history(symbol, history), now)

    def _valid_history(self, symbol: str, entries: Any) -> list[tuple[str, float, int | None]]:
        """History entries, oldest first, by the edge's rules: an imported or hand-written bad
        price never reaches a window (it would fail the engine for the whole batch)."""
        rows: list[tuple[str, float, int | None]] = []
        bad: list[str] = []
        ahead_ms = int(self.clock() * 1000) + self.limits.ts_max_ahead_ms
        for raw_id, fields in reversed(entries):
            entry_id = _str(raw_id)
            try:
                if id_key(entry_id)[0] > ahead_ms:
                    raise ValueError("an id in the future")  # would make every live tick 'seen'
                price = parse_price(_str(fields.get(b"price", b"")), limits=self.limits)
            except (KeyError, ValueError) as exc:
                bad.append(f"{entry_id}: {exc}")
                continue
            ts_raw = fields.get(b"ts")
            ts = int(ts_raw) if ts_raw and len(ts_raw) <= 20 and ts_raw.isdigit() else None
            if ts is not None and ts - id_key(entry_id)[0] > self.limits.ts_max_ahead_ms:
                ts = None  # a bad event time is not the symbol's clock
            rows.append((entry_id, price, ts))
        if bad:
            self.metrics.history_skipped.inc(len(bad))
            self._say(
                logging.WARNING,
                "history-bad",
                "history of %s: skipped %d entries that break the edge's rules (first: %s)",
                symbol,
                len(bad),
                bad[0],
            )
        return rows

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
                    if not await self._setup():
                        return  # stopped while standing by
                    setup_done = True
                    log.info(
                        "consuming %s as %s in group %s",
                        self.keys.ticks,
                        self.config.consumer,
                        self.group,
                    )
                if self._read_pending and self._pending_from == "0" and pending is not None:
                    # reading our pending entries from the start would read the batch in
                    # flight again: publish it first
                    batch, pending = pending, None
                    await self._publish(batch)
                self._check_lease()
                entries = await self._read(block=pending is None)
                self.redis_ok = True
                backoff = 0.1
                if not entries:
                    if pending is not None:
                        batch, pending = pending, None
                        await self._publish(batch)
                    continue
                await self._restore_new(entries)
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
                # the pending batch's ticks are in its symbols' windows but not yet in their
                # history: those symbols stay; any other comes back from history when it ticks
                self._evict(self.clock(), protect={t.symbol for t in batch.accepted})
            except LeaseLost:
                # unacknowledged batches are read again by whoever holds the lease next
                pending = None
                setup_done = False
                self._lease_held = False
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), 0.1)
            except (*REDIS_DOWN, redis_errors.ResponseError) as exc:
                pending = None  # unacknowledged: it will be read again from the pending list
                self.redis_ok = False
                if isinstance(exc, redis_errors.ResponseError):
                    reason = _refusal(exc)
                    if reason == "NOGROUP":
                        pending, setup_done = None, False
                        self.redis_ok = True
                        self._say(
                            logging.WARNING,
                            "nogroup",
                            "consumer group %s on %s is gone (%s); recreating it",
                            self.group,
                            self.keys.ticks,
                            str(exc)[:120],
                        )
                        with contextlib.suppress(TimeoutError):  # a loop of DELs cannot spin us
                            await asyncio.wait_for(self._stopping.wait(), 0.1)
                        continue
                    self.metrics.redis_refusals.labels(reason).inc()
                    log.warning(
                        "redis refused a command (%s); not ready, retrying in %.1f s",
                        str(exc)[:160],
                        backoff,
                    )
                else:
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
            # our own pending entries, from a cursor: the batch read last is not acknowledged
            # yet while it is published, and must not be read (and dead-lettered) twice
            reply = await self.redis.xreadgroup(
                self.group,
                cfg.consumer,
                {self.keys.ticks: self._pending_from},
                count=self._read_count,
            )
            entries = self._sized(parse_stream_reply(reply))
            self._read_at = self.clock()
            if entries:
                self._pending_from = entries[-1][1]
                return entries
            self._read_pending = False
        reply = await self.redis.xreadgroup(
            self.group,
            cfg.consumer,
            {self.keys.ticks: ">"},
            count=self._read_count,
            block=cfg.read_block_ms if block else None,
        )
        entries = self._sized(parse_stream_reply(reply))
        self._read_at = self.clock()  # a batch's wait (the fill below, prepare) counts from here
        room = self._read_count - len(entries)
        if block and entries and room > 0 and cfg.batch_max_wait_ms > 0:
            # flush on size or deadline: give a small batch a moment to fill
            await asyncio.sleep(cfg.batch_max_wait_ms / 1000)
            more = await self.redis.xreadgroup(
                self.group, cfg.consumer, {self.keys.ticks: ">"}, count=room
            )
            entries += self._sized(parse_stream_reply(more))
        return entries

    def _sized(
        self, entries: list[tuple[str, str, dict[Any, Any]]]
    ) -> list[tuple[str, str, dict[Any, Any]]]:
        """Size the next read so that it pulls in about ``read_max_bytes`` at most: a stream of
        huge entries is read a few at a time, small ones a full batch at a time."""
        if entries:
            size = sum(
                len(k) + (len(v) if isinstance(v, bytes | str) else 8)
                for _, _, fields in entries
                for k, v in fields.items()
            )
            per_entry = max(1.0, size / len(entries))
            fits = max(1, int(self.config.read_max_bytes / per_entry))
            self._read_count = max(1, min(self.config.batch_max_size, fits, self._read_count * 2))
        return entries

    def _prepare(self, entries: list[tuple[str, str, dict[Any, Any]]]) -> Batch:
        """Validate entries, push prices into windows, and choose which windows get a path."""
        cfg = self.config
        batch = Batch(read_at=self._read_at or self.clock())
        ingest = self.metrics.stage_seconds.labels("ingest")
        now = self.clock()
        for _, entry_id, fields in entries:
            batch.ack_ids.append(entry_id)
            if not fields:  # deleted from the stream while pending
                continue
            try:
                tick = decode_tick(entry_id, fields, limits=self.limits)
            except TickError as exc:
                batch.dead.append((entry_id, exc.reason, exc.detail, fields))
                continue
            if shard_of(tick.symbol, cfg.shard_count) != cfg.shard_index:
                self.metrics.ticks.labels("foreign").inc()
                continue
            if self.windows.seen(tick.symbol, entry_id):
                self.stats.duplicates += 1
                self.metrics.ticks.labels("duplicate").inc()
                self._say(
                    logging.INFO,
                    "duplicate",
                    "skipped tick %s of %s: its symbol's window already holds it or a later "
                    "tick (redelivered after a restart or a recovery)",
                    entry_id,
                    tick.symbol,
                )
                continue
            last_ts = self.windows.get(tick.symbol).last_ts
            if tick.ts is not None and last_ts is not None and tick.ts < last_ts:
                detail = f"ts {tick.ts} is before the symbol's last {last_ts}"
                batch.dead.append((entry_id, "out_of_order", detail, fields))
                continue
            window = self.windows.push(tick.symbol, entry_id, tick.price, tick.ts, now)
            batch.accepted.append(tick)
            ingest.observe(max(0.0, batch.read_at - id_key(entry_id)[0] / 1000))
            if window is not None:
                batch.ready.append(tick)
                batch.windows.append(window)
            else:
                self.metrics.ticks.labels("filling").inc()

        # paths: only the newest window of a symbol in the batch (older ones are coalesced into
        # it), for symbols whose path is due, stalest first, at most paths_per_batch_max
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

        def run() -> tuple[np.ndarray, np.ndarray, dict[int, str], dict[int, str]]:
            nxt, failed = _rows_apart(engine.predict_next, windows, ())
            if path_windows is None:
                return nxt, np.empty((0, steps)), failed, {}
            paths, path_failed = _rows_apart(
                lambda w: engine.rollout(w, steps), path_windows, (steps,)
            )
            return nxt, paths, failed, path_failed

        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        batch.version = engine.version
        batch.compute_started = self.clock()
        batch.next_prices, batch.paths, batch.failed, path_failed = await loop.run_in_executor(
            self._executor, run
        )
        batch.computed_at = self.clock()
        for i, why in batch.failed.items():
            tick = batch.ready[i]
            batch.dead.append((tick.id, "unforecastable", why, {"symbol": tick.symbol}))
        for k in path_failed:
            batch.paths[k] = np.nan  # published without its path, with the reason
        seconds = time.perf_counter() - started
        self.metrics.engine_seconds.observe(seconds)
        self.metrics.stage_seconds.labels("wait").observe(
            max(0.0, batch.compute_started - batch.read_at)
        )
        self.metrics.stage_seconds.labels("compute").observe(seconds)

    async def _publish(self, batch: Batch) -> None:
        # forecasts, history, dead letters and the ack land together or not at all, even if
        # we are cancelled mid-way: a crash before EXEC redelivers, never loses
        self._check_lease()
        await asyncio.shield(self._write(batch))
        self.metrics.queue_depth.set(0)
        self.metrics.symbols.set(len(self.windows))

    async def _write(self, batch: Batch) -> None:
        cfg, keys = self.config, self.keys
        now_ms = int(self.clock() * 1000)
        version = batch.version or self.engine.version
        path_of = {i: batch.paths[k] for k, i in enumerate(batch.due)}
        pipe = self.publisher.pipeline(transaction=True)
        ops: list[tuple[str, str, str]] = []  # (what, entry id, key) of each queued command
        withheld = {"next": 0, "path": 0}
        for i, tick in enumerate(batch.ready):
            if i in batch.failed:
                continue  # a dead letter says why
            nxt, path = float(batch.next_prices[i]), path_of.get(i)
            reasons = []
            if not math.isfinite(nxt):
                withheld["next"] += 1
                reasons.append("next is not finite")
            if path is not None and not np.isfinite(path).all():
                withheld["path"] += 1
                reasons.append("path is not finite")
            fields: dict[Any, Any] = encode_forecast(
                tick,
                nxt if math.isfinite(nxt) else None,
                None if path is None or not np.isfinite(path).all() else path.tolist(),
                version,
                now_ms,
                reason="; ".join(reasons) or None,
            )
            key = keys.forecasts(tick.symbol)
            pipe.xadd(key, fields, id=tick.id, maxlen=cfg.forecasts_maxlen, approximate=True)
            ops.append(("forecast", tick.id, key))
        for tick in batch.accepted:
            fields = {"price": repr(tick.price)}
            if tick.ts is not None:
                fields["ts"] = str(tick.ts)
            key = keys.history(tick.symbol)
            pipe.xadd(key, fields, id=tick.id, maxlen=cfg.history_maxlen, approximate=True)
            ops.append(("history", tick.id, key))
        if batch.accepted:
            pipe.sadd(keys.symbols, *{t.symbol for t in batch.accepted})
            ops.append(("symbols", "", keys.symbols))
        for entry_id, reason, detail, original in batch.dead:
            pipe.xadd(
                keys.dead,
                encode_dead_letter(entry_id, reason, detail, original),
                maxlen=cfg.dead_maxlen,
                approximate=True,
            )
            ops.append(("dead", entry_id, keys.dead))
        high = max((id_key(i) for i in batch.ack_ids), default=None)
        if high is not None and high > self._acked_high:
            pipe.set(keys.acked(self.group), f"{high[0]}-{high[1]}")
            ops.append(("acked", "", keys.acked(self.group)))
        pipe.xack(keys.ticks, self.group, *batch.ack_ids)
        ops.append(("ack", "", keys.ticks))
        results = await pipe.execute(raise_on_error=False)
        await self._write_errors(ops, results, batch)
        if high is not None and high > self._acked_high:
            self._acked_high = high
        # metrics after the write: only what is durable is counted
        ready = len(batch.ready) - len(batch.failed)
        self.stats.batches += 1
        self.stats.forecasts += ready
        self.stats.paths += len(batch.due)
        self.stats.dead += len(batch.dead)
        self._ticks_since_retrain += len(batch.accepted)
        self.metrics.batch_size.observe(len(batch.ack_ids))
        self.metrics.ticks.labels("forecast").inc(ready)
        self.metrics.ticks.labels("dead").inc(len(batch.dead))
        self.metrics.forecasts.labels("next").inc(ready - withheld["next"])
        self.metrics.forecasts.labels("path").inc(len(batch.due) - withheld["path"])
        for kind, n in withheld.items():
            if n:
                self.metrics.forecasts_withheld.labels(kind).inc(n)
                self._say(
                    logging.WARNING,
                    f"withheld-{kind}",
                    "the model's %s was not finite for %d ticks of this batch: published without "
                    "it, with a reason",
                    kind,
                    n,
                )
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

    async def _write_errors(
        self, ops: list[tuple[str, str, str]], results: list[Any], batch: Batch
    ) -> None:
        """Count and log every command of the transaction that Redis refused; none is skipped
        silently. A forecast that was not written becomes a dead letter saying why."""
        failed: list[tuple[str, str]] = []
        duplicates: list[tuple[str, str]] = []
        for (what, entry_id, key), result in zip(ops, results, strict=True):
            if not isinstance(result, Exception):
                continue
            text = str(result)
            reason = "duplicate_id" if "equal or smaller" in text else _refusal(result).lower()
            self.metrics.write_errors.labels(what, reason).inc()
            if reason == "duplicate_id":
                if what == "forecast":
                    duplicates.append((entry_id, key))
                self._say(
                    logging.WARNING,
                    f"dup-{what}",
                    "%s %s: %s has a later entry",
                    what,
                    entry_id,
                    key,
                )
                continue
            self._say(
                logging.ERROR,
                f"err-{what}",
                "writing %s %s to %s failed: %s",
                what,
                entry_id,
                key,
                text,
            )
            if what == "forecast":
                failed.append((entry_id, text))
        if duplicates:
            # written before (a redelivery after its history was lost): nothing to do. But a
            # stray later entry in the stream refuses a forecast that was never written: say so
            pipe = self.redis.pipeline(transaction=False)
            for entry_id, key in duplicates:
                pipe.xrange(key, entry_id, entry_id)
            found = await pipe.execute(raise_on_error=False)
            for (entry_id, key), entry in zip(duplicates, found, strict=True):
                if not entry:
                    failed.append((entry_id, f"{key} holds a later entry than this tick"))
        if not failed:
            return
        symbol_of = {t.id: t.symbol for t in batch.ready}
        pipe = self.redis.pipeline(transaction=False)
        for entry_id, text in failed:
            pipe.xadd(
                self.keys.dead,
                encode_dead_letter(
                    entry_id,
                    "publish_failed",
                    f"writing its forecast failed: {text[:200]}",
                    {"symbol": symbol_of.get(entry_id, "")},
                ),
                maxlen=self.config.dead_maxlen,
                approximate=True,
            )
        try:
            await pipe.execute(raise_on_error=False)
        except (*REDIS_DOWN, redis_errors.RedisError) as exc:
            # the ticks are acknowledged already: the log is all that is left to say it
            log.error(
                "%d forecasts were not written and their dead letters neither (%s)",
                len(failed),
                exc,
            )

    # -- background --------------------------------------------------------------------------

    async def _housekeeping(self) -> None:
        """Heartbeat, stream lag, path age, trimming, forgetting idle symbols, and reclaiming
        entries of dead consumers."""
        cfg = self.config
        last_claim = 0.0
        while True:
            self.heartbeat = time.monotonic()
            try:
                if time.monotonic() - last_claim >= cfg.claim_interval_s and self.ready:
                    last_claim = time.monotonic()
                    if await self._claim(cfg.claim_idle_ms):
                        log.info("reclaimed entries left pending by another consumer")
                        self._pending_from = "0"
                        self._read_pending = True
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
            self.metrics.path_age.set(self._path_age(now))
            self.metrics.ready.set(1 if self.ready else 0)
            self.metrics.symbols.set(len(self.windows))
            await asyncio.sleep(1.0)

    def _path_age(self, now: float) -> float:
        """Age of the stalest path among symbols that ticked since their path was computed (a
        symbol that stopped ticking has a path of its newest window: not stale)."""
        stale = 0.0
        for symbol, at in self.last_path.items():
            if self.windows.touched(symbol) > at:
                stale = max(stale, now - at)
        return stale

    def _evict(self, now: float, protect: set[str]) -> None:
        """Forget symbols idle past ``symbol_idle_s`` and the least recently ticked beyond
        ``symbols_max`` (never one in ``protect``); a forgotten symbol's window is rebuilt from
        history at its next tick. Called between batches, from the consume loop."""
        cfg = self.config
        idle: list[str] = []
        if cfg.symbol_idle_s > 0 and now - self._idle_checked >= 1.0:
            self._idle_checked = now
            idle = self.windows.evict_idle(now - cfg.symbol_idle_s, protect)
        over = self.windows.evict_over(cfg.symbols_max, protect)
        for why, symbols in (("idle", idle), ("cap", over)):
            if not symbols:
                continue
            for symbol in symbols:
                self.last_path.pop(symbol, None)
            self.skill.forget(symbols)
            self.metrics.symbols_evicted.labels(why).inc(len(symbols))
            self._say(
                logging.INFO,
                f"evict-{why}",
                "forgot %d symbols (%s), e.g. %s; their windows come back from history at their "
                "next tick",
                len(symbols),
                "idle" if why == "idle" else f"more than {cfg.symbols_max}",
                symbols[0],
            )

    async def _claim(self, min_idle_ms: int) -> int:
        """XAUTOCLAIM entries idle past ``min_idle_ms`` into our pending list; how many."""
        start = "0-0"
        claimed = 0
        while True:
            reply = await self.redis.xautoclaim(
                self.keys.ticks,
                self.group,
                self.config.consumer,
                min_idle_ms,
                start_id=start,
                count=1000,
            )
            # [next start, claimed entries, deleted ids]; JUSTID would make redis-py drop the cursor
            start = _str(reply[0])
            claimed += len(reply[1])
            if start == "0-0":
                break
        return claimed

    async def _trim_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.ticks_trim_interval_s)
            if not self.redis_ok:
                continue
            try:
                await self._trim_ticks()
            except (*REDIS_DOWN, redis_errors.ResponseError) as exc:
                log.debug("trimming the ticks stream: %s", exc)

    async def _trim_ticks(self) -> None:
        """Delete the ticks every consumer group of the stream has acknowledged, and only those:
        the oldest entry still pending in some group, or the first after what some group has
        read, bounds the trim (XTRIM MINID, approximate: never past that bound). A shard group
        of this deployment that is missing (not created yet, or destroyed and about to be
        recreated) bounds it by its acknowledged mark, and stops it when it has none."""
        keys, cfg = self.keys, self.config
        self.trim_rounds += 1
        floor: tuple[int, int] | None = None
        present = set()
        for group in await self.redis.xinfo_groups(keys.ticks):
            name = _str(group.get("name", b""))
            present.add(name)
            last = id_key(_str(group.get("last-delivered-id", b"0-0")))
            need = (last[0], last[1] + 1)
            if int(group.get("pending", 0) or 0):
                summary = await self.redis.xpending(keys.ticks, name)
                lowest = summary.get("min") if isinstance(summary, dict) else None
                if lowest:
                    need = min(need, id_key(_str(lowest)))
            floor = need if floor is None else min(floor, need)
        for shard in range(cfg.shard_count):
            name = keys.group(shard, cfg.shard_count)
            if name in present:
                continue
            mark = await self.redis.get(keys.acked(name))
            if not mark:
                return
            acked = id_key(_str(mark))
            need = (acked[0], acked[1] + 1)
            floor = need if floor is None else min(floor, need)
        if floor is None or floor <= (0, 1):
            return
        trimmed = await self.redis.xtrim(
            keys.ticks, minid=f"{floor[0]}-{floor[1]}", approximate=True
        )
        if trimmed:
            self.metrics.ticks_trimmed.inc(int(trimmed))

    async def _measure_lag(self) -> None:
        groups = await self.redis.xinfo_groups(self.keys.ticks)
        for group in groups:
            if _str(group.get("name", b"")) == self.group:
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
            self.limits = replace(self.limits, positive=self.engine.normalise)
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


async def _cancelled(tasks: list[asyncio.Task[None]], rounds: int = 20) -> None:
    """Wait for cancelled tasks to end, cancelling again those that did not.

    A cancellation can be swallowed when it races a timeout inside a client call (asyncio's
    wait_for and timeout turn it into TimeoutError, which a retry loop then handles): awaiting
    such a task once more would wait forever, and the process would never stop.
    """
    pending = {t for t in tasks if not t.done()}
    for _ in range(rounds):
        if not pending:
            break
        _, pending = await asyncio.wait(pending, timeout=0.5)
        for task in pending:
            task.cancel()
    for task in tasks:
        if task.done() and not task.cancelled():
            task.exception()  # retrieved: a task that failed was logged where it failed
    if pending:
        log.error("tasks that would not stop: %s", ", ".join(t.get_name() for t in pending))


def _str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


_REFUSAL_CLASSES = (
    # redis-py turns these replies into classes and drops the code from the message
    (redis_errors.OutOfMemoryError, "OOM"),
    (redis_errors.ReadOnlyError, "READONLY"),
    (redis_errors.ExecAbortError, "EXECABORT"),
    (redis_errors.NoScriptError, "NOSCRIPT"),
)


def _refusal(exc: Exception) -> str:
    """The error code of Redis's reply (OOM, READONLY, NOGROUP, WRONGTYPE, ...), else ERR."""
    for cls, code in _REFUSAL_CLASSES:
        if isinstance(exc, cls):
            return code
    word = str(exc).split(" ", 1)[0]
    return word if word.isupper() and word.isalpha() and len(word) <= 16 else "ERR"


def _rows_apart(
    compute: Callable[[np.ndarray], np.ndarray], windows: np.ndarray, row_shape: tuple[int, ...]
) -> tuple[np.ndarray, dict[int, str]]:
    """Run ``compute`` on the batch; if it raises, row by row, so one symbol's bad window fails
    only its own forecast (NaN, with the reason by row index), never the batch."""
    try:
        return compute(windows), {}
    except Exception:
        pass
    out = np.full((len(windows), *row_shape), np.nan)
    failed: dict[int, str] = {}
    for i in range(len(windows)):
        try:
            out[i] = np.asarray(compute(windows[i : i + 1]))[0]
        except Exception as exc:
            failed[i] = f"{type(exc).__name__}: {exc}"
    if failed:
        log.error(
            "the engine failed on %d of %d windows (first: %s); their ticks are dead letters",
            len(failed),
            len(windows),
            next(iter(failed.values())),
        )
    return out, failed
