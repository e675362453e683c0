"""The path lane (streamcast/daemon/paths.py) and the adaptive batch fill: a tick's 1-step
forecast never waits for a path, paths come in steps, the newest window of a queued symbol wins,
a model swapped mid-path restarts it, and a path's first steps are scored from the prices
published meanwhile."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from prometheus_client import CollectorRegistry

from streamcast.daemon import Daemon
from streamcast.daemon.batch import Batch
from streamcast.daemon.config import DaemonConfig
from streamcast.daemon.paths import PathLane, lane_steps
from streamcast.daemon.source import FillWait
from streamcast.keys import Keys
from streamcast.metrics import Metrics
from streamcast.skill import SkillTracker
from streamcast.wire import Forecast, Tick

from .helpers import sample, wait_for, xlen_at_least


class Recording:
    """An engine that records its calls (what, when it started, steps) and when its path calls
    ended, around a real one; ``step_s`` makes each path step slow, as a big group's is."""

    def __init__(self, engine, step_s: float = 0.0, version: str | None = None) -> None:
        self.inner = engine
        self.seq_len, self.normalise = engine.seq_len, engine.normalise
        self.version = version or engine.version
        self.step_s = step_s
        self.calls: list[tuple[str, float, int]] = []
        self.ended: list[float] = []  # of the path calls, in order
        self._lock = threading.Lock()

    def predict_next(self, prices):
        with self._lock:
            self.calls.append(("next", time.monotonic(), 1))
        return self.inner.predict_next(prices)

    def rollout(self, prices, steps=50):
        with self._lock:
            self.calls.append(("path", time.monotonic(), steps))
        time.sleep(self.step_s * steps)
        try:
            return self.inner.rollout(prices, steps)
        finally:
            self.ended.append(time.monotonic())

    def stage(self, path):
        return None

    def close(self):
        pass


def _lane(engine, config: DaemonConfig, redis=None, keys: Keys | None = None):
    metrics = Metrics(CollectorRegistry())
    skill = SkillTracker(metrics, horizons=(1, 2, 3, 50), window=100)
    lane = PathLane(redis, keys or Keys("lane"), config, metrics, skill)
    executor = ThreadPoolExecutor(1)
    lane.serve(lambda: engine, lambda: executor, lambda partition: True)
    return lane, metrics, skill


def _batch(symbol_prices: dict[str, list[float]], first_id: int = 1) -> Batch:
    """A published batch: each symbol's ticks, the last with a full window (50 prices)."""
    batch = Batch()
    n = first_id
    for symbol, prices in symbol_prices.items():
        for price in prices:
            tick = Tick(f"{n}-0", symbol, price, None)
            batch.accepted.append(tick)
            n += 1
        batch.ready.append(tick)
        batch.windows.append(np.linspace(100.0, prices[-1], 50))
        batch.forecasts.append(Forecast.of(tick, "v", prices[-1]))
    return batch


# -- the batch fill ------------------------------------------------------------------------------


def test_a_read_of_a_quiet_stream_never_waits_a_busy_one_waits_at_most_the_deadline():
    now = [100.0]
    fill = FillWait(DaemonConfig(batch_fill_min=32, batch_max_wait_ms=20), lambda: now[0])
    assert fill.wait(1, 512) == 0.0, "nearly empty: no wait"
    now[0] += 0.01
    assert fill.wait(31, 512) == 0.0
    now[0] += 0.01
    busy = fill.wait(40, 512)
    assert 0 < busy <= 0.020, "busy with room: a short wait, at most the deadline"
    now[0] += 0.01
    assert fill.wait(512, 512) == 0.0, "a full read does not wait"
    # arrivals fast enough to fill the read in 5 ms: the wait is no longer than that
    for _ in range(20):
        now[0] += 0.001
        fast = fill.wait(100, 512)
    assert 0 < fast < 0.010
    never = FillWait(DaemonConfig(batch_max_wait_ms=0), lambda: now[0])
    assert never.wait(100, 512) == 0.0
    # conflating, a read may ask for 8 batches' worth: a batch's worth found is still full
    conflating = FillWait(DaemonConfig(conflate=True, batch_max_size=512), lambda: now[0])
    assert conflating.wait(600, 4096) == 0.0 and conflating.load() == "backlogged"
    assert conflating.wait(100, 4096) > 0 and conflating.load() == "flowing"


def test_the_lane_takes_its_share_while_ticks_flow_and_a_quarter_of_it_when_backlogged():
    now = [100.0]
    fill = FillWait(DaemonConfig(), lambda: now[0])
    lane, _, _ = _lane(None, DaemonConfig(path_share=0.4))
    lane.load = fill.load
    assert fill.load() == "quiet" and lane._share() == 1.0, "a quiet stream: paths run on"
    for _ in range(10):
        now[0] += 0.1
        fill.wait(5, 512)  # 50 ticks a second
    assert fill.load() == "flowing" and lane._share() == 0.4
    now[0] += 0.1
    fill.wait(512, 512)  # a full read: ticks are waiting
    assert fill.load() == "backlogged" and lane._share() == 0.1
    for _ in range(40):
        now[0] += 1.0
        fill.wait(0, 512)
    assert fill.load() == "quiet"


# -- the lane, alone -------------------------------------------------------------------------------


def test_a_queued_symbol_gets_its_newest_window_and_a_fresh_path_waits_for_its_refresh():
    now = [1000.0]
    config = DaemonConfig(path_refresh_s=1.0)
    lane, _, _ = _lane(None, config)
    lane.clock = lambda: now[0]
    lane.offer(_batch({"A": [101.0], "B": [102.0]}))
    assert set(lane.queue) == {"A", "B"}
    lane.offer(_batch({"A": [103.0, 104.0]}, first_id=10))
    job = lane.queue["A"]
    assert job.tick.id == "11-0" and job.window[-1] == 104.0, "the newest window replaces it"
    assert job.after == [], "the path starts at its tick: nothing follows it yet"
    lane.offer(_batch({"B": [105.0]}, first_id=20))
    assert lane.queue["B"].tick.id == "20-0"
    # taken into a group: A's path is computing, then A is not due again before the refresh
    del lane.queue["A"]
    lane.last_path["A"] = now[0]
    now[0] += 0.5
    lane.offer(_batch({"A": [106.0]}, first_id=30))
    assert "A" not in lane.queue
    now[0] += 0.6
    lane.offer(_batch({"A": [107.0]}, first_id=40))
    assert lane.queue["A"].tick.id == "40-0"
    assert lane.path_age(now[0]) >= 1.1, "A has waited since its last path was due"
    lane.forget_partitions({0})
    assert not lane.queue and not lane.last_path


def test_the_lane_steps_the_engine_in_calls_of_one_or_five_steps_within_the_budget():
    config = DaemonConfig(path_chunk_ms=10.0)
    lane, _, _ = _lane(None, config)
    assert lane_steps(50) == (1, 5) and lane_steps(3) == (1,)
    assert lane._chunk(64, 50) == 1, "nothing measured yet: one step"
    lane._call_s[(64, 1)] = 0.009  # a big group: one step is about the budget
    assert lane._chunk(64, 50) == 1
    lane._call_s[(4, 1)] = 0.002  # a small one: five steps fit
    assert lane._chunk(3, 50) == 5 and lane._chunk(4, 4) == 1, "never past the path's end"
    lane._call_s[(4, 5)] = 0.015  # measured: five steps do not fit after all
    assert lane._chunk(4, 50) == 1


async def _groups_of_trickling_paths(engine, config: DaemonConfig, symbols: int) -> list[int]:
    """The row counts of the lane's path groups when ``symbols`` paths come due 20 ms apart."""
    rows: list[int] = []
    lane, _, _ = _lane(engine, config)

    async def publish(group, version, computed):
        rows.append(len(group))

    lane._publish = publish  # type: ignore[method-assign]
    running = asyncio.create_task(lane.run_forever())
    try:
        for k in range(symbols):
            lane.offer(_batch({f"S{k}": [100.0 + k]}, first_id=10 * k + 1))
            await asyncio.sleep(0.02)
        await wait_for(lambda: sum(rows) >= symbols, 20, what="every path computed")
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
    return rows


async def test_paths_that_come_due_one_by_one_roll_together_within_the_gather_time(
    shipped_engine,
):
    """A lightly loaded replica's paths come due one or two at a time; rolled as they come, each
    pays a whole rollout's calls alone. The lane waits up to ``path_gather_s`` from the first
    one queued, or until ``paths_per_batch_max`` are queued, and rolls them as one group."""
    config = dict(path_refresh_s=0.0, path_steps=5)
    alone = await _groups_of_trickling_paths(
        shipped_engine, DaemonConfig(**config, path_gather_s=0.0), 6
    )
    assert alone[0] == 1, "no gathering: the first path rolls on its own"
    together = await _groups_of_trickling_paths(
        shipped_engine, DaemonConfig(**config, path_gather_s=2.0), 6
    )
    assert together == [6], "six paths due within 0.1 s: one group"
    started = time.monotonic()
    full = await _groups_of_trickling_paths(
        shipped_engine, DaemonConfig(**config, path_gather_s=60.0, paths_per_batch_max=3), 6
    )
    assert full == [3, 3], "a whole group queued: it rolls at once"
    assert time.monotonic() - started < 30, "not after the gather time"


async def test_a_clock_stepped_back_does_not_stall_the_lane_past_the_gather_time():
    """The lane's clock is the wall clock (a path's times are wall times): stepped back an hour
    after a path was queued, the wait still ends within the gather time."""
    now = [1000.0]
    lane, _, _ = _lane(None, DaemonConfig(path_gather_s=0.2))
    lane.clock = lambda: now[0]
    lane.offer(_batch({"A": [101.0]}))
    now[0] -= 3600.0
    await asyncio.wait_for(lane._gather(), 5.0)


async def test_a_model_swapped_mid_path_restarts_the_path_with_the_new_model(shipped_engine):
    old = Recording(shipped_engine, version="old")
    new = Recording(shipped_engine, version="new")
    lane, _, _ = _lane(old, DaemonConfig(path_steps=10))
    engines = [old]
    lane.engine = lambda: engines[-1]

    def swap_after_two_calls(prices, steps=50):
        if len(old.calls) >= 2:
            engines.append(new)
        return Recording.rollout(old, prices, steps)

    old.rollout = swap_after_two_calls  # type: ignore[method-assign]
    windows = 100 + np.cumsum(np.random.default_rng(1).normal(0, 1, (3, 50)), axis=1)
    paths, version = await lane._roll(windows)
    assert version == "new" and len(new.calls) >= 2, "restarted with the new model"
    assert np.allclose(paths, shipped_engine.rollout(windows, 10), rtol=1e-5)


async def test_a_path_is_published_with_its_first_steps_scored_and_a_forgotten_one_is_not(
    redis_client, shipped_engine
):
    keys = Keys("lanepub")
    engine = Recording(shipped_engine)
    lane, metrics, skill = _lane(engine, DaemonConfig(path_refresh_s=0.0), redis_client, keys)
    task = asyncio.create_task(lane.run_forever())
    try:
        prices = [float(p) for p in 100 + np.cumsum(np.random.default_rng(2).normal(0, 0.5, 60))]
        batch = _batch({"A": [prices[49]], "Z": [prices[49]]})
        batch.windows = [np.array(prices[:50]), np.array(prices[:50])]
        lane.offer(batch)
        lane.forget(["Z"])  # its partition moved on before the path was published
        # three more ticks of A are published while its path is computed (or before)
        lane.offer(Batch(accepted=[Tick(f"{k}-0", "A", prices[48 + k], None) for k in (2, 3, 4)]))
        await wait_for(lambda: redis_client.xlen(keys.paths("A")), timeout_s=30)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    (entry_id, fields), *_ = await redis_client.xrange(keys.paths("A"))
    path = Forecast.decode(fields)
    assert entry_id == b"1-0" and path.tick.id == "1-0" and path.next is None
    assert np.allclose(path.path, shipped_engine.rollout(np.array([prices[:50]]), 50)[0])
    assert await redis_client.xlen(keys.paths("Z")) == 0
    assert sample(metrics, "streamcast_forecasts_total", kind="path") == 1
    # the three prices that followed A's tick scored horizons 2 and 3 at once
    version = shipped_engine.version
    for h in ("2", "3"):
        assert sample(metrics, "streamcast_forecast_scored_total", horizon=h, version=version)
    assert skill._paths["A"][0].elapsed == 3, "horizon 50 is scored as ticks arrive"


# -- in the daemon ---------------------------------------------------------------------------------


async def test_a_tick_forecast_waits_for_at_most_one_path_step_not_for_paths(
    redis_client, shipped_engine
):
    """64 symbols' paths keep the lane busy for seconds (30 ms a step, 50 steps); a tick that
    arrives meanwhile is forecast after at most one more path step of the engine's thread."""
    keys = Keys("lanewait")
    names = [f"W{k:02d}" for k in range(64)]
    rng = np.random.default_rng(3)
    pipe = redis_client.pipeline(transaction=False)
    for name in names:
        for t, price in enumerate(100 + np.cumsum(rng.normal(0, 0.5, 50))):
            pipe.xadd(keys.history(name), {"price": repr(float(price))}, id=f"{t + 1}-0")
    await pipe.execute()
    engine = Recording(shipped_engine, step_s=0.03)
    config = DaemonConfig(path_refresh_s=0.0, paths_per_batch_max=64, batch_fill_min=1000)
    metrics = Metrics(CollectorRegistry())
    async with Daemon(redis_client, engine, metrics, keys=keys, config=config):
        pipe = redis_client.pipeline(transaction=False)
        for name in names:
            pipe.xadd(keys.ticks_for(name), Tick.encode(name, 101.0))
        await pipe.execute()
        await wait_for(lambda: sum(c[0] == "path" for c in engine.calls) >= 3, timeout_s=60)
        sent = time.monotonic()
        await redis_client.xadd(keys.ticks_for("W00"), Tick.encode("W00", 102.0))
        await wait_for(lambda: xlen_at_least(redis_client, keys.forecasts("W00"), 2), timeout_s=30)
        answered = next(t for what, t, _ in engine.calls if what == "next" and t > sent)
        paths = [(t, steps) for what, t, steps in engine.calls if what == "path"]
        waited = [
            steps
            for (started, steps), ended in zip(paths, engine.ended, strict=False)
            if started < answered and ended > sent
        ]
        # the call in progress when it arrived, and at most one that won the race to the thread
        assert len(waited) <= 2, f"the tick waited for {len(waited)} path calls"
        assert waited == [1] * len(waited), "30 ms a step is over the 10 ms budget: 1 a call"
        # the group was still being computed: the tick did not wait for its paths
        await wait_for(
            lambda: any(what == "path" and t > answered for what, t, _ in engine.calls),
            timeout_s=10,
        )
        await wait_for(lambda: redis_client.xlen(keys.paths("W63")), timeout_s=60)


async def backlog(redis, keys: Keys, names, ticks: int, seed: int) -> None:
    """Each symbol's window full in history (50 prices), then ``ticks`` ticks of it (prices 100,
    101, ...) queued in its partition's stream before a daemon starts."""
    rng = np.random.default_rng(seed)
    pipe = redis.pipeline(transaction=False)
    for name in names:
        for t, price in enumerate(100 + np.cumsum(rng.normal(0, 0.5, 50))):
            pipe.xadd(keys.history(name), {"price": repr(float(price))}, id=f"{t + 1}-0")
        for k in range(ticks):
            pipe.xadd(keys.ticks_for(name), Tick.encode(name, 100.0 + k))
    await pipe.execute()


async def test_conflation_forecasts_each_symbols_newest_tick_and_counts_the_rest(
    redis_client, shipped_engine
):
    keys = Keys("conflate")
    # queued before the daemon starts: one read takes them all
    await backlog(redis_client, keys, ("C1", "C2"), ticks=5, seed=4)
    metrics = Metrics(CollectorRegistry())
    config = DaemonConfig(conflate=True, path_refresh_s=3600)
    async with Daemon(redis_client, shipped_engine, metrics, keys=keys, config=config) as daemon:
        await wait_for(
            lambda: sample(metrics, "streamcast_ticks_total", outcome="conflated") == 8,
            timeout_s=30,
        )
        await wait_for(lambda: daemon.stats.accepted == 10, timeout_s=10)
    for name in ("C1", "C2"):
        forecasts = await redis_client.xrange(keys.forecasts(name))
        assert [Forecast.decode(f).tick.price for _, f in forecasts] == [104.0]
        assert await redis_client.xlen(keys.history(name)) == 55, "every tick is in history"
    assert sample(metrics, "streamcast_ticks_total", outcome="forecast") == 2
    assert (await redis_client.xpending(keys.ticks(0), keys.group))["pending"] == 0


async def test_a_conflating_read_takes_several_batches_worth_so_a_backlog_costs_a_forecast_a_symbol(
    redis_client, shipped_engine
):
    """Under overload with many symbols a read of one batch holds about one tick a symbol, and
    conflating it saves nothing (bench/conflation.py at 7,000 ticks/s over 500 symbols: 2 %
    conflated, the backlog grew as without it). A conflating read may hold 8 batches' worth."""
    keys = Keys("conflatebig")
    await backlog(redis_client, keys, ("D1", "D2"), ticks=60, seed=5)
    metrics = Metrics(CollectorRegistry())
    config = DaemonConfig(conflate=True, path_refresh_s=3600, batch_max_size=8)
    async with Daemon(redis_client, shipped_engine, metrics, keys=keys, config=config) as daemon:
        await wait_for(lambda: daemon.stats.accepted == 120, timeout_s=30)
    forecast = sample(metrics, "streamcast_ticks_total", outcome="forecast")
    conflated = sample(metrics, "streamcast_ticks_total", outcome="conflated")
    assert forecast + conflated == 120, "every tick forecast or counted"
    # reads of 8, 16, 32, 64 entries (each doubles, up to 64): a forecast a symbol each, not the
    # 15 reads of 8 a batch-sized read would take
    assert forecast <= 10, forecast
    for name in ("D1", "D2"):
        newest = (await redis_client.xrevrange(keys.forecasts(name), count=1))[0][1]
        assert Forecast.decode(newest).tick.price == 159.0, "the newest tick is forecast"
        assert await redis_client.xlen(keys.history(name)) == 110, "every tick is in history"


async def test_a_paths_key_of_another_type_or_with_a_later_entry_costs_only_its_own_path(
    redis_client, shipped_engine
):
    """An operator or a stray producer wrote the paths keys: a string at one (WRONGTYPE), a
    far-future entry in another. Those two paths are refused and counted; the third is written
    and the lane goes on."""
    keys = Keys("lanehostile")
    await redis_client.set(keys.paths("S"), "not a stream")
    await redis_client.xadd(keys.paths("F"), {"junk": "1"}, id="99999999999999-0")
    lane, metrics, _ = _lane(shipped_engine, DaemonConfig(path_refresh_s=0.0), redis_client, keys)
    task = asyncio.create_task(lane.run_forever())
    try:
        lane.offer(_batch({"S": [101.0], "F": [102.0], "OK": [103.0]}))
        await wait_for(lambda: redis_client.xlen(keys.paths("OK")), timeout_s=30)
        await wait_for(
            lambda: (
                sample(metrics, "streamcast_write_errors_total", what="path", reason="wrongtype")
                == 1
            ),
            timeout_s=10,
        )
        assert (
            sample(metrics, "streamcast_write_errors_total", what="path", reason="duplicate_id")
            == 1
        )
        assert sample(metrics, "streamcast_forecasts_total", kind="path") == 1
        assert not task.done(), "the lane goes on"
        lane.offer(_batch({"OK": [104.0]}, first_id=5))
        await wait_for(lambda: xlen_at_least(redis_client, keys.paths("OK"), 2), timeout_s=30)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert await redis_client.get(keys.paths("S")) == b"not a stream"
