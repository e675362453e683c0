"""Which partitions this replica consumes: leases in Redis, renewed, shared fairly, fenced.

Each partition has a lease key (``keys.lease(p)``, SET NX PX, streamcast.lease). Every round
(about a second) a replica

1. renews its membership in ``keys.members`` (a sorted set scored by expiry) and reads the live
   members;
2. renews every lease it holds; one it can no longer renew is *lost*;
3. works out its share: with ``assignment="lease"``, P // n partitions, one more for the first
   P % n members by name; with ``"static"``, the partitions p with p % shard_count ==
   shard_index (a StatefulSet's ordinal);
4. marks what it holds beyond its share *releasing* (the consume loop publishes the batch in
   flight, then gives them up between two batches), or acquires free partitions up to it.

A dead replica's leases lapse after ``lease_ttl_s`` and its membership with them: the others'
shares grow and they take its partitions in their next round. A new member makes the others'
shares shrink: they give up their extras and it takes them.

A replica that stalled past its lease may have lost it unseen, so the loop reads only partitions
whose *local deadline* has not passed, and the publish script first checks that each partition's
lease key still holds our token (the fence, streamcast.daemon.sink): a replica that lost
a partition cannot publish for it, however long it was paused.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable
from typing import Any

from redis import exceptions as redis_errors
from redis.asyncio import Redis

from streamcast.daemon.config import DaemonConfig
from streamcast.daemon.faults import REDIS_DOWN, refusal
from streamcast.keys import Keys
from streamcast.lease import LONGEST_MS, Lease
from streamcast.logs import RateLimitedLog
from streamcast.metrics import Metrics
from streamcast.tasks import within
from streamcast.wire import text

log = logging.getLogger(__name__)


class Ownership:
    """The partitions this replica holds (``held``), consumes (``active``), should give up
    (``releasing``) and lost unseen (``lost``)."""

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        config: DaemonConfig,
        metrics: Metrics,
    ) -> None:
        self.redis, self.keys, self.config, self.metrics = redis, keys, config, metrics
        self.token = config.consumer
        self.ttl_s = config.lease_ttl_s
        self.round_s = min(1.0, self.ttl_s / 3)
        ttl_ms = int(self.ttl_s * 1000)
        self.leases = [
            Lease(redis, keys.lease(p), self.token, ttl_ms) for p in range(keys.partitions)
        ]
        self.held: dict[int, float] = {}  # partition -> monotonic deadline: surely ours until then
        # partition -> which taking of it this is: a batch read under one is published only
        # under the same (lost and taken again meanwhile, its windows may be ahead of history)
        self.tenure: dict[int, int] = {}
        self._takings = 0
        self.active: set[int] = set()  # set up by the consume loop and read
        self.releasing: set[int] = set()
        self.lost: set[int] = set()
        self.share = 0
        self.member_count = 0
        self.changed = asyncio.Event()  # set when something for the consume loop to do happened
        self._said_standby = -1e9
        self._said_mismatch = -1e9
        self.mismatch: str | None = None  # why this replica owns nothing, if it refuses to
        self.round_ok = False  # the last round reached Redis and was not refused
        self.cool_s = 5 * self.ttl_s  # how long a replica that lost a lease sits out
        self._cooling_until = 0.0
        self._say = RateLimitedLog(log)

    # -- what the consume loop asks ---------------------------------------------------------------

    @property
    def standby(self) -> bool:
        """Owning nothing: the others hold every partition (or none is reachable yet)."""
        return not self.held

    def valid(self, partition: int, tenure: int | None = None) -> bool:
        """Surely ours now (and, given ``tenure``, held without a break since that taking)."""
        if tenure is not None and self.tenure.get(partition) != tenure:
            return False
        return time.monotonic() <= self.held.get(partition, -1.0)

    def readable(self) -> list[int]:
        """The partitions set up and surely still ours: the next read's."""
        return sorted(p for p in self.active if p not in self.releasing and self.valid(p))

    def to_adopt(self) -> set[int]:
        """Held, not yet set up, and surely still ours (after an outage longer than the lease,
        another replica may hold it: setting it up would claim that one's pending entries)."""
        return {p for p in set(self.held) - self.active - self.releasing if self.valid(p)}

    def take_lost(self) -> set[int]:
        lost, self.lost = self.lost, set()
        self.active -= lost
        return lost

    async def release(self, partitions: set[int]) -> None:
        """Give ``partitions`` up (the batch in flight is published): another replica takes them
        at once instead of after the lease's time to live."""
        for p in sorted(partitions):
            with contextlib.suppress(Exception):
                # bounded even if the call swallows its cancellation (a reply that never comes)
                await within(self.leases[p].release(), 2.0)
            self._forget(p)
            self.metrics.rebalances.labels("released").inc()
        if partitions:
            log.info("gave up partitions %s (over this replica's share)", _listed(partitions))
        self._gauges()

    async def wait_for_change(self) -> None:
        """Wait (at most a round) for something the consume loop should act on."""
        self.changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.changed.wait(), self.round_s)

    def drop(self, partitions: set[int]) -> None:
        """Partitions found lost, or maybe lost (past their local deadline), when publishing:
        consumed no more; the loop releases them (if still ours) and forgets their windows."""
        for p in partitions:
            if p in self.held:
                self._forget(p)
                self.lost.add(p)
                self._cool()
                self.metrics.rebalances.labels("lost").inc()
                self.metrics.recoveries.labels("lease_lost").inc()
                log.error(
                    "partition %d may be another replica's now (its lease is not ours, or this "
                    "replica stalled past it): its batch share is not published; whoever holds "
                    "it reads that again",
                    p,
                )
        if partitions:
            self.changed.set()

    def reset(self) -> None:
        """After a Redis failure every partition is set up again (held ones stay held)."""
        self.active.clear()

    # -- the rounds ---------------------------------------------------------------------------------

    async def keep_forever(self) -> None:
        while True:
            try:
                await self.round()
                self.round_ok = True
            except Exception as exc:
                self.round_ok = False
                round_failed(exc, self.metrics, self._say, self.round_s)
            await asyncio.sleep(self.round_s)

    async def round(self) -> None:
        if not await self._same_partitions():
            return
        members = await self._members()
        if self.cooling and not members:
            # no other replica to take the partitions: sitting out only leaves them unconsumed
            self._cooling_until = 0.0
            log.info("not sitting out any longer: no other replica is there to take over")
            members = await self._members()
        await self._renew()
        self.share = 0 if self.cooling else self._share(members)
        if (self.config.assignment == "lease" or self.cooling) and len(self.held) > self.share:
            extra = sorted(set(self.held) - self.releasing, reverse=True)
            give = extra[: len(self.held) - len(self.releasing) - self.share]
            if give:
                self.releasing |= set(give)
                self.changed.set()
        elif len(self.held) < self.share:
            await self._acquire(members)
        self._say_standing_by()
        self._gauges()

    async def _same_partitions(self) -> bool:
        """Record the deployment's partition count (the first replica does), or refuse another
        one: two counts would send one symbol's ticks to two partitions. A replica with another
        count owns nothing and says so."""
        keys = self.keys
        pipe = self.redis.pipeline(transaction=False)
        pipe.hsetnx(keys.meta, "partitions", keys.partitions)
        pipe.hget(keys.meta, "partitions")
        _, stored = await pipe.execute()
        self.mismatch = None
        if stored is not None and text(stored) != str(keys.partitions):
            self.mismatch = (
                f"STREAMCAST_PARTITIONS={keys.partitions}, but this deployment (prefix "
                f"{keys.prefix!r}) has {text(stored)!r} partitions ({keys.meta}): the count is "
                "fixed per deployment (deploy/README.md says how to change it); owning nothing"
            )
            if time.monotonic() - self._said_mismatch >= 60.0:
                self._said_mismatch = time.monotonic()
                log.error("%s", self.mismatch)
            self.drop(set(self.held))
            self._gauges()
            return False
        return True

    async def leave(self) -> None:
        """At stop: leave the members and give every partition up (the batch is published)."""
        with contextlib.suppress(Exception):
            await within(self.redis.zrem(self.keys.members, self.token), 2.0)
        await self.release(set(self.held))

    # -- inside a round -----------------------------------------------------------------------------

    @property
    def cooling(self) -> bool:
        """Sitting out after losing a lease unawares (a stall, a partition from Redis): not a
        member, owning nothing, so the others take its partitions and a sick replica does not
        take them back at once."""
        return time.monotonic() < self._cooling_until

    def _cool(self) -> None:
        if not self.cooling:
            log.warning(
                "sitting out for %.0f s after losing a lease: the other replicas take this "
                "one's partitions",
                self.cool_s,
            )
        self._cooling_until = time.monotonic() + self.cool_s

    async def _members(self) -> list[str]:
        ttl_ms = int(self.ttl_s * 1000)
        key, join = self.keys.members, not self.cooling
        members = await live_members(self.redis, key, self.token, ttl_ms, join=join)
        self.member_count = len(members)
        return members

    def _share(self, members: list[str]) -> int:
        partitions = self.keys.partitions
        if self.config.assignment == "static":
            return len(self._wanted_static())
        count = max(1, len(members))
        rank = members.index(self.token) if self.token in members else count - 1
        return partitions // count + (1 if rank < partitions % count else 0)

    def _wanted_static(self) -> list[int]:
        cfg = self.config
        return [p for p in range(self.keys.partitions) if p % cfg.shard_count == cfg.shard_index]

    async def _renew(self) -> None:
        held = sorted(self.held)
        asked = time.monotonic()
        kept = await asyncio.gather(*(self.leases[p].renew() for p in held), return_exceptions=True)
        for p, ok in zip(held, kept, strict=True):
            if p not in self.held:
                continue  # given up meanwhile
            if isinstance(ok, BaseException):
                continue  # an outage: the local deadline runs out if it lasts
            if ok:
                self.held[p] = asked + self._valid_s()
                continue
            self._forget(p)
            self.lost.add(p)
            self._cool()
            self.changed.set()
            self.metrics.rebalances.labels("lost").inc()
            self.metrics.recoveries.labels("lease_lost").inc()
            log.error(
                "lost the lease of partition %d (another replica holds it now, or it lapsed "
                "while this one stalled): publishing nothing more for it",
                p,
            )

    async def _acquire(self, members: list[str]) -> None:
        partitions = self.keys.partitions
        if self.config.assignment == "static":
            order = self._wanted_static()
        else:
            # start each member at its own place so that they do not all race for partition 0
            rank = members.index(self.token) if self.token in members else 0
            start = rank * partitions // max(1, len(members))
            order = [(start + i) % partitions for i in range(partitions)]
        taken = []
        for p in order:
            if len(self.held) >= self.share:
                break
            if p in self.held:
                continue
            asked = time.monotonic()
            if await self.leases[p].acquire():
                self.held[p] = asked + self._valid_s()
                self._takings += 1
                self.tenure[p] = self._takings
                taken.append(p)
        if taken:
            self.metrics.rebalances.labels("acquired").inc(len(taken))
            self.changed.set()
            log.info(
                "took partitions %s (share %d of %d among %d replicas; any a replica that "
                "stopped or died left pending are taken over)",
                _listed(taken),
                self.share,
                partitions,
                self.member_count,
            )

    def _say_standing_by(self) -> None:
        if self.held or self.cooling or time.monotonic() - self._said_standby < 60.0:
            return
        self._said_standby = time.monotonic()
        log.warning(
            "the other live replicas hold every partition (%d of them, %d replicas): standing "
            "by, not ready; this one takes one within %.0f s of a replica stopping or dying",
            self.keys.partitions,
            self.member_count,
            self.ttl_s + self.round_s,
        )

    def _forget(self, p: int) -> None:
        self.held.pop(p, None)
        self.tenure.pop(p, None)
        self.active.discard(p)
        self.releasing.discard(p)
        self.metrics.partition_owned.labels(str(p)).set(0)

    def _gauges(self) -> None:
        m = self.metrics
        m.partitions_owned.set(len(self.held))
        m.partitions_share.set(self.share)
        m.members.set(self.member_count)
        m.standby.set(1 if self.standby else 0)
        for p in self.held:
            m.partition_owned.labels(str(p)).set(1)

    def _valid_s(self) -> float:
        """How long after a renewal was asked for the lease is surely still ours: its time to
        live less a margin for a blocking read that started just before."""
        return self.ttl_s - min(self.ttl_s / 3, self.config.read_block_ms / 1000 + 0.5)


_say_ghosts = RateLimitedLog(log)


async def live_members(redis: Redis, key: str, token: str, ttl_ms: int, *, join: bool) -> list[str]:
    """Renew (``join``) or drop ``token``'s membership in the sorted set ``key``; the live
    members by name. Ghosts are removed: members whose expiry is further ahead than any
    replica's (a client wrote +inf or a far-future score), which never lapse and would keep
    their shares of the partitions unowned for ever. A ``key`` of another type (WRONGTYPE for
    every round: no lease renewed) is replaced."""
    try:
        members, ghosts = await _members_once(redis, key, token, ttl_ms, join)
    except redis_errors.ResponseError as exc:
        if "WRONGTYPE" not in str(exc):
            raise
        await _drop_unless_zset(redis, key)
        members, ghosts = await _members_once(redis, key, token, ttl_ms, join)
    if ghosts:
        _say_ghosts(
            logging.WARNING,
            "ghosts",
            "removed %d members of %s whose expiry is beyond any replica's (a client wrote "
            "them): they would keep their shares of the partitions unowned",
            ghosts,
            key,
        )
    return members


# one round of the members set, by Redis's clock (replicas' clocks may disagree: one ahead would
# take the others' memberships for lapsed): renew or drop ARGV[1], drop the lapsed and the ghosts
# (an expiry beyond any replica's, ARGV[4] ms ahead), the live members and how many ghosts
MEMBERS_ROUND = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if ARGV[3] == '1' then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
else
  redis.call('ZREM', KEYS[1], ARGV[1])
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - 1)
local ghosts = redis.call('ZREMRANGEBYSCORE', KEYS[1], '(' .. (now + tonumber(ARGV[4])), '+inf')
return {ghosts, redis.call('ZRANGEBYSCORE', KEYS[1], now, '+inf')}
"""


async def _members_once(
    redis: Redis, key: str, token: str, ttl_ms: int, join: bool
) -> tuple[list[str], int]:
    reply: Any = await redis.eval(
        MEMBERS_ROUND, 1, key, token, ttl_ms, "1" if join else "0", LONGEST_MS
    )
    ghosts, names = reply
    # text(): a name that is not UTF-8 (a client's) must not fail every round
    return sorted({text(n) for n in names}), int(ghosts)


async def _drop_unless_zset(redis: Redis, key: str) -> None:
    async with redis.pipeline(transaction=True) as pipe:
        with contextlib.suppress(redis_errors.WatchError):
            await pipe.watch(key)
            kind = text(await pipe.type(key))
            if kind not in ("zset", "none"):
                log.warning("%s was a %s, not the members' sorted set: replaced it", key, kind)
                pipe.multi()
                pipe.delete(key)
                await pipe.execute()


def _listed(partitions: set[int] | list[int]) -> str:
    return ",".join(str(p) for p in sorted(partitions))


def round_failed(exc: Exception, metrics: Metrics, say: RateLimitedLog, retry_s: float) -> None:
    """Count and say why a round failed. Owning nothing, the consume loop does not touch Redis,
    so an outage or a refusal (e.g. OOM at maxmemory: no lease can be taken or renewed) is
    counted and said here."""
    if isinstance(exc, REDIS_DOWN):
        metrics.redis_errors.inc()
        name = type(exc).__name__
        say(logging.WARNING, "down", "redis unavailable (%s); retrying in %.1f s", name, retry_s)
    elif isinstance(exc, redis_errors.ResponseError):
        metrics.redis_refusals.labels(refusal(exc)).inc()
        said = str(exc)[:160]
        say(logging.WARNING, "refused", "redis refused a command (%s); retrying", said)
    else:
        log.error("the partition round failed", exc_info=exc)


def stale(own: Ownership, partitions: Iterable[int], tenure: dict[int, int | None]) -> set[int]:
    """Of a batch's ``partitions``, read under ``tenure``, those not to publish. One whose local
    deadline passed (this replica stalled) may be another's now; it is taken again only through
    a fresh lease. So is one lost and taken again since the batch was read: the batch before it
    was dropped and is read again, and this one's ticks must not reach history first."""
    return {p for p in partitions if p not in tenure or not own.valid(p, tenure[p])}
