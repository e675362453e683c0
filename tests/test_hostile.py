"""The daemon run the way operators and hostile clients run it, on a real redis-server.

Each test is a case of docs/RELIABILITY.md ("Operators and hostile clients"): the stream or the
group deleted under it, FLUSHDB, Redis at maxmemory, the ticks stream growing forever, bad
history, absurd prices and times, huge entries, symbols that never come back. In-process
daemons (one event loop, the shipped model) keep them fast; `serve` as a process is tested where
the process matters (tests/test_hostile_serve.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from streamcast.daemon import Daemon, DaemonConfig
from streamcast.daemon.compute import rows_apart
from streamcast.keys import Keys
from streamcast.metrics import Metrics
from streamcast.wire import REASONS, Forecast, Tick, TickLimits

from .helpers import sample, start_redis_server, wait_for, xlen_at_least


class Feed:
    """Writes ticks and remembers each one's id by symbol: the truth the checks compare with."""

    def __init__(self, redis, keys: Keys, names: list[str], seed: int = 0) -> None:
        self.redis, self.keys, self.names = redis, keys, names
        self.rng = np.random.default_rng(seed)
        self.price = {n: 100.0 * (1 + i) for i, n in enumerate(names)}
        self.ids: dict[str, list[str]] = {n: [] for n in names}

    async def send(self, rounds: int, pause_s: float = 0.0, only: list[str] | None = None) -> None:
        names = only or self.names
        for _ in range(rounds):
            pipe = self.redis.pipeline(transaction=False)
            for name in names:
                self.price[name] *= float(np.exp(self.rng.normal(0, 0.005)))
                pipe.xadd(self.keys.ticks_for(name), Tick.encode(name, self.price[name]))
            for name, eid in zip(names, await pipe.execute(), strict=True):
                self.ids[name].append(eid.decode())
            if pause_s:
                await asyncio.sleep(pause_s)

    async def forecast_ids(self, name: str) -> list[str]:
        return [e.decode() for e, _ in await self.redis.xrange(self.keys.forecasts(name))]

    async def all_forecast(self) -> bool:
        for name in self.names:
            expected = self.ids[name][49:]
            got = await self.redis.xlen(self.keys.forecasts(name))
            if got < len(expected):
                return False
        return True

    async def check_exactly_once(self) -> None:
        for name in self.names:
            assert await self.forecast_ids(name) == self.ids[name][49:], (
                f"{name}: lost or doubled forecasts"
            )


def daemon_for(redis, engine, keys: Keys, **config) -> Daemon:
    return Daemon(
        redis, engine, Metrics(CollectorRegistry()), keys=keys, config=DaemonConfig(**config)
    )


# -- (2) Redis error replies: deleted stream or group, FLUSHDB, maxmemory ------------------------


@pytest.mark.parametrize("how", ["xgroup_destroy", "del_stream"])
async def test_group_or_stream_deleted_mid_feed_is_recreated_and_nothing_lost_or_doubled(
    redis_client, shipped_engine, how
):
    keys = Keys(f"gone-{how}")
    feed = Feed(redis_client, keys, ["G0", "G1"])
    # bad entries too: their dead letters must not be written twice after the recreation
    daemon = daemon_for(redis_client, shipped_engine, keys, batch_max_wait_ms=0)
    async with daemon:
        await feed.send(80)
        await redis_client.xadd(keys.ticks(0), {"symbol": "G0", "price": "oops"})
        await wait_for(feed.all_forecast, what="first forecasts")
        await wait_for(lambda: redis_client.xlen(keys.dead(0)), what="the dead letter")
        if how == "xgroup_destroy":
            await redis_client.xgroup_destroy(keys.ticks(0), daemon.group)
        else:
            await redis_client.delete(keys.ticks(0))
        await feed.send(40, pause_s=0.01)
        await wait_for(feed.all_forecast, what="forecasts after the recreation")
        assert not daemon._tasks[0].done(), "the consume loop ended"
        assert daemon.ready
    await feed.check_exactly_once()
    assert sample(daemon.metrics, "streamcast_recoveries_total", what="group_recreated") >= 1
    assert await redis_client.xlen(keys.dead(0)) == 1, "a dead letter was written twice"


async def test_flushdb_mid_feed_daemon_goes_on_and_forecasts_new_ticks(
    redis_client, shipped_engine
):
    keys = Keys("flush")
    feed = Feed(redis_client, keys, ["F0"])
    daemon = daemon_for(redis_client, shipped_engine, keys, batch_max_wait_ms=0)
    async with daemon:
        await feed.send(60)
        await wait_for(feed.all_forecast)
        await redis_client.flushdb()
        feed.ids = {"F0": []}  # everything is gone, history too: the window fills again
        await feed.send(60, pause_s=0.005)
        await wait_for(feed.all_forecast, what="forecasts after FLUSHDB")
        assert not daemon._tasks[0].done()
    await feed.check_exactly_once()


async def test_redis_at_maxmemory_backs_off_not_ready_then_loses_nothing(
    redis_client, shipped_engine
):
    keys = Keys("oom")
    feed = Feed(redis_client, keys, ["M0", "M1"])
    await feed.send(200)
    await redis_client.config_set("maxmemory-policy", "noeviction")
    used = (await redis_client.info("memory"))["used_memory"]
    await redis_client.config_set("maxmemory", str(used + 64 * 1024))
    daemon = daemon_for(redis_client, shipped_engine, keys)
    try:
        async with daemon:

            async def refused():
                return sample(daemon.metrics, "streamcast_redis_refusals_total", reason="OOM")

            await wait_for(refused, what="an OOM refusal")
            assert not daemon.ready, "/readyz must say 503 while Redis refuses writes"
            assert await redis_client.xlen(keys.forecasts("M0")) == 0
            await redis_client.config_set("maxmemory", "0")
            await wait_for(feed.all_forecast, what="forecasts once memory is back")
            await wait_for(lambda: asyncio.sleep(0, daemon.ready))
            assert not daemon._tasks[0].done()
    finally:
        await redis_client.config_set("maxmemory", "0")
    await feed.check_exactly_once()


async def test_redis_demoted_to_a_replica_mid_feed_backs_off_then_loses_nothing(
    redis_server, redis_client, shipped_engine, tmp_path
):
    """A failover done the other way round under the daemon: its Redis becomes a replica of
    another (READONLY to every write, XREADGROUP included), ticks go on arriving at the new
    master, then it is master again: back off, not ready meanwhile, then every tick forecast
    once."""
    from streamcast.connect import make_redis

    keys = Keys("demoted")
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    other = start_redis_server(other_dir)
    other_client = make_redis(other.url)

    async def replica_of(client, master) -> None:
        await client.replicaof("127.0.0.1", master.port)

        async def synced() -> bool:
            return (await client.info("replication")).get("master_link_status") == "up"

        await wait_for(synced, what="the replica in sync")

    try:
        await replica_of(other_client, redis_server)
        feed = Feed(redis_client, keys, ["R0", "R1"])
        daemon = daemon_for(redis_client, shipped_engine, keys)
        async with daemon:
            await feed.send(60)
            await wait_for(feed.all_forecast, what="forecasts before the demotion")
            # the other is master now, and the daemon's Redis its replica
            await other_client.replicaof("NO", "ONE")
            await replica_of(redis_client, other)
            feed.redis = other_client
            await feed.send(10, pause_s=0.01)

            async def refused():
                name = "streamcast_redis_refusals_total"
                return sample(daemon.metrics, name, reason="READONLY", absent=0.0)

            await wait_for(refused, what="a READONLY refusal")
            assert not daemon.ready, "/readyz must say 503 while Redis refuses writes"
            # and back: the daemon's Redis is master again, with the ticks sent meanwhile
            await redis_client.replicaof("NO", "ONE")
            await replica_of(other_client, redis_server)
            feed.redis = redis_client
            await feed.send(10, pause_s=0.01)
            await wait_for(feed.all_forecast, what="forecasts once it is master again")
            await wait_for(lambda: asyncio.sleep(0, daemon.ready))
            assert not daemon._tasks[0].done()
        await feed.check_exactly_once()
    finally:
        with contextlib.suppress(Exception):
            await redis_client.replicaof("NO", "ONE")
        await other_client.aclose()
        other.process.terminate()
        other.process.wait(10)


async def test_a_refused_forecast_write_is_a_dead_letter_not_silence(redis_client, shipped_engine):
    keys = Keys("wrongtype")
    feed = Feed(redis_client, keys, ["W0", "W1"])
    await redis_client.set(keys.forecasts("W0"), "not a stream")  # an operator's mistake
    daemon = daemon_for(redis_client, shipped_engine, keys, batch_max_wait_ms=0)
    async with daemon:
        await feed.send(49)
        # then one tick each, each in a batch of its own, all within a second: every failed
        # batch's letters must be written, not only the last one's
        for n in range(1, 12):
            await feed.send(1)
            await wait_for(lambda n=n: xlen_at_least(redis_client, keys.forecasts("W1"), n))

        async def letters_written():
            return await redis_client.xlen(keys.dead(0)) >= 11

        await wait_for(letters_written, timeout_s=10, what="W0's 11 dead letters")
    letters = await redis_client.xrange(keys.dead(0))
    assert {f[b"reason"] for _, f in letters} == {b"publish_failed"}
    assert [f[b"tick_id"].decode() for _, f in letters] == feed.ids["W0"][49:]
    assert b"WRONGTYPE" in letters[0][1][b"detail"]
    assert (
        sample(daemon.metrics, "streamcast_write_errors_total", what="forecast", reason="wrongtype")
        == 11
    )
    # counted as what they became: W1's 11 forecasts, W0's 11 dead letters
    assert daemon.stats.forecasts == 11 and daemon.stats.dead == 11
    assert sample(daemon.metrics, "streamcast_ticks_total", outcome="forecast") == 11
    assert sample(daemon.metrics, "streamcast_ticks_total", outcome="dead") == 11
    assert sample(daemon.metrics, "streamcast_dead_letters_total", reason="publish_failed") == 11


async def test_a_forecast_and_its_dead_letter_both_refused_are_named_in_the_log(
    redis_client, shipped_engine, caplog
):
    """The forecasts key and the dead-letter stream both overwritten: the ticks are acknowledged
    (the others of the transaction landed), so the log and a metric must name what was lost."""
    keys = Keys("wrongtwice")
    feed = Feed(redis_client, keys, ["W0", "W1"])
    await redis_client.set(keys.forecasts("W0"), "not a stream")
    await redis_client.set(keys.dead(0), "not a stream either")
    caplog.set_level("ERROR", logger="streamcast.daemon")
    daemon = daemon_for(redis_client, shipped_engine, keys)
    async with daemon:
        await feed.send(52)
        await wait_for(lambda: xlen_at_least(redis_client, keys.forecasts("W1"), 3))

        async def counted():
            name, what = "streamcast_write_errors_total", "publish_failed"
            return sample(daemon.metrics, name, what=what, reason="wrongtype") == 3

        await wait_for(counted, what="three dead letters counted as not written")
        assert not daemon._tasks[0].done()
    said = " ".join(
        r.getMessage()
        for r in caplog.records
        if "neither were their dead letters" in r.getMessage()
    )
    assert "WRONGTYPE" in said
    assert all(tick_id in said for tick_id in feed.ids["W0"][49:]), said
    assert await redis_client.xlen(keys.forecasts("W1")) == 3


# -- (3) the ticks stream is trimmed to what every group has acknowledged --------------------------


async def test_ticks_trimmed_bounded_over_a_long_replay_with_three_replicas_nothing_lost(
    redis_client, shipped_engine
):
    keys = Keys("trim", partitions=3)
    names = [f"T{i}" for i in range(9)]
    assert {keys.partition(n) for n in names} == {0, 1, 2}
    feed = Feed(redis_client, keys, names)
    daemons = [
        daemon_for(
            redis_client,
            shipped_engine,
            keys,
            assignment="static",
            shard_index=i,
            shard_count=3,
            consumer=f"r{i}",
            ticks_trim_interval_s=0.2,
            batch_max_wait_ms=0,
        )
        for i in range(3)
    ]
    lengths = []
    for d in daemons:
        await d.start()
    try:
        for _ in range(30):  # 30 x 20 rounds x 9 symbols = 5,400 ticks, ~600 a second
            await feed.send(20, pause_s=0.015)
            lengths.append(sum([await redis_client.xlen(t) for t in keys.all_ticks()]))
        await wait_for(feed.all_forecast, timeout_s=120, what="every tick forecast")
        for ticks in keys.all_ticks():
            await wait_for(lambda t=ticks: _xlen_below(redis_client, t, 300), what="final trim")
    finally:
        for d in daemons:
            await d.stop()
    await feed.check_exactly_once()
    total = sum(len(v) for v in feed.ids.values())
    assert total == 5400
    # bounded: never near the total; it holds what the slowest group has not acknowledged yet
    # (the daemons warm up in the first seconds) plus part of a node (~100 entries: approximate
    # trimming frees whole nodes)
    assert max(lengths) < 5400 // 2, lengths
    trimmed = sum(sample(d.metrics, "streamcast_ticks_trimmed_total") for d in daemons)
    assert trimmed >= 5400 - 300


async def _xlen_below(redis, key: str, bound: int) -> bool:
    return await redis.xlen(key) < bound


async def test_trim_never_removes_what_a_slow_group_has_not_acknowledged(
    redis_client, shipped_engine
):
    keys = Keys("trimslow")
    feed = Feed(redis_client, keys, ["S0"])
    # another consumer group (someone's audit reader) read 30 entries and acknowledged 10
    await redis_client.xgroup_create(keys.ticks(0), "audit", id="0", mkstream=True)
    await feed.send(100)
    read = await redis_client.xreadgroup("audit", "a", {keys.ticks(0): ">"}, count=30)
    got = [e[0] for e in read[0][1]]
    await redis_client.xack(keys.ticks(0), "audit", *got[:10])
    daemon = daemon_for(redis_client, shipped_engine, keys, ticks_trim_interval_s=0.2)
    async with daemon:
        await wait_for(feed.all_forecast)
        rounds = daemon.trim_rounds
        await wait_for(lambda: asyncio.sleep(0, daemon.trim_rounds >= rounds + 3), what="trims")
    first = (await redis_client.xrange(keys.ticks(0), count=1))[0][0]
    assert first.decode() <= got[10].decode() or first == got[10]
    remaining = [e.decode() for e, _ in await redis_client.xrange(keys.ticks(0))]
    assert set(feed.ids["S0"][10:]) <= set(remaining), "trimmed an entry the audit group needs"


async def test_trim_waits_for_the_missing_group_bounded_by_its_acknowledged_mark(
    redis_client, shipped_engine
):
    """The forecasters' group destroyed (to be recreated after its acknowledged mark) while an
    audit group has read every entry: the mark bounds the trim; with no mark, nothing goes."""
    keys = Keys("trimwait")
    feed = Feed(redis_client, keys, ["S0"])
    await feed.send(1000)
    ticks, ids = keys.ticks(0), feed.ids["S0"]
    await redis_client.xgroup_create(ticks, "audit", id="$")  # needs nothing already there
    daemon = daemon_for(redis_client, shipped_engine, keys)  # not started: its trimmer alone
    await daemon.trimmer.trim(0)
    assert await redis_client.xlen(ticks) == 1000, "trimmed with nothing known acknowledged"
    await redis_client.set(keys.acked(0), ids[599])
    await daemon.trimmer.trim(0)
    remaining = [e.decode() for e, _ in await redis_client.xrange(ticks)]
    assert remaining[-400:] == ids[600:], "trimmed past the acknowledged mark"
    assert len(remaining) <= 1000 - 100, "the mark did not let the trim run"  # whole nodes go


# -- (4) one symbol's bad history never fails a batch ---------------------------------------------


async def test_bad_price_in_history_is_skipped_and_other_symbols_forecast(
    redis_client, shipped_engine
):
    keys = Keys("badhist")
    # history written raw, as an old import or a hand-made XADD could: a 0 and a 1e-320 in it
    for i in range(60):
        price = {20: "0", 40: "1e-320"}.get(i, repr(100.0 + i))
        await redis_client.xadd(keys.history("H0"), {"price": price}, id=f"0-{i + 1}")
    await redis_client.sadd(keys.symbols(0), "H0")
    feed = Feed(redis_client, keys, ["H0", "H1"])
    daemon = daemon_for(redis_client, shipped_engine, keys)
    async with daemon:
        await feed.send(60)

        async def both():
            return (
                await redis_client.xlen(keys.forecasts("H1")) == 11
                and await redis_client.xlen(keys.forecasts("H0")) == 60
            )

        await wait_for(both, what="both symbols forecast")
    assert sample(daemon.metrics, "streamcast_history_skipped_total") == 2
    nexts = [Forecast.decode(f).next for _, f in await redis_client.xrange(keys.forecasts("H0"))]
    assert np.isfinite(nexts).all()


async def test_a_restored_window_is_the_newest_valid_history_and_older_entries_are_not_read(
    redis_client, shipped_engine
):
    keys = Keys("restore")
    # 120 entries: a bad one among the newest 50 (skipped, one older fills in), another far older
    # than the window needs (never decoded, so not counted)
    for i in range(120):
        price = {110: "nan", 5: "0"}.get(i, repr(100.0 + i))
        await redis_client.xadd(
            keys.history("R"), {"price": price, "ts": str(1000 + i)}, id=f"0-{i + 1}"
        )
    daemon = daemon_for(redis_client, shipped_engine, keys)
    ticks = keys.ticks_for("R")
    await daemon.planner.restore([(ticks, "1-0", {b"symbol": b"R", b"price": b"1"})])
    window = daemon.planner.windows.get("R")
    expected = [100.0 + i for i in range(69, 120) if i != 110]
    assert list(window.prices) == expected
    assert window.last_id == (0, 120) and window.last_ts == 1119
    assert sample(daemon.metrics, "streamcast_history_skipped_total") == 1


async def test_after_a_failure_the_pending_scores_are_forgotten_with_the_windows(
    redis_client, shipped_engine
):
    """A publish whose EXEC reply was lost may have landed: its forecasts were never recorded
    for scoring, so the pending ones of its symbols would be scored against the wrong ticks."""
    keys = Keys("pendingreset")
    feed = Feed(redis_client, keys, ["Q1"])
    daemon = daemon_for(redis_client, shipped_engine, keys, path_refresh_s=0.0)
    async with daemon:
        await feed.send(55)
        await wait_for(
            lambda: xlen_at_least(redis_client, keys.forecasts("Q1"), 6), what="forecasts"
        )
        await wait_for(lambda: "Q1" in daemon.skill._next, what="a pending 1-step score")
        assert daemon.calibration is not None and "Q1" in daemon.calibration._next
        await daemon._setup()  # what the loop does after an outage
        assert "Q1" not in daemon.skill._next and "Q1" not in daemon.skill._paths
        assert "Q1" not in daemon.calibration._next and "Q1" not in daemon.calibration._paths


def test_an_engine_failure_on_one_window_fails_only_that_row():
    def compute(windows: np.ndarray) -> np.ndarray:
        if (windows[:, 0] <= 0).any():
            raise ValueError("a normalised model needs each window's first price > 0")
        return windows[:, -1] * 2

    windows = np.array([[1.0, 2.0], [0.0, 3.0], [4.0, 5.0]])
    out, failed = rows_apart(compute, windows, ())
    assert out[0] == 4.0 and out[2] == 10.0 and np.isnan(out[1])
    assert list(failed) == [1] and "first price > 0" in failed[1]


class _NaNEngine:
    """The shipped engine, but its 1-step output for one symbol's windows is NaN."""

    def __init__(self, engine) -> None:
        self._engine = engine
        self.seq_len, self.normalise, self.version = engine.seq_len, True, "nan-engine"

    def predict_next(self, prices: np.ndarray) -> np.ndarray:
        out = np.array(self._engine.predict_next(prices))
        out[prices[:, -1] > 1000] = np.nan  # the wild symbol
        return out

    def rollout(self, prices: np.ndarray, steps: int = 50) -> np.ndarray:
        out = np.array(self._engine.rollout(prices, steps))
        out[prices[:, -1] > 1000] = np.inf
        return out


# -- (7) no non-finite value is published; the skill stays finite ---------------------------------


async def test_non_finite_output_is_withheld_with_a_reason_and_skill_stays_finite(
    redis_client, shipped_engine
):
    keys = Keys("nan")
    feed = Feed(redis_client, keys, ["N0", "N1"])
    feed.price["N1"] = 5000.0
    daemon = Daemon(
        redis_client,
        _NaNEngine(shipped_engine),
        Metrics(CollectorRegistry()),
        keys=keys,
        config=DaemonConfig(path_refresh_s=0.0),
    )
    async with daemon:
        await feed.send(120)
        await wait_for(feed.all_forecast)
    wild = [
        Forecast.decode(f).as_dict() for _, f in await redis_client.xrange(keys.forecasts("N1"))
    ]
    assert all("next" not in f and "path" not in f for f in wild)
    assert all(
        f["reason"] == "next is not finite; path is not finite"
        or f["reason"] == "next is not finite"
        for f in wild
    )
    calm = [
        Forecast.decode(f).as_dict() for _, f in await redis_client.xrange(keys.forecasts("N0"))
    ]
    assert all(np.isfinite(f["next"]) and "reason" not in f for f in calm)
    assert sample(daemon.metrics, "streamcast_forecasts_withheld_total", kind="next") == len(wild)
    snapshot = daemon.skill.snapshot()
    values = [v for h in snapshot.values() for s in h.values() for v in s.values()]
    assert values and np.isfinite(values).all(), snapshot
    squared = sample(
        daemon.metrics,
        "streamcast_forecast_squared_error_total",
        horizon="1",
        version="nan-engine",
        forecaster="model",
    )
    assert np.isfinite(squared)


async def test_absurd_prices_are_dead_letters_at_the_edge(redis_client, shipped_engine):
    keys = Keys("absurd")
    limits = TickLimits(price_min=1e-6, price_max=1e9)
    daemon = daemon_for(redis_client, shipped_engine, keys, limits=limits)
    for price in (
        "1e-320",
        "1e300",
        "-5",
        "+100",
        " 12.5 ",
        "1_000",
        "\u0661\u0662",
        "\uff11\uff12",
    ):
        await redis_client.xadd(keys.ticks(0), {"symbol": "A", "price": price})
    async with daemon:
        await wait_for(lambda: xlen_at_least(redis_client, keys.dead(0), 8))
    reasons = [f[b"reason"].decode() for _, f in await redis_client.xrange(keys.dead(0))]
    assert reasons == [
        "price_out_of_range",
        "price_out_of_range",
        "non_positive_price",
        "bad_price",
        "bad_price",
        "bad_price",
        "bad_price",
        "bad_price",
    ]


# -- (8) one wrong timestamp never locks a symbol out ---------------------------------------------


async def test_a_far_future_ts_is_a_dead_letter_and_changes_no_state(redis_client, shipped_engine):
    keys = Keys("future")
    now_ms = int(time.time() * 1000)
    await redis_client.xadd(
        keys.ticks(0), {"symbol": "Z", "price": "10", "ts": str(now_ms + 10**9)}
    )
    await redis_client.xadd(keys.ticks(0), {"symbol": "Z", "price": "10", "ts": str(now_ms * 1000)})
    for i in range(60):
        await redis_client.xadd(
            keys.ticks(0), {"symbol": "Z", "price": repr(10.0 + i / 10), "ts": str(now_ms + i)}
        )
    daemon = daemon_for(redis_client, shipped_engine, keys)
    async with daemon:
        await wait_for(lambda: xlen_at_least(redis_client, keys.forecasts("Z"), 11))
    letters = await redis_client.xrange(keys.dead(0))
    assert [f[b"reason"] for _, f in letters] == [b"bad_ts", b"bad_ts"]
    assert b"ahead of its arrival" in letters[0][1][b"detail"]
    assert await redis_client.xlen(keys.forecasts("Z")) == 11, "a later tick was locked out"


async def test_a_far_future_ts_already_in_history_does_not_lock_the_symbol(
    redis_client, shipped_engine
):
    keys = Keys("futurehist")
    now_ms = int(time.time() * 1000)
    await redis_client.xadd(keys.history("Y"), {"price": "10", "ts": str(now_ms * 1000)}, id="1-0")
    daemon = daemon_for(redis_client, shipped_engine, keys)
    for i in range(60):
        await redis_client.xadd(
            keys.ticks(0), {"symbol": "Y", "price": "10.5", "ts": str(now_ms + i)}
        )
    async with daemon:
        await wait_for(lambda: xlen_at_least(redis_client, keys.forecasts("Y"), 12))
    assert await redis_client.xlen(keys.dead(0)) == 0


# -- (9) large entries: bounded reads, small dead letters ------------------------------------------


async def add_huge(redis, stream: str, n: int, size: int, transaction: bool = False) -> None:
    """``n`` ticks each with a junk field of ``size`` bytes (each a dead letter: oversized)."""
    blob = b"x" * size
    pipe = redis.pipeline(transaction=transaction)
    for i in range(n):
        pipe.xadd(stream, {"symbol": "B", "price": "10", "junk": blob, f"k{i}": "v"})
    await pipe.execute()


async def test_huge_entries_are_read_a_few_at_a_time_and_dead_letters_stay_small(
    redis_client, shipped_engine
):
    keys = Keys("huge")
    await add_huge(redis_client, keys.ticks(0), 40, 1_000_000)
    daemon = daemon_for(redis_client, shipped_engine, keys, read_max_bytes=4_000_000)
    async with daemon:
        await wait_for(lambda: xlen_at_least(redis_client, keys.dead(0), 40))
        assert daemon.source._read_count <= 4, "reads did not shrink to the byte budget"
    letters = await redis_client.xrange(keys.dead(0))
    assert {f[b"reason"] for _, f in letters} == {b"oversized"}
    for _, fields in letters:
        assert len(fields[b"field:junk"]) == 256 and fields[b"size:junk"] == b"1000000"
        assert sum(len(k) + len(v) for k, v in fields.items()) < 2048
    memory = await redis_client.memory_usage(keys.dead(0))
    assert memory < 200_000, f"the dead stream takes {memory} bytes for 40 letters"


async def test_huge_entries_left_pending_are_taken_over_without_one_huge_reply(
    redis_client, shipped_engine
):
    """200 entries of 256 kB pending under a consumer that died, and Redis closing any client
    whose replies pass 32 MB: the takeover claims ids only and reads the entries a few at a
    time (before: one XAUTOCLAIM of up to 1,000 whole entries, 51 MB here: the connection was
    closed at every try, and the next replica to take the partition would do the same)."""
    keys = Keys("hugeclaim")
    await add_huge(redis_client, keys.ticks(0), 200, 256_000)
    await redis_client.xgroup_create(keys.ticks(0), keys.group, id="0")
    for _ in range(10):  # a dead consumer's: read, never acknowledged
        await redis_client.xreadgroup(keys.group, "dead", {keys.ticks(0): ">"}, count=20)
    before = await redis_client.config_get("client-output-buffer-limit")
    await redis_client.config_set("client-output-buffer-limit", "normal 32mb 32mb 0")
    try:
        daemon = daemon_for(redis_client, shipped_engine, keys, read_max_bytes=4_000_000)
        async with daemon:
            await wait_for(
                lambda: xlen_at_least(redis_client, keys.dead(0), 200),
                timeout_s=60,
                what="200 dead letters",
            )
        summary = await redis_client.xpending(keys.ticks(0), keys.group)
        assert summary["pending"] == 0
    finally:
        await redis_client.config_set(
            "client-output-buffer-limit", before["client-output-buffer-limit"]
        )


@pytest.mark.parametrize("reads", ["not_retried", "retried"])
async def test_a_burst_of_huge_entries_after_small_ones_is_read_once_redis_caps_replies(
    redis_server, redis_client, shipped_engine, reads, caplog
):
    """Small ticks grow the read to a full batch (512); then 200 entries of 256 kB: one read of
    all of them, 51 MB, which Redis's `client-output-buffer-limit` (32 MB here) answers by
    closing the connection, after it delivered them. Each read that loses its connection asks
    for half as many next time (before: the same 512 again after each back-off, for ever).

    `not_retried`, as `serve` reads (a client that never retries by itself): the lost read is an
    outage, so the partition is set up again and its pending entries read first, at once (the
    reclaim is 10 minutes away here). `retried` (a client that retries, as an embedding could
    pass): the retry reads on past the delivered entries; the reclaim, which claims our own
    idle entries too, brings them back."""
    from streamcast.connect import make_redis

    keys = Keys(f"hugeburst-{reads}")
    feed = Feed(redis_client, keys, ["S0"])
    reader = make_redis(redis_server.url, retries=0) if reads == "not_retried" else None
    claims = {"claim_idle_ms": 600_000} if reader else {"claim_idle_ms": 1000}
    config = DaemonConfig(read_max_bytes=4_000_000, claim_interval_s=1.0, **claims)
    metrics = Metrics(CollectorRegistry())
    daemon = Daemon(
        redis_client, shipped_engine, metrics, keys=keys, config=config, publisher=reader
    )
    caplog.set_level(logging.INFO, logger="streamcast.daemon.source")
    before = await redis_client.config_get("client-output-buffer-limit")
    try:
        async with daemon:
            await feed.send(2000)
            await wait_for(feed.all_forecast, timeout_s=60)
            assert daemon.source._read_count == 512, "small ticks: a full batch a read"
            await redis_client.config_set("client-output-buffer-limit", "normal 32mb 32mb 0")
            # in one transaction: all there for the next read
            await add_huge(redis_client, keys.ticks(0), 200, 256_000, transaction=True)
            await wait_for(
                lambda: xlen_at_least(redis_client, keys.dead(0), 200),
                timeout_s=60,
                what="200 dead letters",
            )
            assert daemon.source._read_count <= 16, "reads sized to the byte budget after"
    finally:
        await redis_client.config_set(
            "client-output-buffer-limit", before["client-output-buffer-limit"]
        )
        if reader is not None:
            await reader.aclose()
    assert sample(metrics, "streamcast_redis_errors_total") >= 1, "no read lost its connection"
    reclaimed = [r for r in caplog.records if r.getMessage().startswith("reclaimed entries")]
    # not retried: the pending entries are read again at once, not by the reclaim
    assert bool(reclaimed) == (reads == "retried"), [r.getMessage() for r in reclaimed]


async def test_pending_entries_deleted_from_the_stream_are_counted_and_said(
    redis_client, shipped_engine, caplog
):
    """XDEL of entries pending under a consumer that died, and of entries pending under the
    replica itself: each is acknowledged with nothing to forecast, and counted
    (`streamcast_ticks_total{outcome="deleted"}`) and said (before: Redis dropped the first kind
    from the pending list when they were claimed, the second were acknowledged, both silently)."""
    caplog.set_level(logging.WARNING, logger="streamcast")
    keys = Keys("xdelpending")
    feed = Feed(redis_client, keys, ["D0"])
    await feed.send(60)
    ids = feed.ids["D0"]
    await redis_client.xgroup_create(keys.ticks(0), keys.group, id="0")
    await redis_client.xreadgroup(keys.group, "dead", {keys.ticks(0): ">"}, count=30)
    await redis_client.xdel(keys.ticks(0), *ids[5:8])  # pending under "dead"
    daemon = daemon_for(redis_client, shipped_engine, keys)
    async with daemon:
        await wait_for(lambda: xlen_at_least(redis_client, keys.forecasts("D0"), 60 - 3 - 49))
    assert sample(daemon.metrics, "streamcast_ticks_total", outcome="deleted") == 3
    said = [r.getMessage() for r in caplog.records if "deleted" in r.getMessage()]
    assert len(said) == 1 and "3 pending entries" in said[0] and keys.ticks(0) in said[0]
    assert all(i in said[0] for i in ids[5:8]), said
    summary = await redis_client.xpending(keys.ticks(0), keys.group)
    assert summary["pending"] == 0
    # one of the replica's own pending entries deleted (the replica stopped: nothing races):
    # its pending read gives the id without fields
    stream = keys.ticks(0)
    gone = await redis_client.xadd(stream, Tick.encode("D0", 1.0))
    await redis_client.xreadgroup(keys.group, daemon.source.consumer, {stream: ">"})
    await redis_client.xdel(stream, gone)
    daemon.source.rewind([0])
    entries = await daemon.source.read([0], block=False)
    assert entries == [(stream, gone.decode(), {})]
    batch = daemon.planner.prepare(entries, 0.0, daemon.source.partition_of)
    assert batch.ack_ids == [gone.decode()] and not batch.ready
    assert sample(daemon.metrics, "streamcast_ticks_total", outcome="deleted") == 4
    said = [r.getMessage() for r in caplog.records if "deleted" in r.getMessage()]
    assert len(said) == 2 and f"{stream} {gone.decode()}" in said[1], said


# -- (11) duplicates said, path age bounded, symbols forgotten -------------------------------------


async def test_idle_and_excess_symbols_are_forgotten_and_come_back_from_history(
    redis_client, shipped_engine, caplog
):
    keys = Keys("evict")
    names = [f"E{i}" for i in range(5)]
    feed = Feed(redis_client, keys, names)
    daemon = daemon_for(redis_client, shipped_engine, keys, symbols_max=3, batch_max_wait_ms=0)
    async with daemon:
        await feed.send(55)
        await wait_for(feed.all_forecast)
        await feed.send(3, only=["E0"], pause_s=0.05)  # the others fall idle: beyond the cap
        await wait_for(lambda: asyncio.sleep(0, len(daemon.windows) <= 3), what="eviction")
        # one more tick of each: windows come back whole from history, each forecast at once
        await feed.send(1)
        await wait_for(feed.all_forecast)
    await feed.check_exactly_once()
    assert sample(daemon.metrics, "streamcast_symbols_evicted_total", why="cap") >= 2


async def test_path_age_does_not_grow_for_a_symbol_that_stopped(redis_client, shipped_engine):
    keys = Keys("pathage")
    feed = Feed(redis_client, keys, ["P0"])
    daemon = daemon_for(redis_client, shipped_engine, keys, path_refresh_s=0.0)
    async with daemon:
        await feed.send(60)
        await wait_for(feed.all_forecast)
        await asyncio.sleep(2.5)  # the symbol has stopped; its last path is of its newest window
        assert sample(daemon.metrics, "streamcast_path_age_max_seconds") == 0.0


async def test_redelivered_ticks_are_logged_as_duplicates(redis_client, shipped_engine, caplog):
    keys = Keys("dups")
    feed = Feed(redis_client, keys, ["D0"])
    await feed.send(60)
    async with daemon_for(redis_client, shipped_engine, keys):
        await wait_for(feed.all_forecast)
    # the group lost (as after a restore from an old snapshot): redelivered from the start
    await redis_client.xgroup_destroy(keys.ticks(0), keys.group)
    await redis_client.delete(keys.acked(0))
    caplog.set_level("INFO", logger="streamcast.daemon")
    daemon = daemon_for(redis_client, shipped_engine, keys)
    async with daemon:
        await wait_for(lambda: asyncio.sleep(0, daemon.stats.duplicates == 60))
    assert any("already holds it" in r.getMessage() for r in caplog.records)
    await feed.check_exactly_once()


# -- (12) every known label set exported at 0 ------------------------------------------------------


def test_counters_with_known_labels_are_exported_from_the_start():
    metrics = Metrics(CollectorRegistry())
    for reason in REASONS:
        assert sample(metrics, "streamcast_dead_letters_total", reason=reason) == 0
    for result in ("promoted", "rejected", "failed", "skipped"):
        assert sample(metrics, "streamcast_retrains_total", result=result) == 0
    for reason in ("invalid", "mismatch", "error"):
        assert sample(metrics, "streamcast_model_load_failures_total", reason=reason) == 0
    assert np.isnan(sample(metrics, "streamcast_retrain_holdout_mse", model="candidate"))
    assert sample(metrics, "streamcast_redis_refusals_total", reason="OOM") == 0


# -- found by review: each a way a tick could be lost, doubled or a shard stopped ---------------


async def test_a_replica_that_loses_its_lease_stops_and_the_standby_forecasts_exactly_once(
    redis_client, shipped_engine
):
    keys = Keys("leaselost")
    feed = Feed(redis_client, keys, ["L0", "L1"])
    first = daemon_for(redis_client, shipped_engine, keys, consumer="a", lease_ttl_s=1.5)
    second = daemon_for(redis_client, shipped_engine, keys, consumer="b", lease_ttl_s=1.5)
    await first.start()
    await wait_for(lambda: asyncio.sleep(0, first.ready), what="the first ready")
    await second.start()
    try:
        await wait_for(lambda: asyncio.sleep(0, second.standby), what="the second standing by")
        await feed.send(60, pause_s=0.005)
        await wait_for(feed.all_forecast)

        async def never_renewed() -> bool:  # as if the first stalled past its lease
            return False

        first.ownership.leases[0].renew = never_renewed  # type: ignore[method-assign]
        await wait_for(lambda: asyncio.sleep(0, second.ready), what="the second taking over")
        await feed.send(60, pause_s=0.005)
        await wait_for(feed.all_forecast)
        assert not first.ready and first.stats.forecasts == 2 * 11
    finally:
        await first.stop()
        await second.stop()
    await feed.check_exactly_once()


async def test_a_rewind_during_a_pending_read_is_not_undone_by_it(redis_client, shipped_engine):
    """A reclaim (housekeeping) rewinds a partition's pending cursor while the consume loop's
    pending read is in flight: the read must not move the cursor on past what was claimed
    (before: it did, so the claimed entries waited another claim_idle_ms)."""
    keys = Keys("rewindrace")
    source = daemon_for(redis_client, shipped_engine, keys).source
    stream = keys.ticks(0)
    ids = [await redis_client.xadd(stream, Tick.encode("R0", 1.0)) for _ in range(3)]
    await redis_client.xgroup_create(stream, keys.group, id="0")
    await redis_client.xreadgroup(keys.group, source.consumer, {stream: ">"})
    source.rewind([0])
    reading = source._read_group

    async def slow_read(*args, **kwargs):
        entries = await reading(*args, **kwargs)
        source.rewind([0])  # as a reclaim would, while the read is in flight
        return entries

    source._read_group = slow_read
    entries = await source.read([0], block=False)
    assert [e[1] for e in entries] == [i.decode() for i in ids]
    assert source._pending_from == {0: "0"}, "the read moved a rewound cursor on"


async def test_pending_entries_are_read_once_so_dead_letters_are_written_once(
    redis_client, shipped_engine
):
    keys = Keys("pendingonce")
    group = keys.group
    await redis_client.xgroup_create(keys.ticks(0), group, id="0", mkstream=True)
    for i in range(300):  # a malformed entry among many, all read by a replica that then died
        fields = {"symbol": "P", "price": "x"} if i == 150 else Tick.encode("P", 100.0 + i)
        await redis_client.xadd(keys.ticks(0), fields)
    await redis_client.xreadgroup(group, "a", {keys.ticks(0): ">"}, count=1000)
    daemon = daemon_for(redis_client, shipped_engine, keys, consumer="a", batch_max_size=64)
    async with daemon:
        await wait_for(lambda: xlen_at_least(redis_client, keys.forecasts("P"), 250))

        async def nothing_pending() -> bool:
            return (await redis_client.xpending(keys.ticks(0), group))["pending"] == 0

        await wait_for(nothing_pending, what="every entry acknowledged")
    assert await redis_client.xlen(keys.dead(0)) == 1
    assert daemon.stats.duplicates == 0


async def test_a_history_key_of_the_wrong_type_does_not_stop_the_shard(
    redis_client, shipped_engine
):
    keys = Keys("wronghist")
    await redis_client.set(keys.history("X0"), "junk")
    feed = Feed(redis_client, keys, ["X0", "X1"])
    daemon = daemon_for(redis_client, shipped_engine, keys)
    async with daemon:
        await feed.send(60)

        async def x1_forecast():
            return await redis_client.xlen(keys.forecasts("X1")) == 11

        await wait_for(x1_forecast, what="the other symbol's forecasts")
        assert daemon.ready


async def test_a_history_ts_of_thousands_of_digits_and_a_bad_lease_value_do_not_crash(
    redis_client, shipped_engine
):
    keys = Keys("oddvalues")
    await redis_client.xadd(keys.history("O0"), {"price": "10", "ts": "9" * 5000}, id="1-0")
    feed = Feed(redis_client, keys, ["O0"])
    await feed.send(60)
    daemon = daemon_for(redis_client, shipped_engine, keys)
    async with daemon:
        await wait_for(lambda: xlen_at_least(redis_client, keys.forecasts("O0"), 11))
        assert not daemon._tasks[0].done()
    # a lease value that is not UTF-8: another holder, shown, not a crash
    await redis_client.set(keys.lease(0), b"\xff\xfe", px=1500)
    again = daemon_for(redis_client, shipped_engine, keys, consumer="other")
    async with again:
        await wait_for(lambda: asyncio.sleep(0, again.standby))
        await wait_for(lambda: asyncio.sleep(0, again.ready), what="taking over after the TTL")
        assert not again._tasks[0].done()


async def test_a_stray_later_forecast_entry_makes_dead_letters_not_silence(
    redis_client, shipped_engine
):
    keys = Keys("stray")
    await redis_client.xadd(keys.forecasts("Q0"), {"x": "1"}, id="99999999999999-0")
    feed = Feed(redis_client, keys, ["Q0"])
    await feed.send(60)
    async with daemon_for(redis_client, shipped_engine, keys):
        await wait_for(lambda: xlen_at_least(redis_client, keys.dead(0), 11))
    letters = await redis_client.xrange(keys.dead(0))
    assert [f[b"tick_id"].decode() for _, f in letters] == feed.ids["Q0"][49:]
    assert {f[b"reason"] for _, f in letters} == {b"publish_failed"}


async def test_a_far_future_acknowledged_mark_does_not_skip_later_ticks(
    redis_client, shipped_engine
):
    keys = Keys("futuremark")
    feed = Feed(redis_client, keys, ["F0"])
    async with daemon_for(redis_client, shipped_engine, keys) as first:
        await feed.send(55)
        await wait_for(feed.all_forecast)
    # while no replica runs: a hand-made mark far ahead of anything the stream has had, and the
    # group destroyed. Recreated there, the group would skip every tick for centuries
    await redis_client.set(keys.acked(0), "99999999999999-0")
    await redis_client.xgroup_destroy(keys.ticks(0), first.group)
    daemon = daemon_for(redis_client, shipped_engine, keys)
    async with daemon:
        await wait_for(lambda: asyncio.sleep(0, daemon.ready))
        await feed.send(10, pause_s=0.01)
        await wait_for(feed.all_forecast, what="the ticks after the recreation")
    await feed.check_exactly_once()


async def test_a_far_future_acknowledged_mark_and_the_stream_deleted_skip_nothing(
    redis_client, shipped_engine
):
    """A stream poisoned by one explicit far-future id (`XADD ... 99999999999999-0`: every later
    `*` id follows it, and so does the acknowledged mark), then deleted to mend it: the group is
    recreated on the new stream from its start, not after the old mark (before: every new tick
    skipped, silently, until the mark was deleted by hand)."""
    keys = Keys("futuredel")
    feed = Feed(redis_client, keys, ["F0"])
    async with daemon_for(redis_client, shipped_engine, keys):
        await feed.send(55)
        await wait_for(feed.all_forecast)
    await redis_client.set(keys.acked(0), "99999999999999-0")
    await redis_client.delete(keys.ticks(0))
    feed.ids["F0"] = []  # a new stream: its ticks are new ticks
    daemon = daemon_for(redis_client, shipped_engine, keys)
    async with daemon:
        await wait_for(lambda: asyncio.sleep(0, daemon.ready))
        await feed.send(10, pause_s=0.01)

        async def new_ones_forecast() -> bool:
            return await redis_client.xlen(keys.forecasts("F0")) == 6 + 10

        await wait_for(new_ones_forecast, what="the ticks of the new stream")
    assert sample(daemon.metrics, "streamcast_recoveries_total", what="group_recreated") == 1
    ids = await feed.forecast_ids("F0")
    assert ids[6:] == feed.ids["F0"], "each tick of the new stream forecast once"


async def test_stopping_survives_a_task_that_swallowed_its_cancellation():
    """A cancellation racing a timeout inside a client call can be turned into TimeoutError and
    handled by a retry loop; stop() used to await such a task forever (found as a hang)."""
    from streamcast.tasks import cancelled

    swallowed = asyncio.Event()

    async def retry_loop() -> None:
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                if swallowed.is_set():
                    raise
                swallowed.set()  # as if it had been a TimeoutError: handled, loop again

    task = asyncio.create_task(retry_loop())
    await asyncio.sleep(0)
    task.cancel()
    await asyncio.wait_for(cancelled([task]), timeout=10)
    assert swallowed.is_set() and task.cancelled()


async def test_stop_is_bounded_when_releasing_the_lease_gets_no_reply(redis_client, shipped_engine):
    """Releasing the lease at stop waits for Redis; when no reply ever comes and the call
    swallows its cancellation (a reply racing the client's own timeout), stop() used to wait for
    ever inside ``asyncio.wait_for``: no 'stopped' line, the process idle in select (the demo's
    hang). Now every wait of the stop path is bounded."""
    keys = Keys("stuckrelease")
    daemon = daemon_for(redis_client, shipped_engine, keys)
    await daemon.start()
    await wait_for(lambda: daemon.ready, what="the daemon ready")
    calls = 0

    async def never_replies() -> None:
        nonlocal calls
        calls += 1
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                if calls > 2:  # the third cancellation is taken, as a client would after retries
                    raise
                calls += 1

    daemon.ownership.leases[0].release = never_replies  # type: ignore[method-assign]
    started = time.monotonic()
    await asyncio.wait_for(daemon.stop(), timeout=30)
    assert time.monotonic() - started < 15
    assert calls == 3 and not daemon.ownership.held


async def test_settled_lets_the_others_finish_before_it_raises_the_first_error():
    """The consume loop reads the next batch side by side with the publish of the one before: a
    read that fails must not leave that publish running unseen after the loop moved on."""
    from streamcast.tasks import settled

    finished: list[str] = []

    async def publish() -> str:
        await asyncio.sleep(0.05)
        finished.append("publish")
        return "published"

    async def read() -> str:
        raise ConnectionError("the read's connection dropped")

    with pytest.raises(ConnectionError, match="dropped"):
        await settled(read(), publish())
    assert finished == ["publish"], "the publish ran to its end before the error was raised"
    assert await settled(publish(), asyncio.sleep(0, "slept")) == ["published", "slept"]
    assert await settled(publish()) == ["published"]  # one: awaited as it is
    with pytest.raises(ConnectionError, match="dropped"):
        await settled(read())
    assert await settled() == []
