"""The public client against a real redis-server and a real 3-master Redis Cluster: ticks land
in their symbol's partition stream, forecasts (and, followed, paths, told apart by their type)
come back in order (one XREAD on a server, a sweep of the partitions on a cluster), the newest
forecast and path, and the partition count from the meta hash."""

from __future__ import annotations

import asyncio
import logging
import zlib

import pytest
from redis.exceptions import ClusterCrossSlotError, RedisClusterException

from streamcast.client import Client, PathForecast, deployed_partitions
from streamcast.connect import is_cluster, make_redis
from streamcast.keys import Keys
from streamcast.wire import Forecast, Tick

from .helpers import start_redis_cluster

SYMBOLS = [f"C{i}" for i in range(10)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    nodes = start_redis_cluster(tmp_path_factory.mktemp("cluster"))
    yield nodes
    nodes.stop()


@pytest.fixture
async def cluster_client(cluster):
    redis = make_redis(cluster.url)
    assert is_cluster(redis)
    yield redis
    await redis.aclose()


def crc_partition(symbol: str, partitions: int) -> int:
    """The partition by its definition, written out here rather than asked of Keys."""
    return zlib.crc32(symbol.encode()) % partitions


async def put_forecast(redis, keys: Keys, symbol: str, tick_id: str, price: float) -> None:
    """A forecast as the daemon publishes it: the entry id is the tick's id."""
    tick = Tick(tick_id, symbol, price, 1_700_000_000_000)
    fields = Forecast.of(tick, "v1", price + 0.5).encode(now_ms=7)
    await redis.xadd(keys.forecasts(symbol), fields, id=tick_id)


# a 2-step path's bands, as the daemon publishes them on a path entry (the "path" part only)
PATH_BANDS = {"80": {"path": [[0.5, 1.5], [1.0, 3.0]]}, "95": {"path": [[0.0, 2.0], [0.5, 3.5]]}}


async def put_path(redis, keys: Keys, symbol: str, tick_id: str, price: float) -> None:
    """A path as the daemon publishes it: to the paths stream, its entry id the tick's it starts
    from (published after that tick's forecast)."""
    tick = Tick(tick_id, symbol, price, 1_700_000_000_000)
    path = Forecast.path_of(tick, "v1", [price + 1.0, price + 2.0], PATH_BANDS)
    await redis.xadd(keys.paths(symbol), path.encode(now_ms=9), id=tick_id)


async def put_forecasts(redis, keys: Keys, rounds: int) -> dict[str, list[str]]:
    """``rounds`` forecasts of every symbol, round robin; the tick ids written, by symbol."""
    written: dict[str, list[str]] = {s: [] for s in SYMBOLS}
    for r in range(rounds):
        for k, symbol in enumerate(SYMBOLS):
            tick_id = f"{1000 + r}-{k}"
            await put_forecast(redis, keys, symbol, tick_id, 100.0 + r)
            written[symbol].append(tick_id)
    return written


def by_symbol(forecasts: list[Forecast]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for f in forecasts:
        out.setdefault(f.tick.symbol, []).append(f.tick.id)
    return out


# -- producing ------------------------------------------------------------------------------------


async def test_publish_puts_each_tick_in_its_symbols_partition_stream(redis_client):
    keys = Keys("pub", partitions=4)
    client = Client(redis_client, keys)
    ids = {s: await client.publish(s, 100.25 + i, ts=1_700_000_000_000 + i)
           for i, s in enumerate(SYMBOLS)}  # fmt: skip
    assert len({crc_partition(s, 4) for s in SYMBOLS}) > 1  # the test spans partitions
    for p in range(4):
        entries = await redis_client.xrange(f"pub:{{p{p}}}:ticks")
        mine = [s for s in SYMBOLS if crc_partition(s, 4) == p]
        assert [e.decode() for e, _ in entries] == [ids[s] for s in mine]
        # the wire contract's fields, exactly
        assert [f for _, f in entries] == [
            {b"symbol": s.encode(), b"price": repr(100.25 + SYMBOLS.index(s)).encode(),
             b"ts": str(1_700_000_000_000 + SYMBOLS.index(s)).encode()}
            for s in mine
        ]  # fmt: skip
    # no ts: the tick has none (its arrival is its time)
    entry_id = await client.publish("C0", 5.0)
    newest = await redis_client.xrevrange(keys.ticks(crc_partition("C0", 4)), count=1)
    assert newest == [(entry_id.encode(), {b"symbol": b"C0", b"price": b"5.0"})]


async def test_publish_many_pipelines_ticks_to_their_partitions_in_order(redis_client):
    keys = Keys("many", partitions=4)
    client = Client(redis_client, keys)
    ticks = [(s, float(r), 1000 + r) for r in range(3) for s in SYMBOLS]
    ids = await client.publish_many(ticks)
    assert len(ids) == 30
    for symbol in SYMBOLS:
        entries = await redis_client.xrange(keys.ticks(crc_partition(symbol, 4)))
        prices = [float(f[b"price"]) for _, f in entries if f[b"symbol"] == symbol.encode()]
        assert prices == [0.0, 1.0, 2.0]
    assert (
        await client.publish_many([("C1", 9.5)])
        and await redis_client.xlen(keys.ticks(crc_partition("C1", 4)))
        == sum(crc_partition(s, 4) == crc_partition("C1", 4) for s in SYMBOLS) * 3 + 1
    )


async def test_a_bad_symbol_is_refused_before_anything_is_written(redis_client):
    client = Client(redis_client, Keys("bad"))
    with pytest.raises(ValueError, match="not 1-64"):
        await client.publish("../etc", 1.0)
    with pytest.raises(ValueError, match="not 1-64"):
        await client.publish_many([("A", 1.0), ("a b", 2.0)])
    assert await redis_client.xlen(Keys("bad").ticks(0)) == 0


# -- reading forecasts on one server ----------------------------------------------------------------


async def test_forecasts_come_in_order_per_symbol_on_one_server(redis_client):
    keys = Keys("read", partitions=6)
    client = Client(redis_client, keys)
    written = await put_forecasts(redis_client, keys, rounds=4)
    got = [f async for f in client.forecasts(SYMBOLS, start="0", count=40)]
    assert by_symbol(got) == written
    first = got[0]
    assert (first.tick.symbol, first.tick.id, first.tick.price, first.tick.ts) == (
        "C0", "1000-0", 100.0, 1_700_000_000_000)  # fmt: skip
    assert (first.next, first.path, first.model, first.published_ms) == (
        100.5, None, "v1", 7)  # fmt: skip
    assert not any(isinstance(f, PathForecast) for f in got)
    # across symbols too, by tick id: the round robin as written
    assert [f.tick.id for f in got] == [i for r in range(4) for i in (f"{1000 + r}-{k}"
                                                                     for k in range(10))]  # fmt: skip


async def test_forecasts_from_now_on_see_only_new_ones_and_end_when_quiet(redis_client):
    keys = Keys("new", partitions=3)
    client = Client(redis_client, keys)
    await put_forecasts(redis_client, keys, rounds=2)
    subscription = client.subscribe(SYMBOLS)
    assert await subscription.read(0) == []  # "$": nothing stored is read
    await put_forecast(redis_client, keys, "C3", "5000-0", 50.0)
    await put_forecast(redis_client, keys, "C7", "5000-1", 70.0)
    got = await subscription.read(1000)
    assert [(f.tick.symbol, f.tick.id, f.tick.price) for f in got] == [
        ("C3", "5000-0", 50.0), ("C7", "5000-1", 70.0)]  # fmt: skip
    # the iterator ends after block_ms without a forecast
    started = asyncio.get_running_loop().time()
    late = [f async for f in client.forecasts(["C3"], block_ms=300)]
    assert late == [] and asyncio.get_running_loop().time() - started == pytest.approx(0.3, abs=0.2)


async def test_a_blocked_reader_gets_a_forecast_published_while_it_waits(redis_client):
    keys = Keys("wait", partitions=4)
    client = Client(redis_client, keys)
    reader = asyncio.create_task(anext(aiter(client.forecasts(["C2", "C5"], start="0"))))
    await asyncio.sleep(0.3)
    assert not reader.done()
    await put_forecast(redis_client, keys, "C5", "42-1", 12.5)
    got = await asyncio.wait_for(reader, 5)
    assert (got.tick.symbol, got.tick.id, got.next) == ("C5", "42-1", 13.0)


async def test_latest_is_the_newest_forecast_or_none(redis_client):
    keys = Keys("latest", partitions=4)
    client = Client(redis_client, keys)
    assert await client.latest("C1") is None
    for i in range(3):
        await put_forecast(redis_client, keys, "C1", f"{10 + i}-0", 100.0 + i)
    newest = await client.latest("C1")
    assert newest is not None and (newest.tick.id, newest.tick.price, newest.next) == (
        "12-0", 102.0, 102.5)  # fmt: skip
    assert client.forecast_stream("C1") == f"latest:{{p{crc_partition('C1', 4)}}}:forecasts:C1"


async def test_entries_that_do_not_parse_are_skipped_counted_and_logged_once(redis_client, caplog):
    keys = Keys("skip")
    client = Client(redis_client, keys)
    stream = keys.forecasts("S")
    await redis_client.xadd(stream, {"symbol": "S"}, id="1-0")  # no tick_id, no price
    await put_forecast(redis_client, keys, "S", "2-0", 10.0)
    await redis_client.xadd(stream, {"tick_id": "3-0", "symbol": "S", "price": "x"}, id="3-0")
    await put_forecast(redis_client, keys, "S", "4-0", 11.0)
    deep = "[" * 100_000 + "]" * 100_000  # JSON nested past Python's recursion limit
    for n, field in [(5, "path"), (6, "bands")]:
        entry = {"tick_id": f"{n}-0", "symbol": "S", "price": "1", "next": "2", field: deep}
        await redis_client.xadd(stream, entry, id=f"{n}-0")
    subscription = client.subscribe(["S"], start="0")
    assert [f.tick.id for f in await subscription.read(0)] == ["2-0", "4-0"]
    assert subscription.skipped == 4
    warnings = [r for r in caplog.records if r.name == "streamcast.client"]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING


async def test_recent_gives_each_symbols_newest_then_reading_goes_on_after_them(redis_client):
    keys = Keys("recent", partitions=2)
    client = Client(redis_client, keys)
    written = await put_forecasts(redis_client, keys, rounds=5)
    subscription = client.subscribe(["C1", "C4"])
    recent = await subscription.recent(2)
    assert [f.tick.id for f in recent] == written["C1"][-2:] + written["C4"][-2:]
    assert await subscription.read(0) == []
    await put_forecast(redis_client, keys, "C4", "9000-0", 1.0)
    assert [f.tick.id for f in await subscription.read(1000)] == ["9000-0"]


async def test_followed_paths_come_among_the_forecasts_as_path_forecasts(redis_client):
    keys = Keys("paths", partitions=4)
    client = Client(redis_client, keys)
    for k, (symbol, price) in enumerate([("C1", 10.0), ("C4", 40.0)]):
        await put_forecast(redis_client, keys, symbol, f"100-{k}", price)
        await put_forecast(redis_client, keys, symbol, f"101-{k}", price + 1)
    await put_path(redis_client, keys, "C1", "100-0", 10.0)  # from C1's first tick
    assert keys.paths("C1") == f"paths:{{p{crc_partition('C1', 4)}}}:paths:C1"
    assert client.path_stream("C1") == keys.paths("C1")
    # not followed: the forecasts alone, as before
    alone = await client.subscribe(["C1", "C4"], start="0").read(0)
    assert [(type(f), f.tick.id) for f in alone] == [
        (Forecast, "100-0"), (Forecast, "100-1"), (Forecast, "101-0"), (Forecast, "101-1")]  # fmt: skip
    # followed: the path after its tick's forecast (the same id), by tick id across the rest
    subscription = client.subscribe(["C1", "C4"], start="0", paths=True)
    got = await subscription.read(0)
    assert [(type(f), f.tick.symbol, f.tick.id) for f in got] == [
        (Forecast, "C1", "100-0"), (PathForecast, "C1", "100-0"), (Forecast, "C4", "100-1"),
        (Forecast, "C1", "101-0"), (Forecast, "C4", "101-1")]  # fmt: skip
    path = got[1]
    assert path == PathForecast(Tick("100-0", "C1", 10.0, 1_700_000_000_000), "v1", None,
                                (11.0, 12.0), None, 9, PATH_BANDS)  # fmt: skip
    assert isinstance(path, Forecast) and path != got[0]
    # a path published later, for a tick read before: the next read has it, alone
    await put_path(redis_client, keys, "C4", "101-1", 41.0)
    later = await subscription.read(1000)
    assert [(type(f), f.tick.id, f.tick.price, f.next, f.path) for f in later] == [
        (PathForecast, "101-1", 41.0, None, (42.0, 43.0))]  # fmt: skip
    # from now on ("$"): neither stream's stored entries, then each new one of both
    fresh = client.subscribe(["C1"], paths=True)
    assert await fresh.read(0) == []
    await put_forecast(redis_client, keys, "C1", "200-0", 20.0)
    await put_path(redis_client, keys, "C1", "200-0", 20.0)
    assert [type(f) for f in await fresh.read(1000)] == [Forecast, PathForecast]
    # the iterator too; count counts the paths
    got = [f async for f in client.forecasts(["C1"], start="0", count=4, paths=True)]
    assert [(type(f).__name__, f.tick.id) for f in got] == [
        ("Forecast", "100-0"), ("PathForecast", "100-0"), ("Forecast", "101-0"),
        ("Forecast", "200-0")]  # fmt: skip


async def test_a_withheld_path_is_a_path_forecast_with_its_reason(redis_client):
    keys = Keys("withheld")
    tick = Tick("5-0", "W", 3.0, None)
    entry = Forecast.path_of(tick, "v1", [4.0, float("nan")], PATH_BANDS).encode(now_ms=1)
    await redis_client.xadd(keys.paths("W"), entry, id="5-0")
    # what the paths stream holds: no next, no path, no bands; the reason
    assert "next" not in entry and "path" not in entry and "bands" not in entry
    [got] = await Client(redis_client, keys).subscribe(["W"], start="0", paths=True).read(0)
    assert isinstance(got, PathForecast)
    assert (got.next, got.path, got.reason, got.bands) == (None, None, "path is not finite", None)


async def test_latest_path_is_the_newest_path_or_none(redis_client):
    keys = Keys("lpath", partitions=4)
    client = Client(redis_client, keys)
    assert await client.latest_path("C1") is None
    await put_forecast(redis_client, keys, "C1", "10-0", 100.0)
    assert await client.latest_path("C1") is None  # a forecast is no path
    for i in range(3):
        await put_path(redis_client, keys, "C1", f"{10 + i}-0", 100.0 + i)
    await put_forecast(redis_client, keys, "C1", "20-0", 110.0)  # newer than every path
    newest = await client.latest_path("C1")
    assert isinstance(newest, PathForecast)
    assert (newest.tick.id, newest.tick.price, newest.next, newest.path, newest.bands) == (
        "12-0", 102.0, None, (103.0, 104.0), PATH_BANDS)  # fmt: skip
    latest = await client.latest("C1")
    assert latest is not None and not isinstance(latest, PathForecast)
    assert (latest.tick.id, latest.next) == ("20-0", 110.5)


async def test_recent_with_paths_gives_each_symbols_newest_path_after_its_forecasts(redis_client):
    keys = Keys("rpath", partitions=2)
    client = Client(redis_client, keys)
    written = await put_forecasts(redis_client, keys, rounds=5)
    for tick_id in written["C1"][1:4]:  # paths from C1's 2nd, 3rd and 4th ticks
        await put_path(redis_client, keys, "C1", tick_id, 1.0)
    subscription = client.subscribe(["C1", "C4"], paths=True)
    recent = await subscription.recent(3)
    c1, c4 = written["C1"], written["C4"]
    # C1's newest path (from its 4th tick) among its newest 3 forecasts, by tick id; C4 has none
    assert [(type(f).__name__, f.tick.id) for f in recent] == [
        ("Forecast", c1[2]), ("Forecast", c1[3]), ("PathForecast", c1[3]), ("Forecast", c1[4]),
        ("Forecast", c4[2]), ("Forecast", c4[3]), ("Forecast", c4[4])]  # fmt: skip
    assert [f.tick.id for f in await client.subscribe(["C1"], paths=True).recent(1, paths=3)] == [
        c1[1], c1[2], c1[3], c1[4]]  # fmt: skip
    # reading goes on after them, on both streams
    assert await subscription.read(0) == []
    await put_path(redis_client, keys, "C4", c4[4], 2.0)
    await put_forecast(redis_client, keys, "C4", "9000-0", 1.0)
    assert [(type(f).__name__, f.tick.id) for f in await subscription.read(1000)] == [
        ("PathForecast", c4[4]), ("Forecast", "9000-0")]  # fmt: skip


async def test_symbols_are_gathered_from_every_partition(redis_client):
    keys = Keys("names", partitions=4)
    for symbol in SYMBOLS:
        await redis_client.sadd(keys.symbols(keys.partition(symbol)), symbol)
    assert await Client(redis_client, keys).symbols() == sorted(SYMBOLS)
    assert await Client(redis_client, keys).symbols(limit=3) == sorted(SYMBOLS)[:3]


async def test_symbols_with_a_limit_stay_bounded_however_many_names_there_are(redis_client):
    """A feed of distinct names only grows the symbol sets: past 10,000 in all, a limited ask
    (the live page's) samples each partition instead of reading every name."""
    keys = Keys("many-names", partitions=3)
    names = [f"N{i:05d}" for i in range(30_000)]
    pipe = redis_client.pipeline(transaction=False)
    for start in range(0, len(names), 1000):
        for name in names[start : start + 1000]:
            pipe.sadd(keys.symbols(keys.partition(name)), name)
    await pipe.execute()
    before = (await redis_client.info("commandstats")).get("cmdstat_smembers", {}).get("calls", 0)
    got = await Client(redis_client, keys).symbols(limit=12)
    after = (await redis_client.info("commandstats")).get("cmdstat_smembers", {}).get("calls", 0)
    assert len(got) == 12 and got == sorted(got) and set(got) <= set(names)
    assert after == before, "read every name"


# -- the partition count ----------------------------------------------------------------------


async def test_connect_reads_the_partition_count_from_the_meta_hash(redis_server, redis_client):
    async with await Client.connect(redis_server.url, prefix="meta") as client:
        assert client.keys == Keys("meta", 1)  # no daemon wrote it: one partition
    await redis_client.hset("meta:meta", "partitions", "6")
    assert await deployed_partitions(redis_client, "meta") == 6
    async with await Client.connect(redis_server.url, prefix="meta") as client:
        assert client.keys == Keys("meta", 6)
        await client.publish("C3", 1.5)
        assert await redis_client.xlen(f"meta:{{p{crc_partition('C3', 6)}}}:ticks") == 1
    async with await Client.connect(redis_server.url, prefix="meta", partitions=2) as client:
        assert client.keys.partitions == 2  # given: not asked
    assert await redis_client.ping()  # the clients closed their own connections, not this one


# -- on a Redis Cluster ------------------------------------------------------------------------


async def test_forecasts_come_in_order_on_a_cluster_over_six_partitions(cluster, cluster_client):
    keys = Keys("cl", partitions=6)
    assert len({keys.partition(s) for s in SYMBOLS}) >= 4  # several slots, several nodes
    assert keys.partition("C0") != keys.partition("C2")
    # what the client must avoid: one XREAD over several partitions' slots
    with pytest.raises((ClusterCrossSlotError, RedisClusterException)):
        await cluster_client.xread({keys.forecasts("C0"): "0", keys.forecasts("C2"): "0"})
    written = await put_forecasts(cluster_client, keys, rounds=5)
    async with await Client.connect(cluster.url, prefix="cl", partitions=6) as client:
        assert is_cluster(client.redis)
        got = [f async for f in client.forecasts(SYMBOLS, start="0", count=50)]
        assert by_symbol(got) == written
        assert [f.tick.price for f in got if f.tick.symbol == "C9"] == [100.0 + r for r in range(5)]
        # then new ones, from every partition, while the reader waits
        reader = asyncio.create_task(collect(client.forecasts(SYMBOLS, count=10)))
        await asyncio.sleep(0.3)
        for k, symbol in enumerate(SYMBOLS):
            await put_forecast(cluster_client, keys, symbol, f"7000-{k}", 7.0 + k)
        fresh = await asyncio.wait_for(reader, 10)
        assert sorted((f.tick.symbol, f.tick.id, f.tick.price) for f in fresh) == sorted(
            (s, f"7000-{k}", 7.0 + k) for k, s in enumerate(SYMBOLS)
        )
        newest = await client.latest("C4")
        assert newest is not None and newest.tick.id == "7000-4"
        # paths, followed: in the same sweep (a symbol's paths share its partition's slot)
        followed = client.subscribe(SYMBOLS, paths=True)
        assert await followed.read(0) == []
        for k, symbol in enumerate(SYMBOLS):
            await put_path(cluster_client, keys, symbol, f"7000-{k}", 7.0 + k)
        await put_forecast(cluster_client, keys, "C2", "8000-0", 8.0)
        paths: list[Forecast] = []
        for _ in range(20):  # a sweep a read, each read waits 500 ms at most
            if len(paths) >= 11:
                break
            paths += await followed.read(500)
        assert sorted((type(f).__name__, f.tick.symbol, f.tick.id) for f in paths) == sorted(
            [("PathForecast", s, f"7000-{k}") for k, s in enumerate(SYMBOLS)]
            + [("Forecast", "C2", "8000-0")]
        )
        latest_path = await client.latest_path("C9")
        assert isinstance(latest_path, PathForecast) and latest_path.path == (17.0, 18.0)


async def collect(forecasts) -> list[Forecast]:
    return [f async for f in forecasts]


async def test_an_idle_partition_does_not_hold_back_another_on_a_cluster(cluster, cluster_client):
    """A reader of two partitions sees one's forecast at once, though the other (read first)
    has none: a blocking read of that one would wait there for its whole block."""
    keys = Keys("idle", partitions=6)
    active = "C0"
    idle = next(s for s in SYMBOLS if keys.partition(s) != keys.partition(active))
    subscription = Client(cluster_client, keys).subscribe([idle, active])
    assert await subscription.read(0) == []
    await put_forecast(cluster_client, keys, active, "100-0", 1.0)
    started = asyncio.get_running_loop().time()
    got = await subscription.read(5000)
    assert [(f.tick.symbol, f.tick.id) for f in got] == [(active, "100-0")]
    assert asyncio.get_running_loop().time() - started < 0.5


async def test_publish_many_and_symbols_work_on_a_cluster(cluster_client):
    keys = Keys("clpub", partitions=6)
    client = Client(cluster_client, keys)
    ids = await client.publish_many([(s, 10.0 + i) for i, s in enumerate(SYMBOLS)])
    for i, symbol in enumerate(SYMBOLS):
        entries = await cluster_client.xrange(f"clpub:{{p{crc_partition(symbol, 6)}}}:ticks")
        assert (
            ids[i].encode(),
            {b"symbol": symbol.encode(), b"price": repr(10.0 + i).encode()},
        ) in (entries)
    for symbol in SYMBOLS:
        await cluster_client.sadd(keys.symbols(keys.partition(symbol)), symbol)
    assert await client.symbols() == sorted(SYMBOLS)
