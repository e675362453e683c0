"""The tick source: one consumer of the shard's group on the ticks stream.

It (re)creates the group, takes over what earlier consumers left pending, reads (its own pending
entries first, from a cursor, then new ones), claims entries of dead consumers and measures the
group's lag. Reads are sized so that one pulls in about ``read_max_bytes`` at most.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from redis import exceptions as redis_errors
from redis.asyncio import Redis

from streamcast.daemon.config import DaemonConfig
from streamcast.keys import Keys
from streamcast.metrics import Metrics
from streamcast.wire import id_key, parse_stream_reply, text

log = logging.getLogger(__name__)

Entries = list[tuple[str, str, dict[Any, Any]]]  # (stream, entry id, fields)


class Source(Protocol):
    """What the consume loop and housekeeping call on a source of ticks."""

    consumer: str  # this process's name in the group
    read_at: float  # wall-clock time of the last read

    @property
    def rereads_in_flight(self) -> bool: ...

    async def setup(self, acked_high: tuple[int, int]) -> None: ...

    async def read(self, block: bool = True) -> Entries: ...

    async def reclaim(self) -> None: ...

    async def measure_lag(self) -> None: ...


class TickSource:
    """Reads the ticks stream as ``consumer`` of ``group`` (a :class:`Source`)."""

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        group: str,
        config: DaemonConfig,
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.group = group
        self.config = config
        self.metrics = metrics
        self.clock = clock
        self.consumer = config.consumer
        self.read_at = 0.0  # wall-clock time of the last read: a batch's wait counts from it
        self._read_pending = True
        self._pending_from = "0"  # where the next read of our pending entries starts
        self._read_count = min(config.batch_max_size, 64)  # grows while entries are small

    # -- the group -----------------------------------------------------------------------------

    async def setup(self, acked_high: tuple[int, int]) -> None:
        """Make sure the group exists (after ``acked_high`` if it was destroyed) and take over
        what earlier consumers left pending."""
        start = await self._group_start(acked_high)
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
        self.rewind()

    def rewind(self) -> None:
        """Read our pending entries again from the start (after a setup or a claim)."""
        self._read_pending = True
        self._pending_from = "0"

    @property
    def rereads_in_flight(self) -> bool:
        """Whether the next read starts over our pending list, which holds the batch being
        published: publish it first, or it is read (and dead-lettered) twice."""
        return self._read_pending and self._pending_from == "0"

    async def _group_start(self, acked_high: tuple[int, int]) -> str:
        """Where a (re)created group starts: after the newest acknowledged tick, else at 0; never
        past the newest entry the stream has had (a hand-made far-future mark skips nothing)."""
        high = acked_high
        with contextlib.suppress(ValueError, redis_errors.ResponseError):
            stored = await self.redis.get(self.keys.acked(self.group))
            if stored:
                high = max(high, id_key(text(stored)))
        if high == (0, 0):
            return "0"
        with contextlib.suppress(ValueError, redis_errors.ResponseError):
            info = await self.redis.xinfo_stream(self.keys.ticks)
            newest = id_key(text(info.get("last-generated-id", b"0-0")))
            if newest != (0, 0):
                high = min(high, newest)
        return f"{high[0]}-{high[1]}"

    async def _take_over_pending(self) -> None:
        """Claim, in id order, every entry earlier consumers of the group left unacknowledged,
        then drop those consumers; we hold the lease, so none of them is alive."""
        claimed = await self.claim(min_idle_ms=0)
        # a consumer is dropped only when it has nothing pending and has been idle past any
        # lease it could still think it holds (DELCONSUMER drops what it has pending)
        quiet_ms = int(self.config.lease_ttl_s * 1000) + self.config.read_block_ms + 1000
        for info in await self.redis.xinfo_consumers(self.keys.ticks, self.group):
            name = text(info.get("name", b""))
            pending = int(info.get("pending", 0) or 0)
            idle = int(info.get("idle", 0) or 0)
            if name != self.consumer and not pending and idle >= quiet_ms:
                await self.redis.xgroup_delconsumer(self.keys.ticks, self.group, name)
        if claimed:
            log.info(
                "took over %d entries earlier consumers of %s left pending", claimed, self.group
            )

    async def claim(self, min_idle_ms: int) -> int:
        """XAUTOCLAIM entries idle past ``min_idle_ms`` into our pending list; how many."""
        start = "0-0"
        claimed = 0
        while True:
            reply = await self.redis.xautoclaim(
                self.keys.ticks, self.group, self.consumer, min_idle_ms, start_id=start, count=1000
            )
            # [next start, claimed entries, deleted ids]; JUSTID would make redis-py drop the cursor
            start = text(reply[0])
            claimed += len(reply[1])
            if start == "0-0":
                break
        return claimed

    async def reclaim(self) -> None:
        """Take over entries a dead consumer of the group left pending for ``claim_idle_ms``."""
        if await self.claim(self.config.claim_idle_ms):
            log.info("reclaimed entries left pending by another consumer")
            self.rewind()

    async def measure_lag(self) -> None:
        for group in await self.redis.xinfo_groups(self.keys.ticks):
            if text(group.get("name", b"")) == self.group:
                lag = group.get("lag")
                if lag is not None:
                    self.metrics.stream_lag.set(int(lag))

    # -- reading -------------------------------------------------------------------------------

    async def read(self, block: bool = True) -> Entries:
        """Our pending entries first, then new ones (waiting ``batch_max_wait_ms`` for a small
        batch to fill when ``block``)."""
        cfg = self.config
        if self._read_pending:
            # our own pending entries, from a cursor: the batch read last is not acknowledged
            # yet while it is published, and must not be read (and dead-lettered) twice
            entries = await self._read_group(self._pending_from, self._read_count)
            self.read_at = self.clock()
            if entries:
                self._pending_from = entries[-1][1]
                return entries
            self._read_pending = False
        entries = await self._read_group(
            ">", self._read_count, cfg.read_block_ms if block else None
        )
        self.read_at = self.clock()  # a batch's wait (the fill below, prepare) counts from here
        room = self._read_count - len(entries)
        if block and entries and room > 0 and cfg.batch_max_wait_ms > 0:
            # flush on size or deadline: give a small batch a moment to fill
            await asyncio.sleep(cfg.batch_max_wait_ms / 1000)
            entries += await self._read_group(">", room)
        return entries

    async def _read_group(self, start: str, count: int, block: int | None = None) -> Entries:
        reply = await self.redis.xreadgroup(
            self.group, self.consumer, {self.keys.ticks: start}, count=count, block=block
        )
        return self._sized(parse_stream_reply(reply))

    def _sized(self, entries: Entries) -> Entries:
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
