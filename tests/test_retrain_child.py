"""The trainer child reads the history itself, on a real redis-server: the daemon's event loop
does no history read, and the Redis password reaches the child privately (never its command
line, its environment or a log)."""

from __future__ import annotations

import json
import logging
import sys
from urllib.parse import quote

import pytest
from prometheus_client import CollectorRegistry

from streamcast import history
from streamcast.connect import make_redis
from streamcast.data import synthetic_prices
from streamcast.demo import free_port
from streamcast.history import HistorySource, import_series
from streamcast.keys import Keys
from streamcast.metrics import Metrics
from streamcast.model import save_model
from streamcast.registry import Registry
from streamcast.retrain import RetrainConfig, Retrainer

from .helpers import sample, start_redis_cluster, start_redis_server

PASSWORD = "s3cret/pw@x:y"  # characters a URL must escape

# The real trainer, run by a wrapper that keeps what the test checks: the child's whole command
# line, whether its environment holds the password, the job's file modes and the trainer's log
# (the job directory is gone when the retrain returns).
KEEPING_TRAINER = """
import json, os, shutil, stat, sys
from pathlib import Path
from streamcast.trainer import worker_main
keep, job = Path(sys.argv[1]), Path(sys.argv[2])
(keep / "child.json").write_text(json.dumps({
    "argv": sys.orig_argv,
    "environ": "\\n".join(os.environ.values()),
    "dir_mode": stat.S_IMODE(job.stat().st_mode),
    "job_mode": stat.S_IMODE((job / "job.json").stat().st_mode),
}))
try:
    code = worker_main([str(job)])
finally:
    sys.stdout.flush()
    sys.stderr.flush()
    shutil.copy(job / "trainer.log", keep / "trainer.log")
sys.exit(code)
"""


def no_read_in_the_parent(monkeypatch) -> None:
    """Every history read fails in this (the parent's) process; the child is another process."""

    def refuse(*_args, **_kwargs):
        raise AssertionError("the parent read the history")

    for name in ("read_for_training", "read_series", "symbols"):
        monkeypatch.setattr(history, name, refuse)


async def a_deployment(redis, keys: Keys, tiny_model, tmp_path, points: int) -> Registry:
    """Two symbols with ``points`` prices each, and a registry serving the tiny model."""
    for name, series in zip(("AAA", "BBB"), synthetic_prices(2, points, seed=5), strict=True):
        await import_series(redis, keys, name, series, maxlen=10_000)
    save_model(tiny_model, tmp_path / "tiny", normalise=True)
    registry = Registry(redis, keys, tmp_path / "cache")
    await registry.ensure_current(tmp_path / "tiny")
    return registry


@pytest.mark.slow
async def test_the_child_reads_the_history_the_parent_none_and_the_password_stays_private(
    tmp_path, tiny_model, monkeypatch, caplog
):
    server = start_redis_server(tmp_path, "--requirepass", PASSWORD)
    url = f"redis://:{quote(PASSWORD, safe='')}@127.0.0.1:{server.port}/0"
    redis = make_redis(url)
    try:
        keys = Keys("child", 3)
        registry = await a_deployment(redis, keys, tiny_model, tmp_path, 600)
        no_read_in_the_parent(monkeypatch)
        keep = tmp_path / "keep"
        keep.mkdir()
        metrics = Metrics(CollectorRegistry())
        retrainer = Retrainer(
            redis,
            keys,
            registry,
            RetrainConfig(epochs=1, batch_size=64, max_points=600, min_windows=100),
            metrics=metrics,
            command=[sys.executable, "-c", KEEPING_TRAINER, str(keep)],
        )
        with caplog.at_level(logging.DEBUG):
            result = await retrainer.run_once()
    finally:
        await redis.aclose()
        server.process.terminate()
        server.process.wait(10)

    assert result.outcome in ("promoted", "rejected"), result.reason
    assert result.windows == 2 * (600 - 50)  # what the child read, handed back
    assert sample(metrics, "streamcast_retrains_total", result=result.outcome) == 1
    log = (keep / "trainer.log").read_text()
    assert "retraining on 1100 windows of 2 symbol(s)" in log, log
    child = json.loads((keep / "child.json").read_text())
    assert (child["dir_mode"], child["job_mode"]) == (0o700, 0o600)
    encoded = quote(PASSWORD, safe="")
    for where, text in (
        ("the child's command line", " ".join(child["argv"])),
        ("the child's environment", child["environ"]),
        ("the trainer's log", log),
        ("the parent's log", caplog.text),
        ("the outcome", result.reason),
    ):
        assert PASSWORD not in text and encoded not in text, where


async def test_a_redis_the_child_cannot_read_fails_the_retrain_with_the_reason(
    redis_client, tiny_model, tmp_path, monkeypatch
):
    keys = Keys("unread")
    registry = await a_deployment(redis_client, keys, tiny_model, tmp_path, 300)
    no_read_in_the_parent(monkeypatch)
    metrics = Metrics(CollectorRegistry())
    retrainer = Retrainer(
        redis_client,
        keys,
        registry,
        RetrainConfig(time_limit_s=60),
        metrics=metrics,
        history_url=f"redis://127.0.0.1:{free_port()}/0",  # nothing listens there
    )
    result = await retrainer.run_once()
    assert result.outcome == "failed", result.reason
    assert result.reason == (
        "redis unavailable mid-retrain (ConnectionError): the history was not read"
    )
    assert sample(metrics, "streamcast_retrains_total", result="failed") == 1
    (event,) = [e for e in await registry.events(5) if e["event"] == "retrain"]
    assert event["outcome"] == "failed" and event["reason"] == result.reason
    assert await redis_client.get(keys.retrain_lock) is None


async def test_too_little_history_read_by_the_child_is_skipped_with_each_symbols_note(
    redis_client, tiny_model, tmp_path, monkeypatch
):
    keys = Keys("short")
    registry = await a_deployment(redis_client, keys, tiny_model, tmp_path, 140)
    await import_series(redis_client, keys, "CCC", synthetic_prices(1, 60)[0], maxlen=10_000)
    no_read_in_the_parent(monkeypatch)
    metrics = Metrics(CollectorRegistry())
    retrainer = Retrainer(redis_client, keys, registry, RetrainConfig(), metrics=metrics)
    result = await retrainer.run_once()
    assert result.outcome == "skipped", result.reason
    assert result.reason == (
        "not enough history: 162 training windows from 2 symbol(s), at least 200 needed; "
        "CCC: unusable, 60 valid price(s) of 60 read, at least 102 needed"
    )
    assert result.windows == 2 * (140 - 50)
    assert sample(metrics, "streamcast_retrains_total", result="skipped") == 1


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6390/2",
        f"redis://us%40er:{quote(PASSWORD, safe='')}@redis.example:1234/3",
        "redis://:pw@[::1]:6379/0",
        "rediss://:pw@h:6380/0?ssl_cert_reqs=none&ssl_ca_certs=%2Fetc%2Fca.pem"
        "&ssl_check_hostname=false",
        "unix://:pw@/run/redis/redis.sock?db=4",
    ],
)
async def test_the_url_rebuilt_from_a_client_connects_as_the_client_does(url):
    def settings(client) -> tuple[type, dict]:
        pool = client.connection_pool
        kwargs = {
            k: v
            for k, v in pool.connection_kwargs.items()
            if k not in ("retry", "retry_on_error", "himport_registry")
        }
        return pool.connection_class, kwargs

    client = make_redis(url, 2.5, cluster=False)
    source = HistorySource.of(client, Keys("k", 2))
    rebuilt = source.connect()
    try:
        assert settings(rebuilt) == settings(client)
        assert (source.cluster, source.timeout_s, source.keys) == (False, 2.5, Keys("k", 2))
        assert "pw" not in repr(source) and PASSWORD not in repr(source)
    finally:
        await client.aclose()
        await rebuilt.aclose()


async def test_a_cluster_client_gives_a_cluster_source_and_a_given_url_wins():
    client = make_redis("redis://:pw@10.0.0.7:7001/0", cluster=True)
    try:
        source = HistorySource.of(client, Keys())
        assert source.cluster is True and source.url == "redis://:pw@10.0.0.7:7001/0"
        given = HistorySource.of(client, Keys(), "redis://:other@10.0.0.8:7002")
        assert given.url == "redis://:other@10.0.0.8:7002" and given.cluster is True
    finally:
        await client.aclose()


@pytest.mark.slow
async def test_on_a_cluster_the_child_reads_every_partition_from_any_node(
    tmp_path, tiny_model, monkeypatch
):
    cluster = start_redis_cluster(tmp_path / "cluster")
    redis = make_redis(cluster.nodes[1].url)
    try:
        keys = Keys("spread", 6)
        names = ["AAA", "BBB", "CCC", "DDD"]
        assert len({keys.partition(n) for n in names}) > 1
        for name, series in zip(names, synthetic_prices(4, 120, seed=2), strict=True):
            await import_series(redis, keys, name, series, maxlen=10_000)
        save_model(tiny_model, tmp_path / "tiny", normalise=True)
        registry = Registry(redis, keys, tmp_path / "cache")
        await registry.ensure_current(tmp_path / "tiny")
        no_read_in_the_parent(monkeypatch)
        result = await Retrainer(redis, keys, registry, RetrainConfig(min_windows=1000)).run_once()
    finally:
        await redis.aclose()
        cluster.stop()
    assert result.outcome == "skipped", result.reason
    assert result.windows == 4 * (120 - 50)
    assert result.reason == (
        "not enough history: 252 training windows from 4 symbol(s), at least 1000 needed"
    )
