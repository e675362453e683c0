"""The forecast sink: one MULTI/EXEC per batch with every write the batch makes, and the ack.

Forecasts (entry id = tick id), history, the symbol set, dead letters, the group's acknowledged
mark and XACK land together or not at all: a crash before EXEC redelivers the batch, after it the
batch is done. Every command Redis refused inside the transaction is counted and logged; a
forecast that was not written becomes a ``publish_failed`` dead letter.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from redis import exceptions as redis_errors
from redis.asyncio import Redis

from streamcast.daemon.batch import Batch, Stats
from streamcast.daemon.config import DaemonConfig
from streamcast.daemon.faults import REDIS_DOWN, refusal
from streamcast.keys import Keys
from streamcast.logs import RateLimitedLog
from streamcast.metrics import Metrics
from streamcast.wire import DeadLetter, HistoryEntry, id_key

log = logging.getLogger(__name__)

Op = tuple[str, str, str]  # (what, entry id, key) of each queued command


class Sink(Protocol):
    """What the consume loop calls on the place forecasts go."""

    acked_high: tuple[int, int]  # the newest tick id acknowledged by this process

    async def write(self, batch: Batch) -> None: ...


class ForecastSink:
    """Writes batches for one consumer group (a :class:`Sink`).

    ``publisher`` runs the transaction and must not retry by itself: a retried EXEC whose reply
    was lost would write its dead letters twice. ``redis`` (retrying) does the follow-ups.
    """

    def __init__(
        self,
        publisher: Redis,
        redis: Redis,
        keys: Keys,
        group: str,
        config: DaemonConfig,
        metrics: Metrics,
        stats: Stats,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.publisher = publisher
        self.redis = redis
        self.keys = keys
        self.group = group
        self.config = config
        self.metrics = metrics
        self.stats = stats
        self.clock = clock
        self.acked_high: tuple[int, int] = (0, 0)  # the newest id this process acknowledged
        self._say = RateLimitedLog(log)

    async def write(self, batch: Batch) -> None:
        """Publish the batch and acknowledge its entries in one transaction; then count it."""
        pipe = self.publisher.pipeline(transaction=True)
        ops, high = self._queue(pipe, batch, int(self.clock() * 1000))
        results = await pipe.execute(raise_on_error=False)
        await self._errors(ops, results, batch)
        if high is not None and high > self.acked_high:
            self.acked_high = high
        self._count(batch)  # after the write: only what is durable is counted

    def _queue(self, pipe: Any, batch: Batch, now_ms: int) -> tuple[list[Op], Any]:
        cfg, keys = self.config, self.keys
        ops: list[Op] = []
        for forecast in batch.forecasts:
            tick = forecast.tick
            key = keys.forecasts(tick.symbol)
            fields = forecast.encode(now_ms)
            pipe.xadd(key, fields, id=tick.id, maxlen=cfg.forecasts_maxlen, approximate=True)
            ops.append(("forecast", tick.id, key))
        for tick in batch.accepted:
            key = keys.history(tick.symbol)
            fields = HistoryEntry.of(tick).encode()
            pipe.xadd(key, fields, id=tick.id, maxlen=cfg.history_maxlen, approximate=True)
            ops.append(("history", tick.id, key))
        if batch.accepted:
            pipe.sadd(keys.symbols, *{t.symbol for t in batch.accepted})
            ops.append(("symbols", "", keys.symbols))
        for letter in batch.dead:
            pipe.xadd(keys.dead, letter.encode(), maxlen=cfg.dead_maxlen, approximate=True)
            ops.append(("dead", letter.tick_id, keys.dead))
        high = max((id_key(i) for i in batch.ack_ids), default=None)
        if high is not None and high > self.acked_high:
            pipe.set(keys.acked(self.group), f"{high[0]}-{high[1]}")
            ops.append(("acked", "", keys.acked(self.group)))
        pipe.xack(keys.ticks, self.group, *batch.ack_ids)
        ops.append(("ack", "", keys.ticks))
        return ops, high

    def _count(self, batch: Batch) -> None:
        m, forecasts = self.metrics, batch.forecasts
        withheld = {
            "next": sum(f.next is None for f in forecasts),
            "path": sum(f.path_withheld for f in forecasts),
        }
        # paths of forecasts made, not of due windows: a tick the engine failed on has none
        paths = sum(f.path is not None for f in forecasts) + withheld["path"]
        self.stats.batches += 1
        self.stats.forecasts += len(forecasts)
        self.stats.paths += paths
        self.stats.dead += len(batch.dead)
        self.stats.accepted += len(batch.accepted)
        m.batch_size.observe(len(batch.ack_ids))
        m.ticks.labels("forecast").inc(len(forecasts))
        m.ticks.labels("dead").inc(len(batch.dead))
        m.forecasts.labels("next").inc(len(forecasts) - withheld["next"])
        m.forecasts.labels("path").inc(paths - withheld["path"])
        for kind, n in withheld.items():
            if n:
                m.forecasts_withheld.labels(kind).inc(n)
                self._say(
                    logging.WARNING,
                    f"withheld-{kind}",
                    "the model's %s was not finite for %d ticks of this batch: published without "
                    "it, with a reason",
                    kind,
                    n,
                )
        for letter in batch.dead:
            m.dead_letters.labels(letter.reason).inc()
        done_ms = int(self.clock() * 1000)
        for tick in batch.ready:
            m.latency.observe(max(0.0, done_ms - id_key(tick.id)[0]) / 1000)
            if tick.ts is not None:
                m.event_latency.observe(max(0.0, done_ms - tick.ts) / 1000)
        if batch.computed_at:
            m.stage_seconds.labels("publish").observe(max(0.0, done_ms / 1000 - batch.computed_at))

    async def _errors(self, ops: list[Op], results: list[Any], batch: Batch) -> None:
        """Count and log every command of the transaction that Redis refused; none is skipped
        silently. A forecast that was not written becomes a dead letter saying why."""
        failed: list[tuple[str, str]] = []
        duplicates: list[tuple[str, str]] = []
        for (what, entry_id, key), result in zip(ops, results, strict=True):
            if not isinstance(result, Exception):
                continue
            text = str(result)
            reason = "duplicate_id" if "equal or smaller" in text else refusal(result).lower()
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
        failed += await self._never_written(duplicates)
        if failed:
            await self._publish_failed(failed, batch)

    async def _never_written(self, duplicates: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """Of forecasts refused as duplicate ids, those that are not in their stream. Most were
        written before (a redelivery after their history was lost): nothing to do. But a stray
        later entry in the stream refuses a forecast that was never written: say so."""
        if not duplicates:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for entry_id, key in duplicates:
            pipe.xrange(key, entry_id, entry_id)
        found = await pipe.execute(raise_on_error=False)
        return [
            (entry_id, f"{key} holds a later entry than this tick")
            for (entry_id, key), entry in zip(duplicates, found, strict=True)
            if not entry
        ]

    async def _publish_failed(self, failed: list[tuple[str, str]], batch: Batch) -> None:
        symbol_of = {t.id: t.symbol for t in batch.ready}
        pipe = self.redis.pipeline(transaction=False)
        for entry_id, text in failed:
            letter = DeadLetter(
                entry_id,
                "publish_failed",
                f"writing its forecast failed: {text[:200]}",
                {"symbol": symbol_of.get(entry_id, "")},
            )
            pipe.xadd(
                self.keys.dead, letter.encode(), maxlen=self.config.dead_maxlen, approximate=True
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
