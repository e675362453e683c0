"""The daemon's intervals (streamcast.daemon.calibration): bands per partition, truths fed back,
the calibration stored in Redis per partition, a new model starting from the warm-up band."""

from __future__ import annotations

import json
import logging

import numpy as np
from prometheus_client import CollectorRegistry

from streamcast.daemon.calibration import Calibration
from streamcast.intervals import Calibrator, IntervalConfig, window_volatility
from streamcast.keys import Keys
from streamcast.metrics import Metrics
from streamcast.wire import Forecast, Tick

from .helpers import sample


def windows_of(rows: int, seed: int = 0, vol: float = 0.01) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return 100 * np.exp(np.cumsum(rng.normal(0, vol, (rows, 50)), axis=1))


def calibration(redis=None, partitions: int = 2, clock=None, **config) -> Calibration:
    keys = Keys("cal", partitions)
    cal = Calibration(
        redis,
        keys,
        Metrics(CollectorRegistry()),
        config=IntervalConfig(**config),
        **({"clock": clock} if clock else {}),
    )
    cal.calibrators = {p: Calibrator(cal.config, "v1") for p in range(partitions)}
    return cal


def test_every_forecast_gets_bands_that_hold_it_at_each_level():
    cal = calibration()
    windows = windows_of(4)
    ticks = [Tick(f"{i + 1}-0", f"S{i}", float(windows[i, -1]), None) for i in range(4)]
    nxt = windows[:, -1] * 1.001
    path = windows[0, -1] * np.linspace(1.0, 1.05, 50)
    bands, vols = cal.bands(ticks, windows, nxt, {0: path})
    assert np.isfinite(vols).all() and (vols > 0).all()
    for i, band in enumerate(bands):
        assert band is not None and set(band) == {"80", "95"}
        lo80, hi80 = band["80"]["next"]
        lo95, hi95 = band["95"]["next"]
        assert lo95 < lo80 < nxt[i] < hi80 < hi95
        assert ("path" in band["80"]) == (i == 0)
    steps = bands[0]["95"]["path"]
    assert len(steps) == 50
    widths = [hi - lo for lo, hi in steps]
    assert widths[-1] > widths[0], "the warm-up band widens with the horizon"


def test_no_band_for_a_partition_this_replica_does_not_hold():
    cal = calibration()
    cal.calibrators.pop(1)
    symbols = ["A", "B", "C", "D", "E", "F"]
    windows = windows_of(len(symbols))
    ticks = [Tick(f"{i + 1}-0", s, float(windows[i, -1]), None) for i, s in enumerate(symbols)]
    bands, vols = cal.bands(ticks, windows, windows[:, -1], {})
    own = window_volatility(windows, cal.config.volatility_halflife_ticks)
    held = [cal.keys.partition(tick.symbol) != 1 for tick in ticks]
    assert 0 < sum(held) < len(ticks), "both kinds of row in the batch"
    for k, (band, vol) in enumerate(zip(bands, vols, strict=True)):
        assert (band is None) == (not held[k])
        # its window's volatility where it has a band (what its score will be scaled by)
        assert vol == own[k] if held[k] else np.isnan(vol)


def forecast_of(cal: Calibration, symbol: str, n: int, window: np.ndarray, nxt: float, path=None):
    tick = Tick(f"{n}-0", symbol, float(window[-1]), None)
    bands, vols = cal.bands(
        [tick], window[None, :], np.array([nxt]), {0: path} if path is not None else {}
    )
    f = Forecast.of(tick, "v1", nxt, None if path is None else path.tolist(), bands[0])
    return tick, f, {(tick.symbol, tick.id): float(vols[0])}


def test_truths_feed_the_calibrator_and_the_coverage_metrics():
    cal = calibration(partitions=1, warmup_scores=5)
    rng = np.random.default_rng(3)
    window = windows_of(1)[0]
    n = 1
    for _ in range(300):
        price = float(window[-1])
        tick, f, vols = forecast_of(cal, "S", n, window, price)  # "no change"
        cal.record([tick], [f], vols)
        n += 1
        window = np.append(window[1:], price * float(np.exp(rng.normal(0, 0.01))))
        truth = Tick(f"{n}-0", "S", float(window[-1]), None)
        cal.record([truth], [], {})
    cal.publish()
    resolved = sample(
        cal.metrics, "streamcast_interval_resolved_total", horizon="1", level="80", version="v1"
    )
    assert resolved == 300
    misses = sample(
        cal.metrics, "streamcast_interval_misses_total", horizon="1", level="80", version="v1"
    )
    assert 0.1 < misses / resolved < 0.35, "an 80 % band misses about a fifth"
    assert cal.calibrators[0].warm()[0], "past its warm-up: the tracked quantile is in force"
    coverage = sample(
        cal.metrics, "streamcast_interval_coverage", horizon="1", level="95", version="v1"
    )
    assert 0.85 < coverage <= 1.0
    assert (
        sample(cal.metrics, "streamcast_interval_width", horizon="1", level="95", version="v1") > 0
    )
    assert (
        sample(cal.metrics, "streamcast_interval_score", horizon="1", level="95", version="v1") > 0
    )


def test_scores_reach_the_calibrator_in_groups_of_batch_cap_or_every_50_ms():
    """A quiet partition's batches hold a tick or two; an update costs the same whatever its
    size (it was 45 % of the event loop's busy time at 250 ticks/s in batches of 1.4)."""
    now = [0.0]
    cal = calibration(partitions=1, clock=lambda: now[0], batch_cap=20)
    window = windows_of(1)[0]
    price = float(window[-1])
    tick, f, vols = forecast_of(cal, "S", 1, window, price, price * np.ones(50))
    cal.record([tick], [f], vols)
    seen = cal.calibrators[0].seen
    for n in range(2, 11):  # 9 ticks: the next and 8 path steps (each tick resolves one)
        cal.record([Tick(f"{n}-0", "S", price, None)], [], {})
    assert seen.sum() == 0, "10 scores wait: fewer than batch_cap, not 50 ms yet"
    now[0] += 0.06
    cal.record([Tick("11-0", "S", price, None)], [], {})
    assert seen.sum() == 10, "50 ms passed: every score so far fed"
    for n in range(12, 32):  # 20 more: batch_cap of them, fed at once
        cal.record([Tick(f"{n}-0", "S", price, None)], [], {})
    assert seen.sum() == 30
    cal.record([Tick("32-0", "S", price, None)], [], {})
    assert seen.sum() == 30
    cal.model_changed("v2")  # the old model's scores go to its calibration before it resets
    assert cal.calibrators[0].model_version == "v2" and not cal._resolved


async def test_a_save_feeds_what_is_waiting_first(redis_client):
    cal = calibration(redis_client, partitions=1, batch_cap=20)
    window = windows_of(1)[0]
    tick, f, vols = forecast_of(cal, "S", 1, window, float(window[-1]))
    cal.record([tick], [f], vols)
    cal.record([Tick("2-0", "S", float(window[-1]), None)], [], {})
    await cal.save()
    stored = json.loads(await redis_client.get(cal.keys.calibration(0)))
    assert stored["seen"][0] == 1


def test_a_paths_steps_are_scored_at_their_horizons():
    cal = calibration(partitions=1)
    window = windows_of(1)[0]
    path = float(window[-1]) * np.ones(50)
    tick, f, vols = forecast_of(cal, "P", 1, window, float(window[-1]), path)
    cal.record([tick], [f], vols)
    for n in range(2, 53):
        cal.record([Tick(f"{n}-0", "P", float(window[-1]), None)], [], {})
    cal.feed()  # the last few wait for batch_cap of them or FEED_EVERY_S
    seen = cal.calibrators[0].seen
    assert seen[0] == 1 and (seen[1:50] == 1).all(), "next at 1, the path's steps 2..50 once each"
    for h in ("10", "50"):
        assert (
            sample(
                cal.metrics,
                "streamcast_interval_resolved_total",
                horizon=h,
                level="80",
                version="v1",
            )
            == 1
        )
        assert (
            sample(
                cal.metrics,
                "streamcast_interval_misses_total",
                absent=0,
                horizon=h,
                level="80",
                version="v1",
            )
            == 0
        )


def test_a_new_model_starts_from_the_warm_up_band_not_the_old_calibration():
    cal = calibration(partitions=1, warmup_scores=5)
    cal.calibrators[0].update(np.ones(50), np.full(50, 0.01))  # the old model: very narrow
    assert cal.calibrators[0].warm()[0]
    cal.model_changed("v2")
    fresh = cal.calibrators[0]
    assert fresh.model_version == "v2" and not fresh.warm().any()


async def test_the_calibration_is_stored_per_partition_and_restored(redis_client):
    cal = calibration(redis_client, partitions=3, warmup_scores=5)
    cal.calibrators[1].update(np.ones(20), np.linspace(0.5, 2.0, 20))
    await cal.save()
    stored = json.loads(await redis_client.get(cal.keys.calibration(1)))
    assert stored["model_version"] == "v1" and stored["seen"][0] == 20
    again = Calibration(redis_client, cal.keys, Metrics(CollectorRegistry()), config=cal.config)
    await again.adopt([1, 2], "v1")
    assert again.calibrators[1].to_dict() == cal.calibrators[1].to_dict()
    other = Calibration(redis_client, cal.keys, Metrics(CollectorRegistry()), config=cal.config)
    await other.adopt([1], "v2")  # another model's calibration is not used
    assert other.calibrators[1].model_version == "v2" and other.calibrators[1].seen.sum() == 0
    for junk in ["{not json", "[" * 100_000 + "]" * 100_000]:  # the 2nd: past the recursion limit
        await redis_client.set(cal.keys.calibration(2), junk)
        await other.adopt([2], "v1")  # unreadable: start over, do not crash
        assert other.calibrators[2].seen.sum() == 0


async def test_forecasts_carry_bands_end_to_end_and_the_calibration_survives_a_restart(
    redis_client, shipped_engine
):
    import asyncio

    from streamcast.daemon import Daemon, DaemonConfig
    from streamcast.wire import Tick as T

    from .helpers import feed, wait_for

    keys = Keys("bands", partitions=2)
    names = ["B0", "B1", "B4", "B5"]
    assert {keys.partition(n) for n in names} == {0, 1}
    prices = feed(len(names), 200)

    async def send(start: int, stop: int) -> None:
        for t in range(start, stop):
            pipe = redis_client.pipeline(transaction=False)
            for row, name in enumerate(names):
                pipe.xadd(keys.ticks_for(name), T.encode(name, float(prices[row, t])))
            await pipe.execute()

    def replica(name: str) -> Daemon:
        config = DaemonConfig(consumer=name, path_refresh_s=0.0, batch_max_size=64)
        return Daemon(
            redis_client, shipped_engine, Metrics(CollectorRegistry()), keys=keys, config=config
        )

    async def forecast_count() -> int:
        return sum([await redis_client.xlen(keys.forecasts(n)) for n in names])

    first = replica("a")
    async with first:
        await send(0, 150)
        await wait_for(lambda: _at_least(forecast_count, 4 * 101), timeout_s=60)

        async def paths_done() -> bool:  # the path lane's, from each symbol's last tick
            for name in names:
                newest = await redis_client.xrevrange(keys.paths(name), count=1)
                last = await redis_client.xrevrange(keys.forecasts(name), count=1)
                if not newest or newest[0][0] != last[0][0]:
                    return False
            return True

        await wait_for(paths_done, timeout_s=60)
        await asyncio.sleep(0.2)
    version = shipped_engine.version
    for name in names:
        entries = await redis_client.xrange(keys.forecasts(name))
        last = Forecast.decode(entries[-1][1])
        assert last.bands is not None and set(last.bands) == {"80", "95"}
        assert all(set(band) == {"next"} for band in last.bands.values())
        lo, hi = last.bands["80"]["next"]
        lo95, hi95 = last.bands["95"]["next"]
        assert lo95 <= lo <= last.next <= hi <= hi95
        path = Forecast.decode((await redis_client.xrevrange(keys.paths(name), count=1))[0][1])
        assert path.path is not None and path.bands is not None
        assert all(set(band) == {"path"} for band in path.bands.values())
        assert len(path.bands["95"]["path"]) == 50
        assert all(
            a <= v <= b for (a, b), v in zip(path.bands["95"]["path"], path.path, strict=True)
        )
        assert all(
            a95 <= a <= b <= b95
            for (a, b), (a95, b95) in zip(
                path.bands["80"]["path"], path.bands["95"]["path"], strict=True
            )
        )
    resolved = sample(
        first.metrics,
        "streamcast_interval_resolved_total",
        horizon="1",
        level="80",
        version=version,
    )
    assert resolved == 4 * 100, "every 1-step forecast but each symbol's last met its truth"
    stored = {p: json.loads(await redis_client.get(keys.calibration(p))) for p in range(2)}
    assert all(s["model_version"] == version and s["seen"][0] > 0 for s in stored.values()), [
        (s["model_version"], s["seen"][:3], version) for s in stored.values()
    ]
    second = replica("b")
    async with second:
        await send(150, 151)
        await wait_for(lambda: _at_least(forecast_count, 4 * 102), timeout_s=60)
        restored = second.calibration.calibrators  # type: ignore[union-attr]
        assert {p: c.to_dict()["seen"] for p, c in restored.items()} != {}
        for p, cal in restored.items():
            assert cal.seen[0] >= stored[p]["seen"][0], "went on from the stored calibration"


async def _at_least(count, n: int) -> bool:
    return await count() >= n


async def test_a_calibration_key_of_another_type_is_started_over_and_the_partition_consumed(
    redis_client, shipped_engine, caplog
):
    """An operator's HSET on a partition's calibration key: the replica taking the partition
    starts its calibration over (before: WRONGTYPE ended every hand-over, so it held the lease
    and consumed nothing, for ever) and the next save puts a calibration back."""
    from streamcast.daemon import Daemon, DaemonConfig
    from streamcast.wire import Tick as T

    from .helpers import feed, wait_for

    keys = Keys("badcal", partitions=1)
    await redis_client.hset(keys.calibration(0), "x", "1")
    caplog.set_level(logging.WARNING, logger="streamcast.daemon.calibration")
    prices = feed(2, 60)
    config = DaemonConfig(consumer="a", path_refresh_s=0.0)
    daemon = Daemon(
        redis_client, shipped_engine, Metrics(CollectorRegistry()), keys=keys, config=config
    )
    async with daemon:
        for t in range(60):
            pipe = redis_client.pipeline(transaction=False)
            for row, name in enumerate(["C0", "C1"]):
                pipe.xadd(keys.ticks_for(name), T.encode(name, float(prices[row, t])))
            await pipe.execute()

        async def forecast() -> bool:
            return all([await redis_client.xlen(keys.forecasts(n)) == 11 for n in ["C0", "C1"]])

        await wait_for(forecast, timeout_s=30, what="both symbols' forecasts")
    stored = json.loads(await redis_client.get(keys.calibration(0)))  # saved at the stop
    assert stored["model_version"] == shipped_engine.version and stored["seen"][0] > 0
    said = [r.getMessage() for r in caplog.records]
    assert any("calibration of partition 0 is not a string" in m for m in said), said
