"""Partitions attacked (issue 14), on a real redis-server with P > 1 and several in-process
replicas while ticks flow: lease keys deleted or corrupted, the members set corrupted or full of
ghosts, the partition count changed, FLUSHDB, a group or a stream destroyed, replicas stalled
past their leases (a real stall: a replica on its own event loop, blocked), churn, ticks in the
wrong partition, and odd fleet sizes. After each: every tick from a symbol's 50th on is forecast
exactly once, no replica's loop died, no forecast was refused as a duplicate, and every partition
is owned by exactly one replica."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import pytest
from prometheus_client import CollectorRegistry

from streamcast.connect import make_redis
from streamcast.daemon import Daemon, DaemonConfig
from streamcast.daemon.sink import PUBLISH_SHA
from streamcast.keys import Keys
from streamcast.metrics import Metrics
from streamcast.wire import Tick

from .helpers import check_exactly_once, crash, feed, keep_ticks, sample, wait_for, wait_settled

SYMBOLS = [f"S{i:02d}" for i in range(12)]
TTL_S = 2.0


def replica(redis, engine, keys: Keys, name: str, publisher=None, clock=None, **config) -> Daemon:
    config.setdefault("lease_ttl_s", TTL_S)
    config.setdefault("batch_max_size", 64)
    config.setdefault("read_block_ms", 100)
    # entries a replica read after losing its lease wait for a reclaim: keep that short here
    config.setdefault("claim_idle_ms", 3000)
    config.setdefault("claim_interval_s", 1.0)
    return Daemon(
        redis,
        engine,
        Metrics(CollectorRegistry()),
        keys=keys,
        config=DaemonConfig(consumer=name, **config),
        publisher=publisher,
        **({"clock": clock} if clock else {}),
    )


async def pending_ids(redis, keys: Keys, symbol: str, count: int) -> list[str]:
    """``count`` ticks of ``symbol`` in partition 0's stream (ids 1-1, 1-2, ...), read by the
    group's consumer "c" and so pending: what a batch acknowledges."""
    pipe = redis.pipeline(transaction=False)
    for k in range(count):
        pipe.xadd(keys.ticks(0), {"symbol": symbol, "price": "1.0"}, id=f"1-{k + 1}")
    await pipe.execute()
    await redis.xgroup_create(keys.ticks(0), keys.group, id="0")
    read = await redis.xreadgroup(keys.group, "c", {keys.ticks(0): ">"}, count=count)
    return [entry_id.decode() for entry_id, _ in read[0][1]]


class Producer:
    """Sends each symbol's prices in turn to the symbol's partition stream."""

    def __init__(self, redis, keys: Keys, symbols=SYMBOLS, points: int = 600) -> None:
        self.redis, self.keys, self.symbols = redis, keys, symbols
        self.prices = feed(len(symbols), points)
        self.sent = 0

    async def send(self, rounds: int, pause_s: float = 0.0) -> None:
        for _ in range(rounds):
            i = self.sent
            pipe = self.redis.pipeline(transaction=False)
            for row, symbol in enumerate(self.symbols):
                pipe.xadd(self.keys.ticks_for(symbol), Tick.encode(symbol, self.prices[row, i]))
            await pipe.execute()
            self.sent += 1
            if pause_s:
                await asyncio.sleep(pause_s)


async def tick_count(redis, keys: Keys, symbols) -> dict[str, int]:
    counts = dict.fromkeys(symbols, 0)
    for ticks in keys.all_ticks():
        if await redis.type(ticks) != b"stream":
            continue
        for _, fields in await redis.xrange(ticks):
            symbol = fields[b"symbol"].decode("utf-8", "replace")
            if symbol in counts and keys.ticks_for(symbol) == ticks:
                counts[symbol] += 1
    return counts


async def unforecast(redis, keys: Keys, symbols) -> dict[str, list[str]]:
    """The ids of ``symbols``' ticks from their 50th on that have no forecast."""
    missing = {}
    for symbol in symbols:
        ticks = [
            eid.decode()
            for eid, fields in await redis.xrange(keys.ticks_for(symbol))
            if fields[b"symbol"].decode("utf-8", "replace") == symbol
        ][49:]
        forecast = {
            fields[b"tick_id"].decode() for _, fields in await redis.xrange(keys.forecasts(symbol))
        }
        missing[symbol] = [t for t in ticks if t not in forecast]
    return missing


async def all_forecast(redis, keys: Keys, symbols=SYMBOLS, timeout_s: float = 45) -> None:
    """Wait until every symbol's ticks from its 50th on are forecast, and the groups settled."""

    async def short() -> dict[str, tuple[int, int]]:
        counts = await tick_count(redis, keys, symbols)
        have = {s: await redis.xlen(keys.forecasts(s)) for s in symbols}
        return {s: (have[s], counts[s] - 49) for s in symbols if have[s] < counts[s] - 49}

    async def done() -> bool:
        return not await short()

    try:
        await wait_for(done, timeout_s=timeout_s, what="every eligible tick forecast")
    except AssertionError as exc:
        holders = [await redis.get(keys.lease(p)) for p in range(keys.partitions)]
        groups = {}
        for p in range(keys.partitions):
            try:
                groups[p] = await redis.xinfo_groups(keys.ticks(p))
            except Exception as err:
                groups[p] = repr(err)
        missing = await unforecast(redis, keys, list(await short())[:2])
        dead = [await redis.xlen(d) for d in keys.all_dead()]
        said = (
            f"short (have, need): {await short()}; unforecast {missing}; dead letters {dead}; "
            f"leases {holders}; {groups}"
        )
        raise AssertionError(said) from exc
    await wait_settled(redis, keys, timeout_s=timeout_s)


def owned(daemons) -> list[set[int]]:
    return [set(d.ownership.held) for d in daemons]


def each_owned_once(daemons, partitions: int) -> bool:
    held = owned(daemons)
    return sorted(p for h in held for p in h) == list(range(partitions))


async def all_owned(daemons, partitions: int, timeout_s: float = 15, what: str = "") -> None:
    """Each partition held by exactly one replica, as the replicas see it and in Redis."""
    redis, keys = daemons[0].redis, daemons[0].keys

    async def owned_once() -> bool:
        if not each_owned_once(daemons, partitions):
            return False
        tokens = {p: d.ownership.token.encode() for d in daemons for p in d.ownership.held}
        pipe = redis.pipeline(transaction=False)
        for p in tokens:
            pipe.get(keys.lease(p))
        found = await pipe.execute(raise_on_error=False)
        return found == list(tokens.values())

    await wait_for(
        owned_once,
        timeout_s=timeout_s,
        what=what or f"each of {partitions} partitions owned by exactly one replica",
    )


def check_healthy(daemons) -> None:
    """No loop died, and nothing was refused as already published (a double)."""
    for d in daemons:
        assert d._tasks, "stopped"
        for task in d._tasks:
            assert not task.done(), f"{d.config.consumer}: its {task.get_name()} task ended"
        for what in ("forecast", "history"):
            dup = sample(
                d.metrics, "streamcast_write_errors_total", what=what, reason="duplicate_id"
            )
            assert dup == 0, f"{d.config.consumer} published {what} twice ({dup})"


async def stop_all(daemons) -> None:
    for d in daemons:
        await d.stop()


async def start_fleet(redis, engine, keys: Keys, n: int, **config) -> list[Daemon]:
    daemons = [replica(redis, engine, keys, f"r{i}", **config) for i in range(n)]
    for d in daemons:
        await d.start()
    return daemons


# -- lease keys ------------------------------------------------------------------------------------


async def test_a_deleted_lease_mid_feed_moves_the_partition_and_forecasts_each_tick_once(
    redis_client, shipped_engine
):
    keys = Keys("hl-del", partitions=4)
    await keep_ticks(redis_client, keys)
    producer = Producer(redis_client, keys)
    daemons = await start_fleet(redis_client, shipped_engine, keys, 2)
    try:
        await all_owned(daemons, 4)
        sending = asyncio.create_task(producer.send(160, pause_s=0.02))
        await asyncio.sleep(1.5)
        holder = next(d for d in daemons if 0 in d.ownership.held)
        other = next(d for d in daemons if d is not holder)
        await redis_client.delete(keys.lease(0))
        await wait_for(
            lambda: sample(holder.metrics, "streamcast_partition_moves_total", how="lost") >= 1,
            timeout_s=5,
            what="the lease found lost",
        )
        lost_at = time.monotonic()
        # the holder sits out 5 TTLs, no member and owning nothing; the other takes every one

        async def sitting_out() -> bool:
            return not holder.ownership.held and len(other.ownership.held) == 4

        await wait_for(sitting_out, timeout_s=3 * TTL_S, what="the other taking all four")
        await all_owned(daemons, 4)
        assert holder.ownership.cooling
        assert await redis_client.zscore(keys.members, holder.ownership.token) is None
        await sending

        async def shared() -> bool:
            return sorted(map(len, owned(daemons))) == [2, 2]

        cool_s = holder.ownership.cool_s
        await wait_for(shared, timeout_s=cool_s + 3 * TTL_S, what="the holder back, its share")
        assert time.monotonic() - lost_at >= cool_s - 1, "it did not sit out"
        await all_owned(daemons, 4)
        await all_forecast(redis_client, keys)
        check_healthy(daemons)
    finally:
        await stop_all(daemons)
    await check_exactly_once(redis_client, keys, SYMBOLS)


async def test_a_lone_replica_whose_lease_was_deleted_does_not_sit_out_with_nobody_to_take_over(
    redis_client, shipped_engine
):
    """Sitting out after a lost lease lets the others take the partitions; with no other replica
    it only leaves every partition unconsumed for 5 TTLs."""
    keys = Keys("hl-lone", partitions=4)
    await keep_ticks(redis_client, keys)
    producer = Producer(redis_client, keys)
    (daemon,) = daemons = await start_fleet(redis_client, shipped_engine, keys, 1)
    try:
        await all_owned(daemons, 4)
        sending = asyncio.create_task(producer.send(160, pause_s=0.02))
        await asyncio.sleep(1.0)
        await redis_client.delete(keys.lease(2))
        await wait_for(
            lambda: sample(daemon.metrics, "streamcast_partition_moves_total", how="lost") >= 1,
            timeout_s=5,
            what="the lease found lost",
        )
        lost_at = time.monotonic()
        await all_owned(daemons, 4, timeout_s=3 * TTL_S, what="the partitions taken back")
        print(f"taken back {time.monotonic() - lost_at:.1f} s after the loss")
        await sending
        await all_forecast(redis_client, keys)
        check_healthy(daemons)
    finally:
        await stop_all(daemons)
    await check_exactly_once(redis_client, keys, SYMBOLS)


async def test_lease_keys_set_to_junk_without_expiry_do_not_leave_partitions_unowned(
    redis_client, shipped_engine
):
    """An operator's SET without PX (junk, non-UTF-8 bytes, a gone replica's token), one with an
    hour's expiry, or a key of another type on a lease never lapses (or not for hours): the fleet
    takes the partition over instead of leaving it unconsumed, and a corrupt lease does not stop
    others being taken."""
    keys = Keys("hl-junk", partitions=6)
    await keep_ticks(redis_client, keys)
    producer = Producer(redis_client, keys)
    daemons = await start_fleet(redis_client, shipped_engine, keys, 2)
    try:
        await all_owned(daemons, 6)
        sending = asyncio.create_task(producer.send(200, pause_s=0.02))
        await asyncio.sleep(1.5)
        await redis_client.set(keys.lease(0), "junk")
        await redis_client.set(keys.lease(1), b"\xff\xfe\x00bytes")
        await redis_client.set(keys.lease(2), "r9:gone-000000:1:abc")  # a replica long gone
        await redis_client.delete(keys.lease(3))
        await redis_client.hset(keys.lease(3), "holder", "someone")  # WRONGTYPE for GET
        await redis_client.set(keys.lease(4), "junk", px=3_600_000)  # an hour: no lease's
        await asyncio.sleep(2 * TTL_S)
        await all_owned(daemons, 6, timeout_s=6 * TTL_S, what="the corrupted leases taken over")
        await sending
        await all_forecast(redis_client, keys)
        for p in range(5):
            assert 0 < await redis_client.pttl(keys.lease(p)) <= TTL_S * 1000
        check_healthy(daemons)
    finally:
        await stop_all(daemons)
    await check_exactly_once(redis_client, keys, SYMBOLS)


async def test_entries_the_old_holder_read_after_its_lease_was_taken_are_forecast_in_order(
    redis_client, shipped_engine
):
    """A lease deleted by hand (or by FLUSHDB) is taken by another replica at once, while the
    holder, not knowing yet (its round has not come; its local deadline has not passed), goes on
    reading: what it reads lands in its pending list, older than what the new holder reads next.
    Those ticks are forecast once and in order, not skipped later as already seen."""
    keys = Keys("hl-strand", partitions=1)
    await keep_ticks(redis_client, keys)
    producer = Producer(redis_client, keys)
    first = replica(redis_client, shipped_engine, keys, "a")
    second = replica(redis_client, shipped_engine, keys, "b")
    daemons = [first, second]
    await first.start()
    await wait_for(lambda: first.ready, what="the first ready")
    await second.start()
    try:
        await producer.send(60, pause_s=0.01)
        await wait_for(lambda: first.stats.forecasts == len(SYMBOLS) * 11, timeout_s=20)
        # the first's round is late (cancelled here, resumed below); it renewed just now
        rounds = next(t for t in first._tasks if t.get_name() == "lease")
        rounds.cancel()
        await asyncio.gather(rounds, return_exceptions=True)
        first.ownership.held[0] = time.monotonic() + 1.3
        # an operator deletes the lease; the second's round comes first and takes it
        await redis_client.delete(keys.lease(0))
        await redis_client.zrem(keys.members, first.ownership.token)
        await second.ownership.round()
        await wait_for(lambda: 0 in second.ownership.active, timeout_s=1, what="the takeover")
        # ticks flow: both read the group until the first's publish finds the lease gone
        await producer.send(10, pause_s=0.02)
        stranded = await redis_client.xpending_range(
            keys.ticks(0), keys.group, "-", "+", 1000, consumername=first.ownership.token
        )
        resumed = asyncio.create_task(first.ownership.keep_forever(), name="lease")
        first._tasks[first._tasks.index(rounds)] = resumed
        await producer.send(60, pause_s=0.02)
        await all_forecast(redis_client, keys, timeout_s=25)
        check_healthy(daemons)
        assert sample(second.metrics, "streamcast_ticks_total", outcome="duplicate") == 0
        print(f"{len(stranded)} entries stranded with the first after the takeover")
    finally:
        await stop_all(daemons)
    await check_exactly_once(redis_client, keys, SYMBOLS)


async def test_a_lease_set_to_another_live_replicas_token_is_adopted_by_it(
    redis_client, shipped_engine
):
    keys = Keys("hl-tok", partitions=4)
    await keep_ticks(redis_client, keys)
    producer = Producer(redis_client, keys)
    daemons = await start_fleet(redis_client, shipped_engine, keys, 2)
    try:
        await all_owned(daemons, 4)
        sending = asyncio.create_task(producer.send(160, pause_s=0.02))
        await asyncio.sleep(1.5)
        victim = next(d for d in daemons if 0 in d.ownership.held)
        other = next(d for d in daemons if d is not victim)
        await redis_client.set(keys.lease(0), other.ownership.token)  # no expiry
        await wait_for(lambda: 0 in other.ownership.held, timeout_s=4 * TTL_S)
        await sending
        await all_owned(daemons, 4)
        await all_forecast(redis_client, keys)
        assert await redis_client.pttl(keys.lease(0)) > 0, "the adopted lease expires again"
        check_healthy(daemons)
    finally:
        await stop_all(daemons)
    await check_exactly_once(redis_client, keys, SYMBOLS)


# -- the members set -------------------------------------------------------------------------------


async def test_a_replica_whose_clock_is_a_minute_ahead_shares_the_partitions_fairly(
    redis_client, shipped_engine
):
    """Memberships expire by Redis's clock, not each replica's: one whose clock runs a minute
    ahead (before: it removed the others' memberships every round as lapsed, took every
    partition, and left them standing by) holds its share, and so do the others."""
    keys = Keys("hl-skew", partitions=4)
    await keep_ticks(redis_client, keys)
    producer = Producer(redis_client, keys)
    ahead = replica(redis_client, shipped_engine, keys, "ahead", clock=lambda: time.time() + 60)
    daemons = [ahead, replica(redis_client, shipped_engine, keys, "on-time")]
    for d in daemons:
        await d.start()
    try:
        await all_owned(daemons, 4)
        await wait_for(lambda: asyncio.sleep(0, sorted(map(len, owned(daemons))) == [2, 2]))
        sending = asyncio.create_task(producer.send(100, pause_s=0.02))
        for _ in range(int(3 * TTL_S / 0.1)):  # three leases' time, every 0.1 s
            assert [d.ownership.member_count for d in daemons] == [2, 2]
            assert sorted(map(len, owned(daemons))) == [2, 2], owned(daemons)
            await asyncio.sleep(0.1)
        await sending
        await all_forecast(redis_client, keys)
        check_healthy(daemons)
    finally:
        await stop_all(daemons)
    await check_exactly_once(redis_client, keys, SYMBOLS)


async def test_ghost_members_far_in_the_future_do_not_leave_partitions_unowned(
    redis_client, shipped_engine, caplog
):
    keys = Keys("hl-ghost", partitions=6)
    await keep_ticks(redis_client, keys)
    producer = Producer(redis_client, keys)
    daemons = await start_fleet(redis_client, shipped_engine, keys, 2)
    try:
        await all_owned(daemons, 6)
        with pytest.raises(Exception, match="not a valid float"):
            await redis_client.zadd(keys.members, {"nan-ghost": float("nan")})
        sending = asyncio.create_task(producer.send(160, pause_s=0.02))
        await asyncio.sleep(1.0)
        caplog.set_level(logging.INFO, logger="streamcast")
        far = int(time.time() * 1000) + 10**12
        await redis_client.zadd(
            keys.members, {"a-ghost": float("inf"), "b-ghost": far, b"\xff\xfe-ghost": far}
        )
        await asyncio.sleep(3 * TTL_S)
        assert each_owned_once(daemons, 6), owned(daemons)
        assert [d.ownership.member_count for d in daemons] == [2, 2]
        await sending
        await all_forecast(redis_client, keys)
        check_healthy(daemons)
        lines = [r for r in caplog.records if r.name.startswith("streamcast")]
        assert len(lines) < 60, f"{len(lines)} log lines: {lines[-1].getMessage()[:200]}"
    finally:
        await stop_all(daemons)
    await check_exactly_once(redis_client, keys, SYMBOLS)


async def test_a_non_utf8_member_does_not_stop_the_rounds(redis_client, shipped_engine, caplog):
    """A member name that is not UTF-8 (with a live-looking score, re-added as a client would):
    the rounds go on renewing, no partition is dropped and the log is not flooded."""
    keys = Keys("hl-bytes", partitions=4)
    await keep_ticks(redis_client, keys)
    producer = Producer(redis_client, keys)
    daemons = await start_fleet(redis_client, shipped_engine, keys, 2)
    caplog.set_level(logging.INFO, logger="streamcast")
    try:
        await all_owned(daemons, 4)
        sending = asyncio.create_task(producer.send(160, pause_s=0.02))
        for _ in range(8):
            soon = int(time.time() * 1000) + 3000
            await redis_client.zadd(keys.members, {b"\xc3\x28bad": soon})
            await asyncio.sleep(0.5)
        assert all(d.ownership.round_ok for d in daemons)
        await sending
        await all_owned(daemons, 4)
        await all_forecast(redis_client, keys)
        check_healthy(daemons)
        assert all(
            sample(d.metrics, "streamcast_partition_moves_total", how="lost") == 0 for d in daemons
        )
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert errors == []
    finally:
        await stop_all(daemons)
    await check_exactly_once(redis_client, keys, SYMBOLS)


async def test_members_deleted_or_of_another_type_mid_feed(redis_client, shipped_engine):
    keys = Keys("hl-mtype", partitions=4)
    await keep_ticks(redis_client, keys)
    producer = Producer(redis_client, keys)
    daemons = await start_fleet(redis_client, shipped_engine, keys, 2)
    try:
        await all_owned(daemons, 4)
        sending = asyncio.create_task(producer.send(200, pause_s=0.02))
        await asyncio.sleep(1.0)
        await redis_client.delete(keys.members)
        await asyncio.sleep(1.5)
        assert await redis_client.zcard(keys.members) == 2
        await redis_client.delete(keys.members)
        await redis_client.set(keys.members, "not a sorted set")  # WRONGTYPE for every round
        await asyncio.sleep(2 * TTL_S)
        # the rounds go on: the leases are renewed and no partition is lost or left unowned
        assert each_owned_once(daemons, 4), owned(daemons)
        assert all(
            sample(d.metrics, "streamcast_partition_moves_total", how="lost") == 0 for d in daemons
        )
        await sending
        await all_forecast(redis_client, keys)
        check_healthy(daemons)
    finally:
        await stop_all(daemons)
    await check_exactly_once(redis_client, keys, SYMBOLS)


# -- the deployment's partition count, FLUSHDB -----------------------------------------------------


async def test_the_partition_count_changed_mid_run_stops_the_fleet_until_it_is_put_back(
    redis_client, shipped_engine
):
    keys = Keys("hl-meta", partitions=4)
    await keep_ticks(redis_client, keys)
    producer = Producer(redis_client, keys)
    daemons = await start_fleet(redis_client, shipped_engine, keys, 2)
    try:
        await all_owned(daemons, 4)
        sending = asyncio.create_task(producer.send(200, pause_s=0.02))
        await asyncio.sleep(1.0)
        await redis_client.hset(keys.meta, "partitions", 3)
        # a replica may own nothing a moment before its round reads the mismatch (its batch
        # share dropped at the fence): wait for the refusal itself
        await wait_for(
            lambda: all(d.ownership.mismatch and not d.ready for d in daemons),
            timeout_s=3,
            what="every replica refusing",
        )
        assert not any(owned(daemons))
        await asyncio.sleep(1.0)
        assert not any(owned(daemons))
        await redis_client.delete(keys.meta)  # put back: the first replica records its count
        await all_owned(daemons, 4, timeout_s=8 * TTL_S)
        assert await redis_client.hget(keys.meta, "partitions") == b"4"
        await sending
        await all_forecast(redis_client, keys)
        check_healthy(daemons)
    finally:
        await stop_all(daemons)
    await check_exactly_once(redis_client, keys, SYMBOLS)


async def test_a_meta_key_of_another_type_stops_nothing_for_good(
    redis_client, shipped_engine, caplog
):
    """{prefix}:meta SET to a string: the partition count cannot be checked, so the rounds are
    refused (counted, said without flooding the log) and the leases lapse; nothing is published
    twice or lost, and once the key is deleted the fleet records its count and goes on."""
    keys = Keys("hl-metatype", partitions=4)
    await keep_ticks(redis_client, keys)
    producer = Producer(redis_client, keys)
    daemons = await start_fleet(redis_client, shipped_engine, keys, 2)
    caplog.set_level(logging.INFO, logger="streamcast")
    try:
        await all_owned(daemons, 4)
        sending = asyncio.create_task(producer.send(200, pause_s=0.02))
        await asyncio.sleep(1.0)
        await redis_client.delete(keys.meta)
        await redis_client.set(keys.meta, "4")
        await asyncio.sleep(3 * TTL_S)
        assert all(not d.ownership.round_ok and not d.ready for d in daemons)
        for d in daemons:
            refused = [
                sample(d.metrics, "streamcast_redis_refusals_total", reason=r, absent=0)
                for r in ("ERR", "WRONGTYPE")
            ]
            assert sum(refused) >= 3, refused
        await redis_client.delete(keys.meta)
        await sending
        await all_owned(daemons, 4, timeout_s=6 * TTL_S)
        await all_forecast(redis_client, keys)
        check_healthy(daemons)
        said = [r for r in caplog.records if "WRONGTYPE" in r.getMessage()]
        assert 1 <= len(said) <= 4, [r.getMessage() for r in said]
    finally:
        await stop_all(daemons)
    await check_exactly_once(redis_client, keys, SYMBOLS)


async def test_flushdb_mid_feed(redis_client, shipped_engine):
    """Everything goes, leases included: a batch in flight is fenced off, the fleet takes the
    partitions again (soon: no replica is left to take them over), and every tick sent after the
    flush is forecast once from its symbol's 50th on."""
    keys = Keys("hl-flush", partitions=4)
    await keep_ticks(redis_client, keys)
    producer = Producer(redis_client, keys)
    daemons = await start_fleet(redis_client, shipped_engine, keys, 2)
    try:
        await all_owned(daemons, 4)
        await producer.send(70, pause_s=0.01)
        await redis_client.flushdb()
        await keep_ticks(redis_client, keys)
        flushed = time.monotonic()
        await all_owned(daemons, 4, timeout_s=3 * TTL_S + 2, what="the partitions taken again")
        print(f"owned again {time.monotonic() - flushed:.1f} s after the flush")
        await producer.send(80, pause_s=0.01)
        await all_forecast(redis_client, keys)
        check_healthy(daemons)
    finally:
        await stop_all(daemons)
    await check_exactly_once(redis_client, keys, SYMBOLS)


# -- a partition's group or stream -----------------------------------------------------------------


async def test_a_partitions_group_destroyed_mid_feed(redis_client, shipped_engine):
    keys = Keys("hl-destroy", partitions=4)
    await keep_ticks(redis_client, keys)
    producer = Producer(redis_client, keys)
    daemons = await start_fleet(redis_client, shipped_engine, keys, 2)
    try:
        await all_owned(daemons, 4)
        sending = asyncio.create_task(producer.send(200, pause_s=0.02))
        for p in (1, 2, 1):
            await asyncio.sleep(1.0)
            await redis_client.xgroup_destroy(keys.ticks(p), keys.group)
        await sending
        await all_forecast(redis_client, keys)
        check_healthy(daemons)
        assert (
            sum(
                sample(d.metrics, "streamcast_recoveries_total", what="group_recreated")
                for d in daemons
            )
            >= 3
        )
    finally:
        await stop_all(daemons)
    await check_exactly_once(redis_client, keys, SYMBOLS)


async def test_a_partition_stream_deleted_mid_feed(redis_client, shipped_engine):
    keys = Keys("hl-delstream", partitions=4)
    await keep_ticks(redis_client, keys)
    producer = Producer(redis_client, keys)
    daemons = await start_fleet(redis_client, shipped_engine, keys, 2)
    gone = 3
    mine = [s for s in SYMBOLS if keys.partition(s) == gone]
    others = [s for s in SYMBOLS if s not in mine]
    assert mine and others
    try:
        await all_owned(daemons, 4)
        sending = asyncio.create_task(producer.send(200, pause_s=0.02))
        await asyncio.sleep(2.0)
        await redis_client.delete(keys.ticks(gone))
        await redis_client.xgroup_create(keys.ticks(gone), "witness", id="0", mkstream=True)
        await sending
        await all_forecast(redis_client, keys, others)
        await wait_settled(redis_client, keys)
        check_healthy(daemons)
    finally:
        await stop_all(daemons)
    await check_exactly_once(redis_client, keys, others)
    for symbol in mine:
        # ticks sent after the DEL: each forecast (their windows come back from history)
        after = [
            e.decode()
            for e, _ in await redis_client.xrange(keys.ticks(gone))
            if _.get(b"symbol") == symbol.encode()
        ]
        forecast = [e.decode() for e, _ in await redis_client.xrange(keys.forecasts(symbol))]
        assert after and forecast[-len(after) :] == after
        assert forecast == sorted(set(forecast), key=lambda i: tuple(map(int, i.split("-"))))


async def test_a_partition_stream_of_another_type_does_not_stop_the_other_partitions(
    redis_client, shipped_engine
):
    """An operator SETs one partition's ticks key to a string (WRONGTYPE for every stream
    command): the replica holding it goes on consuming its other partitions."""
    keys = Keys("hl-wrongstream", partitions=4)
    await keep_ticks(redis_client, keys)
    producer = Producer(redis_client, keys)
    bad = 1
    mine = [s for s in SYMBOLS if keys.partition(s) == bad]
    others = [s for s in SYMBOLS if s not in mine]
    daemons = await start_fleet(redis_client, shipped_engine, keys, 2)
    try:
        await all_owned(daemons, 4)
        await producer.send(60, pause_s=0.01)
        await all_forecast(redis_client, keys)
        await redis_client.delete(keys.ticks(bad))
        await redis_client.set(keys.ticks(bad), "not a stream")
        producer.symbols = others
        producer.prices = producer.prices[[SYMBOLS.index(s) for s in others]]
        await producer.send(60, pause_s=0.01)

        async def others_forecast() -> bool:
            counts = await tick_count(redis_client, keys, others)
            have = [await redis_client.xlen(keys.forecasts(s)) for s in others]
            return all(h >= counts[s] - 49 for s, h in zip(others, have, strict=True))

        await wait_for(others_forecast, timeout_s=20, what="the other partitions' forecasts")
        check_healthy(daemons)
        assert sum(
            sample(d.metrics, "streamcast_ticks_total", outcome="forecast") for d in daemons
        ) >= len(others) * (120 - 49)
    finally:
        await stop_all(daemons)
    await redis_client.delete(keys.ticks(bad))
    await check_exactly_once(redis_client, keys, others)


async def test_the_trim_survives_a_junk_acknowledged_mark(redis_client, shipped_engine):
    keys = Keys("hl-trim", partitions=2)
    daemon = replica(redis_client, shipped_engine, keys, "a")
    await redis_client.xadd(keys.ticks(0), Tick.encode("S00", 1.0))
    await redis_client.set(keys.acked(0), "junk")
    # no group yet: the mark bounds the trim, and a junk one means there is none
    await daemon.trimmer.trim(0)
    assert await redis_client.xlen(keys.ticks(0)) == 1


# -- stalls ----------------------------------------------------------------------------------------


class ThreadedReplica:
    """A replica on its own event loop in its own thread, with its own client: blocking its loop
    (``stall``) stalls it alone, as a paused process."""

    def __init__(self, url: str, engine, keys: Keys, name: str, **config) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.url, self.engine, self.keys, self.name, self.config = url, engine, keys, name, config
        self.client = None
        self.daemon: Daemon | None = None

    async def call(self, coro):
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))

    async def start(self) -> Daemon:
        async def make():
            self.client = make_redis(self.url)
            self.daemon = replica(self.client, self.engine, self.keys, self.name, **self.config)
            await self.daemon.start()
            return self.daemon

        return await self.call(make())

    def stall(self, seconds: float) -> None:
        self.loop.call_soon_threadsafe(time.sleep, seconds)

    async def close(self) -> None:
        async def end():
            await self.daemon.stop()
            await self.client.aclose()

        try:
            await self.call(end())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()


@pytest.mark.parametrize("where", ["before_the_write", "building_the_script"])
async def test_a_replica_stalled_past_its_lease_publishes_nothing_for_partitions_taken_meanwhile(
    redis_server, redis_client, shipped_engine, where
):
    """A real stall (the replica's event loop blocked) about to publish, after its local deadline
    check: before the sink's write (``before_the_write``) or while it builds the script call
    (``building_the_script``). The other replica takes its partitions, and the stalled one
    publishes nothing for them: the script's fence finds the leases another's."""
    keys = Keys(f"hl-stall-{where}", partitions=4)
    await keep_ticks(redis_client, keys)
    producer = Producer(redis_client, keys)
    sick = ThreadedReplica(redis_server.url, shipped_engine, keys, "sick")
    well = ThreadedReplica(redis_server.url, shipped_engine, keys, "well")
    stalled = await sick.start()
    await wait_for(lambda: len(stalled.ownership.held) == 4, timeout_s=10)
    healthy = await well.start()
    daemons = [stalled, healthy]
    try:
        await wait_for(lambda: sorted(map(len, owned(daemons))) == [2, 2], timeout_s=10)
        sink = stalled.sink
        write, queue = sink.write, sink._queue
        stalls = []

        async def stalling_write(batch):
            if where == "before_the_write" and not stalls and batch.forecasts:
                stalls.append(sorted(batch.parts))
                time.sleep(3 * TTL_S)  # the whole loop stops: no renewal, no round
            return await write(batch)

        def stalling_queue(pipe, batch, partitions, now_ms):
            if where == "building_the_script" and not stalls and batch.forecasts:
                stalls.append(sorted(partitions))
                time.sleep(3 * TTL_S)
            return queue(pipe, batch, partitions, now_ms)

        sink.write, sink._queue = stalling_write, stalling_queue
        await producer.send(200, pause_s=0.03)
        assert stalls
        # the stalled replica wakes up, finds the partitions lost, and publishes nothing for them
        await wait_for(
            lambda: sample(stalled.metrics, "streamcast_partition_moves_total", how="lost") >= 1,
            timeout_s=4 * TTL_S,
            what="the stalled replica finding its partitions lost",
        )
        await all_forecast(redis_client, keys)
        check_healthy(daemons)
        counts = await tick_count(redis_client, keys, SYMBOLS)
        made = stalled.stats.forecasts + healthy.stats.forecasts
        assert made == sum(c - 49 for c in counts.values())
    finally:
        await sick.close()
        await well.close()
    await check_exactly_once(redis_client, keys, SYMBOLS)


async def test_a_replica_whose_rounds_stopped_then_resumed_publishes_nothing_it_lost(
    redis_client, shipped_engine
):
    keys = Keys("hl-resume", partitions=4)
    await keep_ticks(redis_client, keys)
    producer = Producer(redis_client, keys)
    daemons = await start_fleet(redis_client, shipped_engine, keys, 2)
    try:
        await all_owned(daemons, 4)
        sending = asyncio.create_task(producer.send(200, pause_s=0.02))
        await asyncio.sleep(1.0)
        paused = daemons[0]
        rounds = next(t for t in paused._tasks if t.get_name() == "lease")
        rounds.cancel()
        await asyncio.gather(rounds, return_exceptions=True)
        await wait_for(
            lambda: len(daemons[1].ownership.held) == 4,
            timeout_s=5 * TTL_S,
            what="the other replica taking every partition",
        )
        resumed = asyncio.create_task(paused.ownership.keep_forever(), name="lease")
        paused._tasks[paused._tasks.index(rounds)] = resumed
        await sending
        await all_owned(daemons, 4, timeout_s=10 * TTL_S)
        await all_forecast(redis_client, keys)
        check_healthy(daemons)
    finally:
        await stop_all(daemons)
    await check_exactly_once(redis_client, keys, SYMBOLS)


# -- churn, the wrong partition, fleet sizes ------------------------------------------------------


async def test_replicas_started_and_stopped_rapidly_while_ticks_flow(redis_client, shipped_engine):
    keys = Keys("hl-churn", partitions=6)
    await keep_ticks(redis_client, keys)
    producer = Producer(redis_client, keys)
    steady = replica(redis_client, shipped_engine, keys, "steady")
    await steady.start()
    sending = asyncio.create_task(producer.send(300, pause_s=0.02))
    try:
        for i in range(8):
            churner = replica(redis_client, shipped_engine, keys, f"churn{i}")
            await churner.start()
            await asyncio.sleep(0.3 + 0.2 * (i % 3))
            if i % 3 == 2:
                await crash(churner)
            else:
                await churner.stop()
        last = replica(redis_client, shipped_engine, keys, "last")
        await last.start()
        daemons = [steady, last]
        await sending
        await all_owned(daemons, 6, timeout_s=6 * TTL_S)
        await all_forecast(redis_client, keys)
        check_healthy(daemons)
    finally:
        sending.cancel()
        await steady.stop()
        if "last" in locals():
            await last.stop()
    await check_exactly_once(redis_client, keys, SYMBOLS)


async def test_ticks_in_the_wrong_partition_mid_feed_are_dead_letters(redis_client, shipped_engine):
    keys = Keys("hl-wrongp", partitions=4)
    await keep_ticks(redis_client, keys)
    producer = Producer(redis_client, keys)
    daemons = await start_fleet(redis_client, shipped_engine, keys, 3)
    symbol = SYMBOLS[0]
    wrong = (keys.partition(symbol) + 1) % 4
    try:
        await all_owned(daemons, 4)
        sending = asyncio.create_task(producer.send(120, pause_s=0.02))
        for i in range(10):
            await redis_client.xadd(keys.ticks(wrong), Tick.encode(symbol, 100.0 + i))
            await asyncio.sleep(0.1)
        await sending
        await all_forecast(redis_client, keys)
        letters = await redis_client.xrange(keys.dead(wrong))
        assert [f[b"reason"] for _, f in letters] == [b"wrong_partition"] * 10
        counted = sum(
            sample(d.metrics, "streamcast_dead_letters_total", reason="wrong_partition")
            for d in daemons
        )
        assert counted == 10
        check_healthy(daemons)
    finally:
        await stop_all(daemons)
    # (check_exactly_once counts a symbol's ticks in every stream: here only its own partition's)
    for name in SYMBOLS:
        own = [
            e.decode()
            for e, f in await redis_client.xrange(keys.ticks_for(name))
            if f[b"symbol"] == name.encode()
        ]
        forecast = [e.decode() for e, _ in await redis_client.xrange(keys.forecasts(name))]
        assert forecast == own[49:], name


@pytest.mark.parametrize(("partitions", "replicas"), [(1, 3), (12, 1), (2, 5)])
async def test_fleet_sizes(redis_client, shipped_engine, partitions, replicas):
    keys = Keys(f"hl-size{partitions}x{replicas}", partitions=partitions)
    await keep_ticks(redis_client, keys)
    producer = Producer(redis_client, keys)
    daemons = await start_fleet(redis_client, shipped_engine, keys, replicas)
    try:
        await all_owned(daemons, partitions)
        await asyncio.sleep(2 * TTL_S)  # settled: nothing moves any more
        assert each_owned_once(daemons, partitions)
        holding = [d for d in daemons if d.ownership.held]
        assert len(holding) == min(partitions, replicas)
        assert all(d.ready for d in holding)
        assert all(d.standby and not d.ready for d in daemons if d not in holding)
        await producer.send(100, pause_s=0.01)
        await all_forecast(redis_client, keys)
        assert sum(d.stats.forecasts for d in daemons) == len(SYMBOLS) * (100 - 49)
        check_healthy(daemons)
        moved = sum(
            sample(d.metrics, "streamcast_partition_moves_total", how=how)
            for d in daemons
            for how in ("released", "lost")
        )
        assert moved <= partitions, "partitions kept moving"
    finally:
        await stop_all(daemons)
    await check_exactly_once(redis_client, keys, SYMBOLS)


def test_a_refusal_inside_a_pipeline_is_named_by_its_code():
    """redis-py prefixes a pipeline's errors ("Command # 1 (...) of pipeline caused error: ");
    the refusal counted is Redis's code, not ERR."""
    from redis import exceptions as redis_errors

    from streamcast.daemon.faults import refusal

    said = (
        "Command # 1 (HSETNX x partitions 4) of pipeline caused error: WRONGTYPE Operation "
        "against a key holding the wrong kind of value"
    )
    assert refusal(redis_errors.ResponseError(said)) == "WRONGTYPE"
    assert refusal(redis_errors.ResponseError("NOGROUP No such key")) == "NOGROUP"
    assert refusal(redis_errors.ResponseError("something odd")) == "ERR"


async def test_a_cluster_giving_up_on_redirections_mid_read_or_publish_is_an_outage_not_a_bug(
    redis_client, shipped_engine
):
    """While a slot migrates, redis-py can give up following ASK/TRYAGAIN with a ClusterError
    ("TTL exhausted"): the daemon backs off and rebuilds, it does not end its consume loop."""
    from redis import exceptions as redis_errors

    keys = Keys("ttlexhausted", partitions=2)
    await keep_ticks(redis_client, keys)
    producer = Producer(redis_client, keys)
    daemon = replica(redis_client, shipped_engine, keys, "a")
    failures = {"read": 2, "write": 2}
    read, write = daemon.source.read, daemon.sink.write

    async def flaky_read(*args, **kwargs):
        if failures["read"]:
            failures["read"] -= 1
            raise redis_errors.ClusterError("('TTL exhausted.',)")
        return await read(*args, **kwargs)

    async def flaky_write(batch):
        if failures["write"]:
            failures["write"] -= 1
            raise redis_errors.ClusterError("('TTL exhausted.',)")
        return await write(batch)

    daemon.source.read = flaky_read  # type: ignore[method-assign]
    daemon.sink.write = flaky_write  # type: ignore[method-assign]
    async with daemon:
        await producer.send(80, pause_s=0.002)
        await all_forecast(redis_client, keys)
        assert not daemon._tasks[0].done(), "the consume loop ended"
        assert failures == {"read": 0, "write": 0}
        assert sample(daemon.metrics, "streamcast_redis_errors_total") >= 3
    await check_exactly_once(redis_client, keys, SYMBOLS)


async def test_the_publish_connection_dropped_under_the_script_is_an_outage_not_a_bug(
    redis_client, shipped_engine
):
    """Redis dying (or CLIENT KILL) as the publish script is sent: the daemon backs off and
    publishes the batch again, nothing lost or doubled; the consume loop does not end (under
    WATCH, redis-py said so with a WatchError, and it did: the replicas of a Redis restarted
    mid-replay then never retried)."""
    keys = Keys("scriptdrop", partitions=2)
    await keep_ticks(redis_client, keys)
    producer = Producer(redis_client, keys)
    at = redis_client.connection_pool.connection_kwargs
    # as the service makes it: its own connection, no retry of its own
    publisher = make_redis(
        f"redis://{at['host']}:{at['port']}/0", retries=0, cluster=False, client_name="publish"
    )
    daemon = replica(redis_client, shipped_engine, keys, "a", publisher=publisher)
    drops = {"left": 2}
    call = daemon.sink._call

    async def dropped_under_the_script(script, leases):
        if not drops["left"]:
            return await call(script, leases)
        drops["left"] -= 1
        # the script sent and held (a paused Redis runs no write), its connection killed
        await redis_client.client_pause(5000, all=False)
        try:
            sent = asyncio.ensure_future(call(script, leases))
            await asyncio.sleep(0.05)
            for client in await redis_client.client_list():
                if client["name"] == "publish":
                    assert client["cmd"] in ("evalsha", "eval"), client
                    await redis_client.client_kill_filter(_id=client["id"])
        finally:
            await redis_client.client_unpause()
        return await sent

    daemon.sink._call = dropped_under_the_script  # type: ignore[method-assign]
    async with daemon:
        await producer.send(80, pause_s=0.002)
        await all_forecast(redis_client, keys)
        assert not daemon._tasks[0].done(), "the consume loop ended"
        assert drops["left"] == 0
        assert sample(daemon.metrics, "streamcast_redis_errors_total") >= 1
    await publisher.aclose()
    await check_exactly_once(redis_client, keys, SYMBOLS)


async def _closed_under(*args, **kwargs):
    from redis.asyncio.connection import Connection

    await Connection()._send_packed_command([b"*1\r\n$4\r\nPING\r\n"])


async def _no_node(*args, **kwargs):
    from redis.exceptions import RedisClusterException

    raise RedisClusterException("Redis Cluster cannot be connected. Please provide ...")


async def _slot_not_covered(*args, **kwargs):
    from redis.exceptions import SlotNotCoveredError

    raise SlotNotCoveredError('Slot "3" is not covered by the cluster.')


async def _cross_slot(*args, **kwargs):
    from redis.exceptions import RedisClusterException

    raise RedisClusterException("all keys must map to the same key slot")


async def _ours(*args, **kwargs):
    return None.nothing  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("cause", "said"),
    [
        (_closed_under, "connection closed under the call"),
        (_no_node, "no Redis Cluster node answers"),
        (_slot_not_covered, "no Redis Cluster node answers"),
        (_cross_slot, None),
        (_ours, None),
    ],
)
async def test_the_cluster_clients_outages_are_lost_connections_and_its_bugs_stay_bugs(
    monkeypatch, cause, said
):
    """redis-py 8's cluster client says some outages otherwise: reconnecting lazily after a node
    failed or a slot moved, it can close a connection while another call is opening it (an
    AttributeError inside redis-py: it ended the consume loop in the slot-migration and failover
    tests), and with no node answering it raises RedisClusterException, not a RedisError. The
    client streamcast makes says ConnectionError for them (the loop backs off and retries) in a
    command, a pipeline, a WATCH and a command run at once after it; a RedisClusterException
    for a caller's mistake, and an AttributeError of our own code, stay what they are."""
    from redis import exceptions as redis_errors
    from redis.asyncio.cluster import ClusterPipeline, RedisCluster

    from streamcast.connect import ClusterClient, ClusterClientPipeline

    for name in ("execute", "watch"):
        monkeypatch.setattr(ClusterPipeline, name, cause)
    monkeypatch.setattr(RedisCluster, "execute_command", cause)
    monkeypatch.setattr(ClusterPipeline, "execute_command", lambda *a, **k: cause())
    client = ClusterClient.__new__(ClusterClient)  # no cluster: the calls below are replaced
    pipe = ClusterClientPipeline.__new__(ClusterClientPipeline)
    calls = [
        client.execute_command("EVALSHA", "0", 0),
        pipe.execute(),
        pipe.watch("k"),
        pipe.execute_command("GET", "k"),  # after WATCH: run at once
    ]
    for call in calls:
        if said is None:
            with pytest.raises(Exception) as raised:
                await call
            assert not isinstance(raised.value, redis_errors.ConnectionError)
        else:
            with pytest.raises(redis_errors.ConnectionError, match=said):
                await call


async def test_a_batch_of_more_acks_than_lua_unpacks_is_acknowledged(redis_client, shipped_engine):
    """A batch may hold up to 65,536 x 8 entries (a conflating read at the largest batch size);
    the publish script unpacks each command's arguments, and Lua unpacks ~8,000 at most: the
    acks (and symbol names) go in chunks."""
    from streamcast.daemon.batch import Batch, Part

    keys = Keys("manyacks", partitions=2)
    daemon = replica(redis_client, shipped_engine, keys, "a")
    await redis_client.set(keys.lease(0), daemon.sink.token)
    ids = await pending_ids(redis_client, keys, "X", 9_000)
    assert len(ids) == 9_000
    assert await daemon.sink.write(Batch(parts={0: Part(ack_ids=ids)})) == set()
    assert (await redis_client.xpending(keys.ticks(0), keys.group))["pending"] == 0
    assert await redis_client.get(keys.acked(0)) == b"1-9000"
    assert daemon.stats.batches == 1


async def test_redis_refusing_writes_refuses_the_whole_publish(redis_client, shipped_engine):
    """Where Redis refuses writes (too few replicas: NOREPLICAS; so at maxmemory, on a replica,
    after a failed save) it refuses a script's writes until its first lands: the publish must be
    refused whole, its acks with it, as EXEC was, not pass for published (its ticks would be
    acknowledged later, unforecast)."""
    from redis import exceptions as redis_errors

    from streamcast.daemon.batch import Batch, Part
    from streamcast.wire import Forecast, Tick

    keys = Keys("noreplicas", partitions=2)
    daemon = replica(redis_client, shipped_engine, keys, "a")
    symbol = next(s for s in SYMBOLS if keys.partition(s) == 0)
    await redis_client.set(keys.lease(0), daemon.sink.token)
    ids = await pending_ids(redis_client, keys, symbol, 3)

    def batch() -> Batch:
        made = Batch(partition_of=keys.partition, parts={0: Part(ack_ids=list(ids))})
        tick = Tick(ids[-1], symbol, 1.0, None)
        made.accepted.append(tick)
        made.ready.append(tick)
        made.forecasts.append(Forecast.of(tick, "m", 1.01))
        return made

    await redis_client.config_set("min-replicas-to-write", 1)
    try:
        with pytest.raises(redis_errors.ResponseError, match="NOREPLICAS"):
            await daemon.sink.write(batch())
    finally:
        await redis_client.config_set("min-replicas-to-write", 0)
    assert (await redis_client.xpending(keys.ticks(0), keys.group))["pending"] == 3
    assert not await redis_client.exists(keys.forecasts(symbol), keys.acked(0))
    assert daemon.sink.acked_high == {} and daemon.stats.batches == 0
    await daemon.sink.write(batch())  # Redis writes again: so does the publish
    assert (await redis_client.xpending(keys.ticks(0), keys.group))["pending"] == 0
    assert await redis_client.xlen(keys.forecasts(symbol)) == 1


async def test_script_flush_under_a_replica_loses_nothing(redis_client, shipped_engine):
    """SCRIPT FLUSH (or a restarted Redis) empties the script cache: the publish is refused
    NOSCRIPT by its digest and sent again as text, nothing lost or doubled."""
    keys = Keys("scriptflush", partitions=2)
    await keep_ticks(redis_client, keys)
    producer = Producer(redis_client, keys)
    daemon = replica(redis_client, shipped_engine, keys, "a")
    async with daemon:
        await producer.send(20, pause_s=0.002)
        await wait_for(lambda: daemon.stats.batches > 0, what="a first publish")
        for _ in range(3):
            await redis_client.script_flush()
            await producer.send(20, pause_s=0.002)
        await all_forecast(redis_client, keys)
        assert await redis_client.script_exists(PUBLISH_SHA) == [True]
    assert sample(daemon.metrics, "streamcast_redis_errors_total") == 0
    await check_exactly_once(redis_client, keys, SYMBOLS)


async def test_a_batch_read_before_its_partition_was_lost_and_taken_again_is_not_published(
    redis_client, shipped_engine
):
    """A partition lost while batch k was published (its share dropped, left pending) and taken
    again before batch k+1 (read under the old tenure) is published: k+1's share must not be
    published either. Its ticks would reach history ahead of k's, and k's, read again, would
    be skipped as already seen: never forecast (the junk-lease test lost 44 ticks so)."""
    from streamcast.daemon.batch import Batch, Part

    keys = Keys("tenure", partitions=2)
    daemon = replica(redis_client, shipped_engine, keys, "a")
    own = daemon.ownership
    written: list[set[int]] = []

    async def write(batch):
        written.append(set(batch.parts))
        return set()

    daemon.sink.write = write  # type: ignore[method-assign]
    far = time.monotonic() + 60
    own.held, own.tenure, own.active = {0: far, 1: far}, {0: 2, 1: 1}, {0, 1}
    batch = Batch(parts={0: Part(ack_ids=["1-0"]), 1: Part(ack_ids=["1-1"])})
    batch.tenure = {0: 1, 1: 1}  # read when partition 0 was held under its first taking
    await daemon._publish(batch)
    assert written == [{1}]
    assert own.lost == {0} and 0 not in own.held, "set up again: its windows are ahead"
    assert own.valid(1, 1) and not own.valid(1, 2) and not own.valid(0)


async def test_a_partition_past_its_local_deadline_is_not_set_up(redis_client, shipped_engine):
    """After an outage longer than the lease, a partition still listed as held may be another
    replica's: setting it up would claim that one's pending entries (read later, after newer
    ticks, they would be skipped as seen). Only partitions surely still ours are set up."""
    own = replica(redis_client, shipped_engine, Keys("deadline", partitions=2), "a").ownership
    own.held = {0: time.monotonic() - 1.0, 1: time.monotonic() + 60}
    own.tenure = {0: 1, 1: 2}
    assert own.to_adopt() == {1}


async def test_a_partition_found_lost_by_a_publish_that_then_failed_is_still_known_lost(
    redis_client, shipped_engine
):
    """The fence finds partition 0 another's, then Redis fails on the next try: the loop must
    still learn 0 is lost (else it sets it up again after the outage and claims the holder's
    pending entries)."""
    from redis import exceptions as redis_errors

    from streamcast.daemon.batch import Batch, Part

    keys = Keys("foundlost", partitions=2)
    daemon = replica(redis_client, shipped_engine, keys, "a")
    await redis_client.set(keys.lease(0), "someone-else")
    await redis_client.set(keys.lease(1), "a")
    call, calls = daemon.sink._call, []

    async def then_down(script, leases):
        calls.append(script.keys[:leases])
        if len(calls) > 1:
            raise redis_errors.ConnectionError("Redis went away")
        return await call(script, leases)

    daemon.sink._call = then_down  # type: ignore[method-assign]
    batch = Batch(parts={0: Part(ack_ids=["1-0"]), 1: Part(ack_ids=["1-1"])})
    with pytest.raises(redis_errors.ConnectionError):
        await daemon.sink.write(batch)
    assert calls == [[keys.lease(0), keys.lease(1)], [keys.lease(1)]]
    assert daemon.sink.found_lost == {0} and len(calls) == 2
