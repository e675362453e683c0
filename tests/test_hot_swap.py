"""The model lifecycle inside a running daemon, on a real redis-server: retrain, promote, swap."""

from __future__ import annotations

import asyncio
import dataclasses
import sys

import numpy as np
from prometheus_client import CollectorRegistry

from streamcast import Forecaster
from streamcast.daemon import Daemon, DaemonConfig
from streamcast.data import load_series
from streamcast.keys import Keys
from streamcast.metrics import Metrics
from streamcast.model import DEFAULT_MODEL_DIR, ModelConfig, ModelInfo, build_model, save_model
from streamcast.registry import Registry
from streamcast.replay import fan_out, replay, symbol_names
from streamcast.retrain import RetrainConfig, Retrainer
from streamcast.wire import Forecast, id_key

from .helpers import keep_ticks, sample, tick_ids_by_symbol, wait_for

DEFAULT_VERSION = ModelInfo.read(DEFAULT_MODEL_DIR / "model.json").version
BATCH = 256


def load_warm(path):
    engine = Forecaster.load(path)
    engine.warmup(batch_sizes=engine.bucket_sizes(BATCH), steps=(1, 50))
    return engine


async def serving_daemon(redis, keys, registry, metrics, config, retrainer=None) -> Daemon:
    """A daemon on the shipped model that follows the registry (and retrains, if given)."""
    # its own engine, not the shared shipped_engine: a swap re-weights or replaces and closes it
    engine = await asyncio.to_thread(load_warm, DEFAULT_MODEL_DIR)
    return Daemon(
        redis,
        engine,
        metrics,
        keys=keys,
        config=config,
        registry=registry,
        loader=load_warm,
        initial_model=DEFAULT_MODEL_DIR,
        retrainer=retrainer,
    )


async def test_retrain_promote_and_swap_mid_replay_forecast_every_tick_once(
    redis_client, shared_data, tmp_path
):
    keys = Keys("swap")
    await keep_ticks(redis_client, keys)  # the ticks stream is the truth checked below
    names = symbol_names("SPX", 3)
    paths = fan_out(load_series(shared_data / "sp500.csv")[:2600], 3)
    registry = Registry(redis_client, keys, tmp_path / "cache")
    metrics = Metrics(CollectorRegistry())
    retrainer = Retrainer(
        redis_client,
        keys,
        registry,
        RetrainConfig(epochs=1, max_points=1200, min_windows=100, margin=0.0),
        metrics=metrics,
    )
    forecast = "streamcast_ticks_total"
    config = DaemonConfig(batch_max_size=BATCH, path_refresh_s=0.0, model_check_s=1.0)
    daemon = await serving_daemon(redis_client, keys, registry, metrics, config)
    async with daemon:
        await replay(redis_client, keys, paths[:, :1200], names, rate=None)

        async def forecasts_at_least(n: int) -> bool:
            return sample(metrics, forecast, outcome="forecast") >= n

        await wait_for(lambda: forecasts_at_least(3 * (1200 - 49)), timeout_s=120)
        assert (await registry.current()).version == DEFAULT_VERSION  # type: ignore[union-attr]
        feed_after = (await redis_client.xrevrange(keys.ticks(0), count=1))[0][0].decode()
        # ticks keep coming while the candidate trains, is promoted, loaded and swapped in (the
        # feed starts over if it runs out first), and go on after the swap
        stop_feed = asyncio.Event()
        feed = asyncio.create_task(
            replay(
                redis_client, keys, paths[:, 1200:2400], names,
                rate=100, chunk=30, loop=True, stop=stop_feed,
            )
        )  # fmt: skip
        result = await retrainer.run_once()
        assert result.outcome == "promoted", result.reason

        async def swapped() -> bool:
            return sample(metrics, "streamcast_model_swaps_total") == 1

        await wait_for(swapped, timeout_s=120)
        assert daemon.engine.version == result.candidate
        at_swap = sample(metrics, forecast, outcome="forecast")
        await wait_for(lambda: forecasts_at_least(at_swap + 90), timeout_s=120)  # the feed went on
        assert not feed.done(), "the feed ended before the swap"
        stop_feed.set()
        await feed
        feed_last = (await redis_client.xrevrange(keys.ticks(0), count=1))[0][0].decode()
        await asyncio.sleep(1.1)  # one housekeeping round
        age = metrics.prometheus.get_sample_value("streamcast_model_age_seconds")
        assert age is not None and 0 <= age < 60, "time since the last promotion"
        await replay(redis_client, keys, paths[:, 2400:], names, rate=None)
        total = await redis_client.xlen(keys.ticks(0))
        await wait_for(lambda: forecasts_at_least(total - 3 * 49), timeout_s=120)
    assert sample(metrics, "streamcast_model_info", version=result.candidate) == 1
    # the swap clears the old version's series
    assert sample(metrics, "streamcast_model_info", version=DEFAULT_VERSION, absent=0.0) == 0
    ticks = await tick_ids_by_symbol(redis_client, keys)
    for name in names:
        entries = await redis_client.xrange(keys.forecasts(name))
        assert [e[0].decode() for e in entries] == ticks[name][49:], f"{name}: lost or doubled"
        versions = [Forecast.decode(f).model for _, f in entries]
        first_new = versions.index(result.candidate)
        assert set(versions[:first_new]) == {DEFAULT_VERSION}
        assert set(versions[first_new:]) == {result.candidate}, "one swap, never back"
        assert len(versions) - first_new >= 200
        # within the one paced replay: its first ticks forecast by the old version, its last
        # ones by the new (the swap happened while it ran, for this very symbol)
        during = [
            version
            for (eid, _), version in zip(entries, versions, strict=True)
            if id_key(feed_after) < id_key(eid.decode()) <= id_key(feed_last)
        ]
        assert during[0] == DEFAULT_VERSION and during[-1] == result.candidate, name


async def test_corrupt_or_mismatched_versions_are_refused_and_a_killed_trainer_changes_nothing(
    redis_client, tmp_path, tiny_model
):
    keys = Keys("refuse")
    registry = Registry(redis_client, keys, tmp_path / "cache")
    metrics = Metrics(CollectorRegistry())
    killed = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"]
    retrainer = Retrainer(
        redis_client,
        keys,
        registry,
        RetrainConfig(min_windows=50, max_points=500),
        metrics=metrics,
        command=killed,
    )
    config = DaemonConfig(batch_max_size=64, model_check_s=0.5, retrain_after_ticks=150)
    daemon = await serving_daemon(redis_client, keys, registry, metrics, config, retrainer)
    prices = 100 + np.cumsum(np.random.default_rng(8).normal(0, 0.3, (2, 400)), axis=1)
    async with daemon:
        await wait_for(lambda: _current_is(registry, DEFAULT_VERSION), timeout_s=120)
        # a model with another window length
        short = build_model(dataclasses.replace(ModelConfig.from_sizes([1, 4, 1]), seq_len=20))
        mismatched = save_model(short, tmp_path / "short", normalise=True)
        await registry.register(tmp_path / "short")
        await registry.promote(mismatched.version, reason="test: mismatch")
        await wait_for(lambda: _failures(metrics, "mismatch"), timeout_s=120)
        # a version whose bytes in Redis were damaged after registration
        corrupt = save_model(tiny_model, tmp_path / "tiny", normalise=True)
        await registry.register(tmp_path / "tiny")
        blob = bytearray(await redis_client.hget(keys.model(corrupt.version), "keras"))
        blob[-10] ^= 0xFF
        await redis_client.hset(keys.model(corrupt.version), "keras", bytes(blob))
        await registry.promote(corrupt.version, reason="test: corrupt")
        await wait_for(lambda: _failures(metrics, "invalid"), timeout_s=120)
        # a version whose sidecar names another one (the serving one's bytes under a new key,
        # written raw): refused once, not loaded again at every model check
        entry = await redis_client.hgetall(keys.model(DEFAULT_VERSION))
        await redis_client.hset(keys.model("renamed-1"), mapping=entry)
        await redis_client.zadd(keys.models, {"renamed-1": 1})
        await registry.promote("renamed-1", reason="test: a sidecar naming another version")
        await wait_for(lambda: _failures(metrics, "invalid", at_least=2), timeout_s=120)
        await asyncio.sleep(2.0)  # four model checks
        assert sample(metrics, "streamcast_model_load_failures_total", reason="invalid") == 2
        # ticks flow; the trainer started every 150 ticks is killed each time
        await replay(redis_client, keys, prices, ["K0", "K1"], rate=400, chunk=20)

        async def all_forecast() -> bool:
            return sample(metrics, "streamcast_ticks_total", outcome="forecast") >= 2 * 351

        await wait_for(all_forecast, timeout_s=120)
        await wait_for(lambda: _retrains(metrics, "failed"), timeout_s=120)
        assert daemon.engine.version == DEFAULT_VERSION
    assert sample(metrics, "streamcast_model_swaps_total") == 0
    for name in ("K0", "K1"):
        entries = await redis_client.xrange(keys.forecasts(name))
        assert len(entries) == 351
        assert {Forecast.decode(f).model for _, f in entries} == {DEFAULT_VERSION}


async def _current_is(registry: Registry, version: str) -> bool:
    current = await registry.current()
    return current is not None and current.version == version


async def _failures(metrics: Metrics, reason: str, at_least: int = 1) -> bool:
    return sample(metrics, "streamcast_model_load_failures_total", reason=reason) >= at_least


async def _retrains(metrics: Metrics, result: str) -> bool:
    return sample(metrics, "streamcast_retrains_total", result=result) >= 1
