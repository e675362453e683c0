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
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from redis import exceptions as redis_errors
from redis.asyncio import Redis

from streamcast.keys import Keys, shard_of
from streamcast.metrics import Metrics
from streamcast.schema import TickError, decode_tick, encode_forecast, id_key, parse_stream_reply
from streamcast.windows import Windows

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
    path_refresh_s: float = 0.0
    paths_per_batch_max: int = 64
    history_maxlen: int = 10_000
    forecasts_maxlen: int = 10_000
    dead_maxlen: int = 100_000
    claim_idle_ms: int = 30_000
    claim_interval_s: float = 10.0
    read_block_ms: int = 500


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
        self._in_flight = 0
        self._started = False

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
        backoff = 0.1
        setup_done = False
        while not self._stopping.is_set():
            try:
                if not setup_done:
                    await self._setup()
                    setup_done = True
                    log.info(
                        "consuming %s as %s in group %s",
                        self.keys.ticks,
                        self.config.consumer,
                        self.group,
                    )
                entries = await self._read()
                self.redis_ok = True
                backoff = 0.1
                if entries:
                    await self._process(entries)
            except REDIS_DOWN as exc:
                self.redis_ok = False
                self.metrics.redis_errors.inc()
                log.warning(
                    "redis unavailable (%s); retrying in %.1f s", type(exc).__name__, backoff
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), backoff)
                backoff = min(backoff * 2, 5.0)
                setup_done = False  # the batch may not have landed: rebuild windows from history

    async def _read(self) -> list[tuple[str, str, dict[Any, Any]]]:
        cfg = self.config
        if self._read_pending:
            reply = await self.redis.xreadgroup(
                self.group, cfg.consumer, {self.keys.ticks: "0"}, count=cfg.batch_max_size
            )
            entries = parse_stream_reply(reply)
            if entries:
                return entries
            self._read_pending = False
        reply = await self.redis.xreadgroup(
            self.group,
            cfg.consumer,
            {self.keys.ticks: ">"},
            count=cfg.batch_max_size,
            block=cfg.read_block_ms,
        )
        entries = parse_stream_reply(reply)
        if entries and len(entries) < cfg.batch_max_size and cfg.batch_max_wait_ms > 0:
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

    async def _process(self, entries: list[tuple[str, str, dict[Any, Any]]]) -> None:
        cfg = self.config
        positive = self.engine.normalise
        ack_ids: list[str] = []
        dead: list[tuple[str, str, str, dict[Any, Any]]] = []
        accepted = []  # ticks to append to history
        ready = []  # (tick, window) with a full window
        self._in_flight = len(entries)
        self.metrics.queue_depth.set(len(entries))
        for _, entry_id, fields in entries:
            ack_ids.append(entry_id)
            if not fields:  # deleted from the stream while pending
                continue
            try:
                tick = decode_tick(entry_id, fields, positive=positive)
            except TickError as exc:
                dead.append((entry_id, exc.reason, exc.detail, fields))
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
                dead.append(
                    (
                        entry_id,
                        "out_of_order",
                        f"ts {tick.ts} is before the symbol's last {last_ts}",
                        fields,
                    )
                )
                continue
            window = self.windows.push(tick.symbol, entry_id, tick.price, tick.ts)
            accepted.append(tick)
            if window is not None:
                ready.append((tick, window))
            else:
                self.metrics.ticks.labels("filling").inc()

        # paths: the newest window of each symbol whose path is due, stalest first, capped
        now = self.clock()
        newest: dict[str, int] = {}
        for i, (tick, _) in enumerate(ready):
            newest[tick.symbol] = i
        due = [
            i for s, i in newest.items() if now - self.last_path.get(s, 0.0) >= cfg.path_refresh_s
        ]
        due.sort(key=lambda i: self.last_path.get(ready[i][0].symbol, 0.0))
        due = due[: cfg.paths_per_batch_max]

        next_prices = np.empty(0)
        paths = np.empty((0, cfg.path_steps))
        if ready:
            started = time.perf_counter()
            next_prices, paths = await self._compute(
                np.stack([w for _, w in ready]),
                np.stack([ready[i][1] for i in due]) if due else None,
            )
            self.metrics.engine_seconds.observe(time.perf_counter() - started)
        path_of = {i: paths[k] for k, i in enumerate(due)}
        # publishing and acking must finish together even if we are cancelled mid-way
        await asyncio.shield(self._publish(ready, next_prices, path_of, accepted, dead, ack_ids))
        for i in due:
            self.last_path[ready[i][0].symbol] = now
        self._in_flight = 0
        self.metrics.queue_depth.set(0)
        self.metrics.symbols.set(len(self.windows))

    async def _compute(
        self, windows: np.ndarray, path_windows: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        engine, steps = self.engine, self.config.path_steps

        def run() -> tuple[np.ndarray, np.ndarray]:
            nxt = engine.predict_next(windows)
            paths = (
                engine.rollout(path_windows, steps)
                if path_windows is not None
                else np.empty((0, steps))
            )
            return nxt, paths

        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, run)

    async def _publish(
        self,
        ready: list[Any],
        next_prices: np.ndarray,
        path_of: dict[int, np.ndarray],
        accepted: list[Any],
        dead: list[tuple[str, str, str, dict[Any, Any]]],
        ack_ids: list[str],
    ) -> None:
        cfg, keys = self.config, self.keys
        now_ms = int(self.clock() * 1000)
        version = self.engine.version
        pipe = self.redis.pipeline(transaction=True)
        for i, (tick, _) in enumerate(ready):
            path = path_of.get(i)
            fields: dict[Any, Any] = encode_forecast(
                tick,
                float(next_prices[i]),
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
        for tick in accepted:
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
        if accepted:
            pipe.sadd(keys.symbols, *{t.symbol for t in accepted})
        for entry_id, reason, detail, fields in dead:
            letter: dict[Any, Any] = {"reason": reason, "detail": detail, "tick_id": entry_id}
            for k, v in fields.items():
                letter[b"field:" + (k if isinstance(k, bytes) else str(k).encode())] = v
            pipe.xadd(keys.dead, letter, maxlen=cfg.dead_maxlen, approximate=True)
        pipe.xack(keys.ticks, self.group, *ack_ids)
        results = await pipe.execute(raise_on_error=False)
        for result in results:
            if isinstance(result, Exception):
                if "equal or smaller" in str(result):
                    continue  # already written before a crash: the id keeps it exactly once
                raise result
        # metrics after the write: only what is durable is counted
        self.stats.batches += 1
        self.stats.forecasts += len(ready)
        self.stats.paths += len(path_of)
        self.stats.dead += len(dead)
        self.metrics.batch_size.observe(len(ack_ids))
        self.metrics.ticks.labels("forecast").inc(len(ready))
        self.metrics.ticks.labels("dead").inc(len(dead))
        self.metrics.forecasts.labels("next").inc(len(ready))
        self.metrics.forecasts.labels("path").inc(len(path_of))
        for _, reason, _, _ in dead:
            self.metrics.dead_letters.labels(reason).inc()
        for tick, _ in ready:
            self.metrics.latency.observe(max(0.0, now_ms - id_key(tick.id)[0]) / 1000)

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
            now = self.clock()
            ages = [now - self.last_path.get(s, now) for s in self.last_path]
            self.metrics.path_age.set(max(ages) if ages else 0.0)
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
                justid=True,
            )
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
