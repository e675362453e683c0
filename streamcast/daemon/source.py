"""The tick source: this replica's consumer of the group on the partition streams it owns.

For each partition it is given it (re)creates the group, takes over what earlier consumers left
pending, reads (its own pending entries first, from a cursor, then new ones), claims entries of
dead consumers and measures the group's lag. On one Redis server one XREADGROUP reads every
partition; on a Redis Cluster (a command touches one slot) one pipelined read per partition.
Reads are sized so that one pulls in about ``read_max_bytes`` at most.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from redis import exceptions as redis_errors
from redis.asyncio import Redis

from streamcast.connect import is_cluster
from streamcast.daemon.config import DaemonConfig
from streamcast.daemon.faults import REDIS_DOWN
from streamcast.keys import Keys
from streamcast.logs import RateLimitedLog
from streamcast.metrics import Metrics
from streamcast.tasks import settled
from streamcast.wire import id_key, parse_stream_reply, text

log = logging.getLogger(__name__)

CLAIM_PAGE = 1000  # pending entries' ids one XPENDING lists

Entries = list[tuple[str, str, dict[Any, Any]]]  # (stream, entry id, fields)
# conflating, a read may hold this many batches' worth: each symbol's newest tick is forecast, so
# a backlog of many ticks a symbol costs one forecast a symbol, not one a tick
CONFLATE_READ_FACTOR = 8
CLUSTER_POLL_MS = 5  # on a cluster, how long an empty sweep of the partitions waits


def read_cap(config: DaemonConfig) -> int:
    """The most entries one read asks for: a batch, or ``CONFLATE_READ_FACTOR`` batches when
    conflating (it forecasts at most one tick a symbol of them). A read of several partitions
    may return up to one more per partition (COUNT is per stream, rounded up)."""
    return config.batch_max_size * (CONFLATE_READ_FACTOR if config.conflate else 1)


class Source(Protocol):
    """What the consume loop and housekeeping call on a source of ticks."""

    consumer: str  # this process's name in the group
    read_at: float  # wall-clock time of the last read

    @property
    def rereads_in_flight(self) -> bool: ...

    fill: FillWait  # how long reads wait to fill; how loaded the stream is

    def partition_of(self, stream: str) -> int: ...

    async def setup(
        self, partitions: set[int], acked_high: dict[int, tuple[int, int]]
    ) -> set[int]: ...

    def forget(self, partitions: set[int]) -> None: ...

    async def read(
        self,
        partitions: list[int],
        block: bool = True,
        meanwhile: Callable[[], Awaitable[None]] | None = None,
    ) -> Entries: ...

    async def reclaim(self, partitions: list[int]) -> None: ...

    async def measure_lag(self, partitions: list[int]) -> None: ...


class FillWait:
    """How long a read waits for its batch to fill: flush on size or deadline, as serving
    systems batch, and not at all when the stream is nearly empty (batching would not pay)."""

    def __init__(self, config: DaemonConfig, clock: Callable[[], float] = time.time) -> None:
        self.config, self.clock = config, clock
        self.rate = 0.0  # new entries a second, as the reads found them (a moving average)
        self.full = False  # whether the last read came back full
        self._last = 0.0

    def wait(self, found: int, count: int) -> float:
        """Seconds a read of up to ``count`` entries that found ``found`` waits for more: none
        below ``batch_fill_min`` or at ``count``; else up to ``batch_max_wait_ms``, no longer
        than the arrival rate needs to fill the read."""
        cfg = self.config
        now = self.clock()
        elapsed, self._last = now - self._last, now
        if elapsed > 0:
            self.rate = 0.8 * self.rate + 0.2 * found / elapsed
        room = count - found
        # a batch's worth is full even when a conflating read may take more (ticks are waiting)
        self.full = room <= 0 or found >= cfg.batch_max_size
        if found < cfg.batch_fill_min or self.full or cfg.batch_max_wait_ms <= 0:
            return 0.0
        wait = cfg.batch_max_wait_ms / 1000
        return min(wait, room / self.rate) if self.rate > 0 else wait

    def load(self) -> str:
        """What the reads found lately: ``quiet`` (about a tick a second or fewer), ``flowing``,
        or ``backlogged`` (the last read came back full: ticks are waiting)."""
        if self.full:
            return "backlogged"
        return "flowing" if self.rate >= 1.0 else "quiet"


class TickSource:
    """Reads the partition streams as ``consumer`` of the group (a :class:`Source`)."""

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        config: DaemonConfig,
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
        reader: Redis | None = None,
    ) -> None:
        self.redis = redis
        self.cluster = is_cluster(redis)
        # the reads' client, one that never retries by itself: a read retried after its reply
        # was lost reads on past the entries it delivered (they wait unread in our pending list
        # until the reclaim); an outage instead sets the partitions up again, pending first. Not
        # on a cluster: redis-py's cluster pipeline refreshes its slot map only when it retries,
        # so one that never retries would read from a lost master for ever
        self.reader = reader if reader is not None and not self.cluster else redis
        self.keys = keys
        self.group = keys.group
        self.config = config
        self.metrics = metrics
        self.clock = clock
        self.consumer = config.consumer
        self.read_at = 0.0  # wall-clock time of the last read: a batch's wait counts from it
        self._partition = {keys.ticks(p): p for p in range(keys.partitions)}
        self._pending_from: dict[int, str] = {}  # partitions whose own pending entries come first
        self._lagged: set[int] = set()  # partitions whose lag is exported
        self._rewound: set[int] = set()  # rewound while a pending read was in flight
        self._claiming = asyncio.Lock()  # one claim at a time: each deleted entry counted once
        self._read_count = min(config.batch_max_size, 64)  # grows while entries are small
        self._retry_at: dict[int, float] = {}  # partitions whose set-up failed: when to retry
        self._watch_until: dict[int, float] = {}  # taken lately: look for strays until then
        self.fill = FillWait(config, clock)
        self._say = RateLimitedLog(log)

    def partition_of(self, stream: str) -> int:
        return self._partition[stream]

    # -- the group -----------------------------------------------------------------------------

    async def setup(self, partitions: set[int], acked_high: dict[int, tuple[int, int]]) -> set[int]:
        """Make sure the group exists on each partition stream (after its acknowledged mark if
        it was destroyed) and take over what earlier consumers left pending there; the
        partitions set up. One whose ticks key is not a stream (WRONGTYPE) is not: it is said,
        tried again a second later, and the others are consumed meanwhile."""
        done = set()
        for p in sorted(partitions):
            if time.monotonic() < self._retry_at.get(p, 0.0):
                continue
            try:
                await self._setup_one(p, acked_high.get(p, (0, 0)))
            except redis_errors.ResponseError as exc:
                if "WRONGTYPE" not in str(exc):
                    raise
                self._retry_at[p] = time.monotonic() + 1.0
                self._say(
                    logging.ERROR,
                    f"wrongtype-{p}",
                    "partition %d is not consumed: %s is not a stream (%s)",
                    p,
                    self.keys.ticks(p),
                    str(exc)[:120],
                )
                continue
            self._retry_at.pop(p, None)
            self._pending_from[p] = "0"
            # whoever held it may read on until its local deadline: under a lease's TTL
            self._watch_until[p] = time.monotonic() + self.config.lease_ttl_s + 1.0
            done.add(p)
        return done

    async def _setup_one(self, partition: int, acked_high: tuple[int, int]) -> None:
        stream = self.keys.ticks(partition)
        start, mark = await group_start(self.redis, self.keys, partition, acked_high)
        try:
            await self.redis.xgroup_create(stream, self.group, id=start, mkstream=True)
            if mark is None:
                log.info("created consumer group %s on %s", self.group, stream)
            else:
                # destroyed (XGROUP DESTROY, DEL of the stream, FLUSHDB): resume after what was
                # acknowledged, so nothing unacknowledged is skipped (what is read again is in
                # history: acknowledged without a second forecast)
                self.metrics.recoveries.labels("group_recreated").inc()
                log.warning(
                    "consumer group %s on %s was gone: recreated it %s",
                    self.group,
                    stream,
                    f"after {start}, the newest tick it had acknowledged"
                    if start == mark
                    else f"from the stream's start: the acknowledged mark {mark} is not of "
                    "this stream (beyond every id it has had: made by hand, or the stream anew)",
                )
        except redis_errors.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        await self._take_over_pending(partition)

    def forget(self, partitions: set[int]) -> None:
        for p in partitions:
            self._pending_from.pop(p, None)
            self._watch_until.pop(p, None)

    def rewind(self, partitions: list[int]) -> None:
        """Read our pending entries of ``partitions`` again from the start (after a claim; a
        pending read in flight does not move their cursors on)."""
        for p in partitions:
            self._pending_from[p] = "0"
        self._rewound |= set(partitions)

    @property
    def rereads_in_flight(self) -> bool:
        """Whether the next read starts over a pending list, which holds the batch being
        published: publish it first, or it is read (and dead-lettered) twice."""
        return "0" in self._pending_from.values()

    async def _take_over_pending(self, partition: int) -> None:
        """Claim, in id order, every entry earlier consumers of the group left unacknowledged
        on the partition, then drop those consumers; we hold its lease, so none of them is
        consuming it (a replica that lost it publishes nothing for it: the fence)."""
        stream = self.keys.ticks(partition)
        claimed = await self._claim(stream, min_idle_ms=0)
        # a consumer is dropped only when it has nothing pending and has been idle past any
        # lease it could still think it holds (DELCONSUMER drops what it has pending)
        quiet_ms = int(self.config.lease_ttl_s * 1000) + self.config.read_block_ms + 1000
        for info in await self.redis.xinfo_consumers(stream, self.group):
            name = text(info.get("name", b""))
            pending = int(info.get("pending", 0) or 0)
            idle = int(info.get("idle", 0) or 0)
            if name != self.consumer and not pending and idle >= quiet_ms:
                await self.redis.xgroup_delconsumer(stream, self.group, name)
        if claimed:
            log.info("took over %d entries earlier consumers of %s left pending", claimed, stream)

    async def _claim(self, stream: str, min_idle_ms: int) -> int:
        async with self._claiming:
            args = (stream, self.group, self.consumer, min_idle_ms, self.metrics)
            return await claim(self.redis, *args)

    async def reclaim(self, partitions: list[int]) -> None:
        """Take over entries left pending for ``claim_idle_ms``: by a consumer that died, or by
        this one (a read whose reply was lost and which the client retried)."""
        for p in partitions:
            if await self._claim(self.keys.ticks(p), self.config.claim_idle_ms):
                log.info(
                    "reclaimed entries of partition %d left pending (a consumer gone, or a lost reply)",
                    p,
                )
                self.rewind([p])

    async def measure_lag(self, partitions: list[int]) -> None:
        """Each owned partition's lag, and their sum; the lag of a partition no longer owned is
        no longer exported (its next holder's to say)."""
        for p in self._lagged - set(partitions):
            with contextlib.suppress(KeyError):
                self.metrics.partition_lag.remove(str(p))
        self._lagged = set(partitions)
        if not partitions:
            self.metrics.stream_lag.set(0)
            return
        pipe = self.redis.pipeline(transaction=False)
        for p in partitions:
            pipe.xinfo_groups(self.keys.ticks(p))
        replies = await pipe.execute(raise_on_error=False)
        total = 0
        for p, groups in zip(partitions, replies, strict=True):
            if isinstance(groups, Exception):
                continue
            for group in groups:
                if text(group.get("name", b"")) == self.group and group.get("lag") is not None:
                    lag = int(group["lag"])
                    total += lag
                    self.metrics.partition_lag.labels(str(p)).set(lag)
        self.metrics.stream_lag.set(total)

    # -- reading -------------------------------------------------------------------------------

    async def read(
        self,
        partitions: list[int],
        block: bool = True,
        meanwhile: Callable[[], Awaitable[None]] | None = None,
    ) -> Entries:
        """Our pending entries of ``partitions`` first, then new ones. ``meanwhile`` (the publish
        of the batch before) runs side by side with a read that does not block. A read that
        found the stream busy (at least ``batch_fill_min`` new entries, room for more) waits a
        little for its batch to fill; one that found it nearly empty returns at once: no tick
        waits on a quiet stream."""
        pending = {p: c for p, c in self._pending_from.items() if p in partitions}
        if pending:
            # our own pending entries, from a cursor: the batch read last is not acknowledged
            # yet while it is published, and must not be read (and dead-lettered) twice
            self._rewound = set()
            entries = await self._read_group(
                {self.keys.ticks(p): c for p, c in pending.items()}, self._read_count
            )
            self.read_at = self.clock()
            last: dict[int, str] = {}
            for stream, entry_id, _ in entries:
                last[self._partition[stream]] = entry_id
            for p in set(pending) - self._rewound:
                if p in last:
                    self._pending_from[p] = last[p]
                else:
                    del self._pending_from[p]  # read them all: new entries from here on
            if entries:
                return entries
        streams = {self.keys.ticks(p): ">" for p in partitions}
        if block or meanwhile is None:
            block_ms = self.config.read_block_ms if block else None
            entries = await self._read_group(streams, self._read_count, block_ms)
        else:  # a batch waits to be published: at once, side by side with this read
            entries, _ = await settled(self._read_group(streams, self._read_count), meanwhile())
            meanwhile = None
        self.read_at = self.clock()  # a batch's wait (the fill below, prepare) counts from here
        wait = self.fill.wait(len(entries), self._read_count)
        if wait > 0:
            # flush on size or deadline, as serving systems batch: the batch before is
            # published meanwhile, if it was not yet
            if meanwhile is None:
                await asyncio.sleep(wait)
            else:
                await settled(meanwhile(), asyncio.sleep(wait))
            entries += await self._read_group(streams, self._read_count - len(entries))
        return await self._without_strays(entries)

    async def _without_strays(self, entries: Entries) -> Entries:
        """Entries of a partition taken lately that the replica which held it read after we
        took it (its lease was deleted or overwritten by hand, or FLUSHDB: it did not know yet)
        sit in its pending list, older than what we just read. They are claimed now and the
        partition read again from our pending list, in id order; taken only after
        ``claim_idle_ms`` they would come after later ticks of their symbols and be skipped as
        already seen (never forecast)."""
        now = time.monotonic()
        recent = sorted(
            {self._partition[stream] for stream, _, _ in entries}
            & {p for p, until in self._watch_until.items() if now < until}
        )
        if not recent:
            return entries
        pipe = self.redis.pipeline(transaction=False)
        for p in recent:
            pipe.xpending(self.keys.ticks(p), self.group)
        strays = []
        for p, summary in zip(recent, await pipe.execute(raise_on_error=False), strict=True):
            others = [] if isinstance(summary, Exception) else summary.get("consumers") or []
            if any(text(c["name"]) != self.consumer and c["pending"] for c in others):
                strays.append(p)
        for p in strays:
            claimed = await self._claim(self.keys.ticks(p), min_idle_ms=0)
            self.rewind([p])
            log.warning(
                "took %d entries of partition %d that the replica which held it before read "
                "after this one took it: reading them first, in order",
                claimed,
                p,
            )
        return [e for e in entries if self._partition[e[0]] not in strays]

    async def _read_group(
        self, streams: dict[Any, Any], count: int, block: int | None = None
    ) -> Entries:
        """XREADGROUP of ``streams`` ({stream: start}), about ``count`` entries in all. A read
        that loses its connection makes the next one ask for half as many: the reply may have
        been too large (a burst of huge entries after small ones, which Redis's
        ``client-output-buffer-limit`` answers by closing the connection), and a read that is
        too small only grows again."""
        try:
            return await self._read_group_once(streams, count, block)
        except REDIS_DOWN:
            self._read_count = max(1, self._read_count // 2)
            raise

    async def _read_group_once(
        self, streams: dict[Any, Any], count: int, block: int | None
    ) -> Entries:
        each = max(1, -(-count // len(streams)))  # COUNT is per stream
        if not self.cluster or len(streams) == 1:
            reply = await self.reader.xreadgroup(
                self.group, self.consumer, streams, count=each, block=block
            )
            return self._sized(parse_stream_reply(reply))
        read = await read_each(self.reader, self.group, self.consumer, streams, each, block)
        return self._sized(read)

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
            self._read_count = max(1, min(read_cap(self.config), fits, self._read_count * 2))
        return entries


async def group_start(
    redis: Redis, keys: Keys, partition: int, acked_high: tuple[int, int]
) -> tuple[str, str | None]:
    """Where a (re)created group of ``partition`` starts, and the acknowledged mark known (None:
    none, a new group). After the mark; from the start (0) when there is none, or when the mark
    is beyond every id the stream has had (a hand-made mark, or the stream deleted and made anew,
    maybe after a far-future id poisoned it): such a mark is not of this stream, and starting
    after it would skip every new tick. What is read again is in history, and is acknowledged
    without a second forecast."""
    high = acked_high
    with contextlib.suppress(ValueError, redis_errors.ResponseError):
        stored = await redis.get(keys.acked(partition))
        if stored:
            high = max(high, id_key(text(stored)))
    if high == (0, 0):
        return "0", None
    mark = f"{high[0]}-{high[1]}"
    try:
        info = await redis.xinfo_stream(keys.ticks(partition))
        newest = id_key(text(info.get("last-generated-id", b"0-0")))
    except (ValueError, redis_errors.ResponseError):  # no such stream (or not a stream)
        return "0", mark
    return (mark if high <= newest else "0"), mark


async def claim(
    redis: Redis, stream: str, group: str, consumer: str, min_idle_ms: int, metrics: Metrics
) -> int:
    """Move the pending entries of ``group`` idle past ``min_idle_ms`` into ``consumer``'s
    pending list (its own too: a read whose reply was lost, and which the client retried, left
    its entries pending there unread); how many. Those no longer in the stream (XDEL, XTRIM),
    which Redis drops from the pending list instead, are counted and said. Ids only (XPENDING, then
    XCLAIM JUSTID): the entries themselves come by the pending read, sized to the byte budget
    like any read, never 1,000 at once."""
    start, claimed, deleted = "-", 0, []
    while True:
        rows = await redis.xpending_range(
            stream, group, min=start, max="+", count=CLAIM_PAGE, idle=min_idle_ms or None
        )
        ids: list[Any] = [r["message_id"] for r in rows]
        if ids:
            got = await redis.xclaim(stream, group, consumer, min_idle_ms, ids, justid=True)
            claimed += len(got)
            missing = set(ids) - set(got)  # deleted, or meanwhile acknowledged or read again
            if missing:
                pipe = redis.pipeline(transaction=False)
                for i in sorted(missing):
                    pipe.xrange(stream, i, i, count=1)
                found = await pipe.execute()
                deleted += [text(i) for i, e in zip(sorted(missing), found, strict=True) if not e]
        if len(rows) < CLAIM_PAGE:
            if deleted:
                _said_deleted(metrics, stream, deleted)
            return claimed
        start = "(" + text(rows[-1]["message_id"])


_say_deleted = RateLimitedLog(log)


def _said_deleted(metrics: Metrics, stream: str, deleted: list[str]) -> None:
    metrics.ticks.labels("deleted").inc(len(deleted))
    _say_deleted(
        logging.WARNING,
        f"deleted-{stream}",
        "%d pending entries of %s were deleted from it (XDEL or XTRIM) before they were read: "
        "Redis dropped them from the pending list, nothing to forecast (%s)",
        len(deleted),
        stream,
        ", ".join(deleted[:5]) + (" ..." if len(deleted) > 5 else ""),
    )


async def read_each(
    reader: Redis, group: str, consumer: str, streams: dict[Any, Any], each: int, block: int | None
) -> Entries:
    """A read on a Redis Cluster: one XREADGROUP per partition (each its own slot), pipelined
    per node; an empty sweep waits a moment instead of blocking on one partition."""
    pipe = reader.pipeline(transaction=False)
    for stream, start in streams.items():
        pipe.xreadgroup(group, consumer, {stream: start}, count=each)
    entries: Entries = []
    for reply in await pipe.execute():
        entries += parse_stream_reply(reply)
    if not entries and block:
        await asyncio.sleep(min(block, CLUSTER_POLL_MS) / 1000)
    return entries
