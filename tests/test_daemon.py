"""The daemon against a real redis-server, in-process, with the shipped model."""

from __future__ import annotations

import numpy as np
from prometheus_client import CollectorRegistry

from streamcast.daemon import Daemon, DaemonConfig
from streamcast.data import load_series
from streamcast.keys import Keys
from streamcast.metrics import Metrics
from streamcast.replay import fan_out, replay, symbol_names
from streamcast.wire import Forecast

from .helpers import (
    forecast_ids,
    keep_ticks,
    sample,
    tick_ids_by_symbol,
    wait_for,
    xlen_at_least,
)


async def test_sp500_as_three_symbols_every_eligible_tick_forecast_once(
    redis_client, shipped_engine, shared_data
):
    keys = Keys("sp")
    series = load_series(shared_data / "sp500.csv")
    names = symbol_names("SPX", 3)
    await keep_ticks(redis_client, keys)  # the ticks stream is the truth checked below
    await replay(redis_client, keys, fan_out(series, 3), names, rate=None)
    metrics = Metrics(CollectorRegistry())
    config = DaemonConfig(batch_max_size=1024, path_refresh_s=0.0)
    async with Daemon(redis_client, shipped_engine, metrics, keys=keys, config=config):
        eligible = 3 * (len(series) - 49)

        async def done():
            return sample(metrics, "streamcast_ticks_total", outcome="forecast") >= eligible

        await wait_for(done, timeout_s=120)
        ticks = await tick_ids_by_symbol(redis_client, keys)

        async def last_paths():  # the path lane's: each symbol's path from its last tick
            newest = [await redis_client.xrevrange(keys.paths(n), count=1) for n in names]
            return all(
                e and e[0][0].decode() == ticks[n][-1] for n, e in zip(names, newest, strict=True)
            )

        await wait_for(last_paths, timeout_s=60)
    for name in names:
        entries = await redis_client.xrange(keys.forecasts(name))
        ids = [eid.decode() for eid, _ in entries]
        assert ids == ticks[name][49:], (
            f"{name}: forecasts are not exactly the ticks from the 50th on"
        )
        last = Forecast.decode(entries[-1][1])
        assert last.path is None, "paths are published apart, in the paths stream"
        nexts = [Forecast.decode(f).next for _, f in entries]
        assert np.isfinite(nexts).all()
        assert last.model == shipped_engine.version
        paths = await redis_client.xrange(keys.paths(name))
        assert {eid.decode() for eid, _ in paths} <= set(ticks[name][49:])
        path = Forecast.decode(paths[-1][1])
        assert path.next is None and path.tick.id == ticks[name][-1]
        assert path.path is not None and len(path.path) == 50 and np.isfinite(path.path).all()
        assert path.model == shipped_engine.version
        # the same window's 50-step rollout in one call: the lane's steps add up to it
        window = np.array([Forecast.decode(f).tick.price for _, f in entries[-50:]])
        whole = shipped_engine.rollout(window[None, :], 50)[0]
        assert np.allclose(path.path, whole, rtol=1e-5), "float32 agreement"
    assert sample(metrics, "streamcast_ticks_total", outcome="filling") == 3 * 49
    # online skill: every 1-step forecast but each symbol's last has met its truth
    version = shipped_engine.version
    scored = sample(metrics, "streamcast_forecast_scored_total", horizon="1", version=version)
    assert scored == eligible - 3
    assert sample(metrics, "streamcast_forecast_scored_total", horizon="50", version=version)
    assert np.isfinite(sample(metrics, "streamcast_skill", horizon="1", version=version))
    for stage in ("ingest", "wait", "compute", "publish"):
        assert sample(metrics, "streamcast_stage_seconds_count", stage=stage) > 0
    assert await redis_client.xpending(keys.ticks(0), keys.group) == {
        "pending": 0,
        "min": None,
        "max": None,
        "consumers": [],
    }


MALFORMED = [
    ({"price": "1.0"}, "missing_symbol"),
    ({"symbol": "bad symbol!", "price": "1.0"}, "bad_symbol"),
    ({"symbol": "M0"}, "missing_price"),
    ({"symbol": "M0", "price": "twelve"}, "bad_price"),
    ({"symbol": "M0", "price": "nan"}, "non_finite_price"),
    ({"symbol": "M0", "price": "inf"}, "non_finite_price"),
    ({"symbol": "M0", "price": "-3"}, "non_positive_price"),
    ({"symbol": "M0", "price": "0"}, "non_positive_price"),
    ({"symbol": "M0", "price": "1.0", "ts": "soon"}, "bad_ts"),
    ({"symbol": "M0", "price": "1" * 100}, "oversized"),
    ({"symbol": "M0", "price": "1.0", "junk": "x" * 10_000}, "oversized"),
    ({"symbol": b"\xff\xfe", "price": "1.0"}, "bad_encoding"),
    ({"symbol": "M0", "price": "100.0", "ts": "1"}, "out_of_order"),
]


async def test_malformed_entries_become_dead_letters_and_valid_ticks_are_forecast(
    redis_client, shipped_engine
):
    keys = Keys("bad")
    prices = 100 + np.cumsum(np.random.default_rng(3).normal(0, 0.5, 120))
    bad_at = {10 + 8 * k: case for k, case in enumerate(MALFORMED)}
    valid_ids = []
    for i, price in enumerate(prices):
        if i in bad_at:
            await redis_client.xadd(keys.ticks(0), bad_at[i][0])
        valid_ids.append(
            (
                await redis_client.xadd(
                    keys.ticks(0),
                    {"symbol": "M0", "price": repr(float(price)), "ts": str(10_000 + i)},
                )
            ).decode()
        )
    metrics = Metrics(CollectorRegistry())
    async with Daemon(
        redis_client, shipped_engine, metrics, keys=keys, config=DaemonConfig(batch_max_size=16)
    ):

        async def done():
            return (
                await redis_client.xlen(keys.dead(0)) >= len(MALFORMED)
                and len(await forecast_ids(redis_client, keys, "M0")) >= 71
            )

        await wait_for(done)
    letters = await redis_client.xrange(keys.dead(0))
    reasons = [fields[b"reason"].decode() for _, fields in letters]
    assert reasons == [reason for _, reason in MALFORMED]
    assert all(fields[b"tick_id"] and fields[b"detail"] for _, fields in letters)
    # the original fields travel with the letter
    assert letters[3][1][b"field:price"] == b"twelve"
    assert await forecast_ids(redis_client, keys, "M0") == valid_ids[49:]
    for _, reason in MALFORMED:
        assert sample(metrics, "streamcast_dead_letters_total", reason=reason) >= 1


async def test_restart_rebuilds_windows_from_history_and_forecasts_at_once(
    redis_client, shipped_engine
):
    keys = Keys("restart")
    prices = 50 + np.arange(60, dtype=float)
    for price in prices:
        await redis_client.xadd(keys.ticks(0), {"symbol": "R", "price": repr(float(price))})
    async with Daemon(redis_client, shipped_engine, Metrics(CollectorRegistry()), keys=keys):
        await wait_for(lambda: xlen_at_least(redis_client, keys.forecasts("R"), 11))
    # a new daemon: its first new tick is forecast without waiting for 50 more
    new_id = (await redis_client.xadd(keys.ticks(0), {"symbol": "R", "price": "111.0"})).decode()
    metrics = Metrics(CollectorRegistry())
    async with Daemon(redis_client, shipped_engine, metrics, keys=keys):
        await wait_for(lambda: xlen_at_least(redis_client, keys.forecasts("R"), 12))
    ids = await forecast_ids(redis_client, keys, "R")
    assert ids[-1] == new_id and len(ids) == 12
    assert sample(metrics, "streamcast_ticks_total", outcome="filling") == 0


async def test_static_replicas_split_partitions_and_together_forecast_each_tick_once(
    redis_client, shipped_engine
):
    keys = Keys("shard", partitions=2)
    names = [f"S{k}" for k in range(6)]
    paths = 100 + np.cumsum(np.random.default_rng(5).normal(0, 0.3, (6, 60)), axis=1)
    await replay(redis_client, keys, paths, names, rate=None)
    ticks = await tick_ids_by_symbol(redis_client, keys)  # the truth, before anything is trimmed
    daemons = [
        Daemon(
            redis_client,
            shipped_engine,
            Metrics(CollectorRegistry()),
            keys=keys,
            config=DaemonConfig(
                assignment="static", shard_index=i, shard_count=2, consumer=f"replica-{i}"
            ),
        )
        for i in range(2)
    ]
    for d in daemons:
        await d.start()
    try:

        async def done():
            lengths = [await redis_client.xlen(keys.forecasts(n)) for n in names]
            return all(n >= 11 for n in lengths)

        await wait_for(done)
    finally:
        for d in daemons:
            await d.stop()  # drains: anything doubled is in the streams now
    for name in names:
        assert await forecast_ids(redis_client, keys, name) == ticks[name][49:], name
    owners = {n: keys.partition(n) for n in names}
    assert set(owners.values()) == {0, 1}, "the test symbols should land on both partitions"
    for i, d in enumerate(daemons):
        assert sorted(d.windows.symbols()) == sorted(n for n, o in owners.items() if o == i)


async def test_entries_left_pending_by_a_dead_consumer_are_reclaimed(redis_client, shipped_engine):
    keys = Keys("claim")
    group = keys.group
    await redis_client.xgroup_create(keys.ticks(0), group, id="0", mkstream=True)
    ids = []
    for i in range(55):
        eid = await redis_client.xadd(keys.ticks(0), {"symbol": "C", "price": repr(100.0 + i)})
        ids.append(eid.decode())
    # another consumer read them all, then died without acknowledging
    await redis_client.xreadgroup(group, "dead-replica", {keys.ticks(0): ">"}, count=100)
    assert (await redis_client.xpending(keys.ticks(0), group))["pending"] == 55
    config = DaemonConfig(claim_idle_ms=200, claim_interval_s=0.5)
    async with Daemon(
        redis_client, shipped_engine, Metrics(CollectorRegistry()), keys=keys, config=config
    ):
        await wait_for(lambda: xlen_at_least(redis_client, keys.forecasts("C"), 6), timeout_s=30)
    assert await forecast_ids(redis_client, keys, "C") == ids[49:]
    assert (await redis_client.xpending(keys.ticks(0), group))["pending"] == 0


def test_the_sink_counts_forecasts_and_withheld_nexts_not_paths():
    """Paths are the path lane's (counted when it publishes them); the sink counts what the
    batch published: forecasts, withheld nexts and dead letters."""
    from streamcast.daemon.batch import Batch, Stats
    from streamcast.daemon.sink import ForecastSink
    from streamcast.wire import DeadLetter, Tick

    ticks = [Tick(f"{i}-0", "S", 100.0, None) for i in (1, 2, 3)]
    batch = Batch(ready=ticks)
    batch.forecasts = [
        Forecast.of(ticks[0], "v", 101.0),
        Forecast.of(ticks[1], "v", float("nan")),  # withheld
    ]
    batch.dead_letter("S", DeadLetter("3-0", "unforecastable", "boom", {"symbol": "S"}))
    metrics, stats = Metrics(CollectorRegistry()), Stats()
    sink = ForecastSink(None, None, Keys("t"), "g", DaemonConfig(), metrics, stats)  # type: ignore[arg-type]
    sink._count(batch)
    assert (stats.paths, stats.forecasts, stats.dead) == (0, 2, 1)
    assert sample(metrics, "streamcast_forecasts_total", kind="next") == 1
    assert sample(metrics, "streamcast_forecasts_withheld_total", kind="next") == 1
    assert sample(metrics, "streamcast_forecasts_total", kind="path") == 0


async def test_stop_after_the_consume_loop_failed_still_releases_the_lease(
    redis_client, shipped_engine
):
    """A bug that ends the consume loop is logged there; stop() must still stop the other tasks
    and release the lease (it used to re-raise the failure half-way and leave the lease held)."""
    keys = Keys("crashed")
    daemon = Daemon(redis_client, shipped_engine, Metrics(CollectorRegistry()), keys=keys)
    await daemon.start()
    await wait_for(lambda: daemon.ready, what="the daemon ready")

    async def bug() -> bool:
        raise RuntimeError("a bug in the loop")

    daemon._step = bug  # type: ignore[method-assign]
    await wait_for(lambda: daemon._tasks[0].done(), what="the consume loop ended")
    await daemon.stop()
    assert await redis_client.get(keys.lease(0)) is None
    assert not daemon._tasks and not daemon.ownership.held
