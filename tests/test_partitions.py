"""Partitions shared by lease on one redis-server (P > 1), in-process replicas: every tick
forecast exactly once while replicas join, die and stall; the fence; the partition count."""

from __future__ import annotations

import asyncio
import time

from prometheus_client import CollectorRegistry

from streamcast.daemon import Daemon, DaemonConfig
from streamcast.keys import Keys
from streamcast.metrics import Metrics
from streamcast.wire import Tick

from .helpers import check_exactly_once, crash, feed, keep_ticks, sample, wait_for, wait_settled

SYMBOLS = [f"S{i:02d}" for i in range(12)]


def replica(redis, engine, keys: Keys, name: str, **config) -> Daemon:
    config.setdefault("lease_ttl_s", 2.0)
    config.setdefault("batch_max_size", 64)
    config.setdefault("read_block_ms", 100)
    return Daemon(
        redis,
        engine,
        Metrics(CollectorRegistry()),
        keys=keys,
        config=DaemonConfig(consumer=name, **config),
    )


class Producer:
    """Sends each symbol's prices in turn, evenly, to the symbol's partition stream."""

    def __init__(self, redis, keys: Keys, symbols=SYMBOLS, points: int = 400) -> None:
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

    def expected(self) -> int:
        return len(self.symbols) * max(0, self.sent - 49)


async def forecast_total(redis, keys: Keys) -> int:
    return sum([await redis.xlen(keys.forecasts(s)) for s in SYMBOLS])


async def all_forecast(redis, keys: Keys, producer: Producer) -> None:
    async def done() -> bool:
        return await forecast_total(redis, keys) >= producer.expected()

    await wait_for(done, timeout_s=90, what=f"{producer.expected()} forecasts")
    await wait_settled(redis, keys)


def owned(daemons) -> list[set[int]]:
    return [set(d.ownership.held) for d in daemons]


async def test_three_replicas_share_six_partitions_fairly_and_forecast_each_tick_once(
    redis_client, shipped_engine
):
    keys = Keys("share", partitions=6)
    await keep_ticks(redis_client, keys)
    producer = Producer(redis_client, keys)
    # the default lease (10 s): this test counts each replica's forecasts, so none may lose a
    # lease to a stall of the event loop the three share (on a busy machine a 2 s lease is
    # not enough); lapses are the next tests'
    daemons = [
        replica(redis_client, shipped_engine, keys, f"r{i}", lease_ttl_s=10.0) for i in range(3)
    ]
    for d in daemons:
        await d.start()
    try:

        async def fair() -> bool:
            held = owned(daemons)
            return [len(h) for h in held] == [2, 2, 2] and set().union(*held) == set(range(6))

        await wait_for(fair, what="two partitions each")
        await producer.send(120, pause_s=0.005)
        await all_forecast(redis_client, keys, producer)
        # each replica read only its own partitions' streams
        for d in daemons:
            mine = {s for s in SYMBOLS if keys.partition(s) in d.ownership.held}
            assert d.stats.forecasts == len(mine) * (120 - 49)
    finally:
        for d in daemons:
            await d.stop()
    await check_exactly_once(redis_client, keys, SYMBOLS)


async def test_a_dead_replicas_partitions_are_taken_over_and_a_new_one_gets_a_share(
    redis_client, shipped_engine
):
    keys = Keys("churn", partitions=6)
    await keep_ticks(redis_client, keys)
    producer = Producer(redis_client, keys)
    daemons = [replica(redis_client, shipped_engine, keys, f"r{i}") for i in range(3)]
    for d in daemons:
        await d.start()
    try:
        await wait_for(lambda: asyncio.sleep(0, sum(map(len, owned(daemons))) == 6))
        sending = asyncio.create_task(producer.send(240, pause_s=0.01))
        await asyncio.sleep(0.8)
        dead = daemons.pop(0)
        gone = set(dead.ownership.held)
        await crash(dead)
        died = time.monotonic()

        async def taken_over() -> bool:
            return set().union(*owned(daemons)) == set(range(6))

        # the bound: within ~15 s (here the leases lapse after 2 s, plus a round)
        await wait_for(taken_over, timeout_s=15, what="the dead replica's partitions taken")
        print(f"taken over {time.monotonic() - died:.1f} s after the crash")
        assert gone

        async def even() -> bool:
            return all(len(h) == 3 for h in owned(daemons))

        # at once, unless a stall of the shared event loop made a survivor sit out a while
        await wait_for(even, timeout_s=15, what="three partitions each")
        joined = replica(redis_client, shipped_engine, keys, "r9")
        await joined.start()
        daemons.append(joined)

        async def rebalanced() -> bool:
            return sorted(map(len, owned(daemons))) == [2, 2, 2]

        await wait_for(rebalanced, timeout_s=15, what="the new replica's share")
        await sending
        await producer.send(60, pause_s=0.005)  # ticks for the new replica's share too
        await all_forecast(redis_client, keys, producer)
        assert joined.stats.forecasts > 0
        moves = [
            sample(d.metrics, "streamcast_partition_moves_total", how="released") for d in daemons
        ]
        assert sum(moves) >= 2, "the two others gave a partition each up to the new one"
        await asyncio.sleep(1.5)  # a housekeeping round after the last move
        for d in daemons:  # a lag is exported for what a replica reads, never what it gave up
            lagged = {
                int(s.labels["partition"])
                for metric in d.metrics.prometheus.collect()
                if metric.name == "streamcast_partition_lag"
                for s in metric.samples
            }
            assert lagged == set(d.ownership.readable()), (d.config.consumer, lagged)
    finally:
        for d in daemons:
            await d.stop()
    await check_exactly_once(redis_client, keys, SYMBOLS)


async def test_a_replica_that_stalled_past_its_lease_publishes_nothing_for_it(
    redis_client, shipped_engine
):
    """The fence: the stalled replica's transaction sees another token in the lease and
    drops that partition's share; the new holder forecasts it, once."""
    keys = Keys("fence", partitions=1)
    await keep_ticks(redis_client, keys)
    producer = Producer(redis_client, keys, SYMBOLS[:2])
    first = replica(redis_client, shipped_engine, keys, "a")
    await first.start()
    await wait_for(lambda: asyncio.sleep(0, first.ready), what="the first ready")
    await producer.send(60)
    await wait_for(lambda: asyncio.sleep(0, first.stats.forecasts == 2 * 11))
    # a stall: the first's renewals stop and its local deadline is pushed far out (as a clock
    # that did not see the pause), so only the fence in Redis can stop it
    first._tasks[2].cancel()  # the ownership rounds
    first.ownership.held[0] = time.monotonic() + 3600
    await redis_client.delete(keys.lease(0))
    await redis_client.set(keys.lease(0), "thief", px=60_000)
    await producer.send(5)
    await wait_for(
        lambda: asyncio.sleep(
            0, sample(first.metrics, "streamcast_partition_moves_total", how="lost") == 1
        ),
        what="the fence finding the partition lost",
    )
    assert first.stats.forecasts == 2 * 11, "published for a partition it lost"
    await first.stop()
    await redis_client.delete(keys.lease(0))
    second = replica(redis_client, shipped_engine, keys, "b")
    async with second:
        await all_forecast(redis_client, keys, producer)
    await check_exactly_once(redis_client, keys, SYMBOLS[:2])


async def test_another_partition_count_is_refused_and_owns_nothing(
    redis_client, shipped_engine, caplog
):
    await redis_client.hset(Keys("count").meta, "partitions", 4)
    daemon = replica(redis_client, shipped_engine, Keys("count", partitions=6), "a")
    caplog.set_level("ERROR", logger="streamcast.daemon")
    async with daemon:
        await wait_for(lambda: asyncio.sleep(0, daemon.ownership.mismatch is not None))
        await asyncio.sleep(1.5)
        assert not daemon.ready and daemon.standby
        assert not daemon.ownership.held
    said = [r.getMessage() for r in caplog.records]
    assert any("STREAMCAST_PARTITIONS=6" in m and "has '4' partitions" in m for m in said)


async def test_a_tick_in_another_partitions_stream_is_a_dead_letter(redis_client, shipped_engine):
    keys = Keys("wrongp", partitions=4)
    symbol = SYMBOLS[0]
    home = keys.partition(symbol)
    other = (home + 1) % 4
    await redis_client.xadd(keys.ticks(other), Tick.encode(symbol, 10.0))
    producer = Producer(redis_client, keys, [symbol])
    await producer.send(55)
    daemon = replica(redis_client, shipped_engine, keys, "a")
    async with daemon:
        await all_forecast(redis_client, keys, producer)
        letters = await redis_client.xrange(keys.dead(other))
    assert len(letters) == 1
    fields = letters[0][1]
    assert fields[b"reason"] == b"wrong_partition"
    assert f"belongs to partition {home}".encode() in fields[b"detail"]
    assert sample(daemon.metrics, "streamcast_dead_letters_total", reason="wrong_partition") == 1
    in_home = [eid for eid, _ in await redis_client.xrange(keys.ticks(home))]
    forecast = [eid for eid, _ in await redis_client.xrange(keys.forecasts(symbol))]
    assert forecast == in_home[49:]


async def test_static_assignment_owns_its_ordinals_partitions_and_a_copy_stands_by(
    redis_client, shipped_engine
):
    keys = Keys("static", partitions=6)
    one = replica(
        redis_client, shipped_engine, keys, "a", assignment="static", shard_index=1, shard_count=3
    )
    copy = replica(
        redis_client, shipped_engine, keys, "b", assignment="static", shard_index=1, shard_count=3
    )
    async with one:
        await wait_for(lambda: asyncio.sleep(0, set(one.ownership.held) == {1, 4}))
        async with copy:
            await asyncio.sleep(2.5)
            assert copy.standby and not copy.ready and not copy.ownership.held
        assert one.ready
