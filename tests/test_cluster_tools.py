"""History, the model registry, the retrain lock and the CLI on a real Redis Cluster (3 masters).

Every client here is made from the SECOND node's URL, as STREAMCAST_REDIS_URL may name any node;
keys of different partitions live on different nodes, the registry's under one tag ({models}).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from redis import Redis as SyncRedis
from redis.asyncio import Redis

from streamcast.connect import is_cluster, make_redis
from streamcast.demo import free_port
from streamcast.history import import_series, read_for_training, read_series, symbols
from streamcast.keys import Keys
from streamcast.metrics import Metrics
from streamcast.model import save_model
from streamcast.registry import PromotionConflict, Registry
from streamcast.retrain import RetrainConfig, Retrainer, RetrainLock
from streamcast.wire import text

from .helpers import RedisClusterNodes, start_redis_cluster

PARTITIONS = 6


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory):
    cluster = start_redis_cluster(tmp_path_factory.mktemp("cluster"))
    yield cluster
    cluster.stop()


@pytest.fixture
async def cluster_client(redis_cluster):
    """A client made from the second node's URL (the server is asked whether it is a cluster)."""
    client = make_redis(redis_cluster.nodes[1].url)
    assert is_cluster(client)
    yield client
    await client.aclose()


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory, tiny_model):
    """Two saved versions of the tiny model (different weights, so different versions)."""
    root = tmp_path_factory.mktemp("models")
    first = save_model(tiny_model, root / "a", normalise=True)
    weights = tiny_model.get_weights()
    tiny_model.set_weights([w * 1.01 for w in weights])
    second = save_model(tiny_model, root / "b", normalise=True)
    tiny_model.set_weights(weights)
    assert first.version != second.version
    return root / "a", root / "b", first.version, second.version


def one_symbol_per_partition(keys: Keys) -> list[str]:
    """``S<k>`` names, the first of each partition, in partition order."""
    found: dict[int, str] = {}
    k = 0
    while len(found) < keys.partitions:
        found.setdefault(keys.partition(f"S{k}"), f"S{k}")
        k += 1
    return [found[p] for p in range(keys.partitions)]


def nodes_holding(cluster: RedisClusterNodes, pattern: str) -> dict[int, list[str]]:
    """{node index: its keys matching ``pattern``}, asked of each node directly."""
    out = {}
    for i, node in enumerate(cluster.nodes):
        with SyncRedis(port=node.port) as raw:
            found = sorted(text(k) for k in raw.scan_iter(match=pattern))
        if found:
            out[i] = found
    return out


async def next_message(pubsub, timeout_s: float = 10.0) -> bytes | None:
    for _ in range(int(timeout_s / 0.5)):
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.5)
        if message:
            return message["data"]
    return None


# -- the registry --------------------------------------------------------------------------------


async def test_registry_adds_promotes_rolls_back_and_lists_on_a_cluster_and_announces_it(
    redis_cluster, cluster_client, saved_models, tmp_path
):
    dir_a, dir_b, va, vb = saved_models
    keys = Keys("reg", PARTITIONS)
    registry = Registry(cluster_client, keys, tmp_path / "cache")
    # one subscriber through the cluster client (on a client that ran no command yet), one on
    # a plain connection to the third node: a PUBLISH on a cluster reaches every node's
    cluster_sub = await registry.subscribe()
    third = Redis(port=redis_cluster.nodes[2].port)
    plain_sub = third.pubsub()
    await plain_sub.subscribe(keys.model_channel)
    try:
        assert await registry.ensure_current(dir_a) == va
        assert await next_message(cluster_sub) == va.encode()
        assert await next_message(plain_sub) == va.encode()

        await registry.register(dir_b)
        await registry.register(dir_b)  # idempotent
        assert [v.version for v in await registry.versions()] == [va, vb]
        # the promotion's WATCH and MULTI/EXEC: one slot, so a cluster runs them
        with pytest.raises(PromotionConflict, match=f"the current version is {va}"):
            await registry.promote(vb, reason="stale", expect="someone-else")
        await registry.promote(vb, reason="better", expect=va)
        assert (await registry.current()).version == vb
        assert await next_message(cluster_sub) == vb.encode()
        assert await next_message(plain_sub) == vb.encode()

        assert await registry.rollback() == va
        current = await registry.current()
        assert (current.version, current.reason) == (va, "rollback")
        assert await next_message(cluster_sub) == va.encode()
        assert await next_message(plain_sub) == va.encode()
        assert await registry.previous_versions() == []  # the rollback popped vb's promotion

        events = await registry.events()
        assert [(e["event"], e["version"], e["previous"]) for e in events] == [
            ("rollback", va, vb),
            ("promoted", vb, va),
            ("promoted", va, ""),
        ]
        fetched = await registry.fetch(vb)
        assert (fetched / "model.keras").read_bytes() == (dir_b / "model.keras").read_bytes()
    finally:
        await cluster_sub.aclose()
        await plain_sub.aclose()
        await third.aclose()
    # every registry key in one slot, so on one node
    held = nodes_holding(redis_cluster, "reg:{models}:*")
    assert len(held) == 1
    registry_keys = [keys.model(va), keys.model(vb), keys.models, keys.model_current]
    registry_keys += [keys.model_promotions, keys.model_log]
    assert sorted(next(iter(held.values()))) == sorted(registry_keys)


# -- the retrain lock ----------------------------------------------------------------------------


async def test_the_retrain_lock_on_a_cluster_has_one_holder_and_a_retrain_skips_meanwhile(
    cluster_client, saved_models, tmp_path
):
    keys = Keys("lock", PARTITIONS)
    first = RetrainLock(cluster_client, keys.retrain_lock, ttl_s=5.0)
    second = RetrainLock(cluster_client, keys.retrain_lock, ttl_s=5.0)
    assert await first.acquire() is True
    assert await second.acquire() is False, "a second holder is refused"
    assert await second.renew() is False and await second.release() is False
    assert await cluster_client.get(keys.retrain_lock) == first.token.encode()
    assert 0 < await cluster_client.pttl(keys.retrain_lock) <= 5000
    assert await first.renew() is True

    registry = Registry(cluster_client, keys, tmp_path / "cache")
    retrainer = Retrainer(cluster_client, keys, registry, initial_model=saved_models[0])
    result = await retrainer.run_once()
    assert (result.outcome, result.reason) == ("skipped", "another replica holds the retrain lock")
    assert await cluster_client.get(keys.retrain_lock) == first.token.encode(), "not taken over"

    assert await first.release() is True
    assert await cluster_client.get(keys.retrain_lock) is None
    assert await second.acquire() is True, "free again once released"
    assert await second.release() is True


# -- history -------------------------------------------------------------------------------------


async def test_history_import_and_read_for_training_span_partitions_on_different_nodes(
    redis_cluster, cluster_client
):
    keys = Keys("hist", PARTITIONS)
    names = one_symbol_per_partition(keys)
    rng = np.random.default_rng(4)
    imported = {}
    for i, name in enumerate(names):
        prices = 100 + np.cumsum(rng.normal(size=200 + 10 * i))
        imported[name] = prices
        assert await import_series(cluster_client, keys, name, prices, maxlen=150, page=64) == 150
    assert await symbols(cluster_client, keys) == sorted(names)

    # each symbol's history and its partition's symbols set share a node; partitions spread
    held = nodes_holding(redis_cluster, "hist:*")
    assert len(held) >= 2, f"the {PARTITIONS} partitions all landed on one node: {held}"
    for name in names:
        p = keys.partition(name)
        (node,) = [i for i, found in held.items() if keys.history(name) in found]
        assert keys.symbols(p) in held[node]
        assert await cluster_client.smembers(keys.symbols(p)) == {name.encode()}

    read = await read_for_training(
        cluster_client, keys, await symbols(cluster_client, keys), max_points=120, min_points=50
    )
    assert read.symbols == sorted(names) and read.notes == [] and read.skipped == {}
    for name, series in zip(read.symbols, read.series, strict=True):
        np.testing.assert_array_equal(series, imported[name][-120:])
    np.testing.assert_array_equal(
        await read_series(cluster_client, keys, names[0], 500, page=7), imported[names[0]][-150:]
    )


@pytest.mark.slow
async def test_a_retrain_on_a_cluster_reads_every_partitions_history_and_records_its_outcome(
    cluster_client, saved_models, tmp_path
):
    keys = Keys("retrain", PARTITIONS)
    names = one_symbol_per_partition(keys)[:3]
    rng = np.random.default_rng(5)
    for name in names:
        await import_series(
            cluster_client,
            keys,
            name,
            100 * np.exp(np.cumsum(rng.normal(0, 0.01, 400))),
            maxlen=400,
        )
    registry = Registry(cluster_client, keys, tmp_path / "cache")
    retrainer = Retrainer(
        cluster_client,
        keys,
        registry,
        RetrainConfig(epochs=1, batch_size=64, max_points=400, min_windows=100),
        metrics=Metrics(CollectorRegistry()),
        initial_model=saved_models[0],
    )
    result = await retrainer.run_once()
    assert result.outcome in ("promoted", "rejected"), result.reason
    assert result.current == saved_models[2]
    assert result.windows == sum(400 - 50 for _ in names)  # seq_len 50, every symbol read
    event = (await registry.events(1))[0]
    assert (event["event"], event["outcome"]) == ("retrain", result.outcome)
    assert await cluster_client.get(keys.retrain_lock) is None, "the lock is released"


# -- the command line ----------------------------------------------------------------------------


def run_cli(env: dict[str, str], *args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "streamcast.cli", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
    )


@pytest.mark.slow
def test_the_cli_imports_history_and_lists_models_through_the_second_node(
    redis_cluster, saved_models, tmp_path
):
    dir_a, dir_b, va, vb = saved_models
    keys = Keys("cli", PARTITIONS)
    env = {
        "STREAMCAST_REDIS_URL": redis_cluster.nodes[1].url,  # not the first node
        "STREAMCAST_KEY_PREFIX": keys.prefix,
        "STREAMCAST_PARTITIONS": str(PARTITIONS),
    }
    names = one_symbol_per_partition(keys)[:3]
    for i, name in enumerate(names):
        path = tmp_path / f"{name}.csv"
        path.write_text("".join(f"{100 + i + j * 0.5}\n" for j in range(80)), encoding="utf-8")
        out = run_cli(env, "history", "import", str(path), "--symbol", name, cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        assert f"imported 80 prices of {path} as the history of {name}" in out.stdout
    again = run_cli(env, "history", "import", str(path), "--symbol", names[-1], cwd=tmp_path)
    assert again.returncode == 2 and "already holds 80 entries" in again.stderr

    out = run_cli(env, "models", "list", cwd=tmp_path)
    assert out.returncode == 0 and "no versions registered" in out.stdout, out.stderr
    out = run_cli(env, "models", "add", str(dir_a), cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.strip() == f"registered {va}", out.stderr
    out = run_cli(env, "models", "add", str(dir_b), cwd=tmp_path)
    assert out.returncode == 0, out.stderr

    async def check() -> None:
        client = make_redis(redis_cluster.nodes[1].url)
        try:
            assert await symbols(client, keys) == sorted(names)
            for i, name in enumerate(names):
                series = await read_series(client, keys, name, 1000)
                np.testing.assert_array_equal(series, 100 + i + np.arange(80) * 0.5)
                assert await client.sismember(keys.symbols(keys.partition(name)), name)
            registry = Registry(client, keys, tmp_path / "cache")
            await registry.promote(va, reason="first")
            await registry.promote(vb, reason="second")
        finally:
            await client.aclose()

    asyncio.run(check())
    listing = run_cli(env, "models", "list", cwd=tmp_path).stdout.splitlines()
    assert [line[:2] + line[2:].split()[0] for line in listing] == [f"  {va}", f"* {vb}"]
    out = run_cli({**env, "STREAMCAST_REDIS_CLUSTER": "true"}, "models", "rollback", cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.strip() == f"rolled back to {va}", out.stderr
    log = run_cli(env, "models", "log", cwd=tmp_path).stdout.splitlines()
    events = [line.split("event=")[1].split()[0] for line in log]
    assert events == ["rollback", "promoted", "promoted"]


def test_the_cli_says_in_one_line_that_no_cluster_node_answers(tmp_path):
    env = {
        "STREAMCAST_REDIS_URL": f"redis://127.0.0.1:{free_port()}",
        "STREAMCAST_REDIS_CLUSTER": "true",
        "STREAMCAST_REDIS_TIMEOUT_S": "1",
    }
    out = run_cli(env, "models", "list", cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    (line,) = out.stderr.strip().splitlines()
    # an outage like any other (streamcast.connect.ClusterClient), its cause said
    assert line.startswith("streamcast models: error: cannot reach redis at redis://127.0.0.1:")
    assert "no Redis Cluster node answers" in line and "cannot be connected" in line
