"""Retraining on a real redis-server: the real trainer, and trainers that crash, hang or lie."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from streamcast.data import load_series
from streamcast.history import import_series
from streamcast.keys import Keys
from streamcast.metrics import Metrics
from streamcast.model import DEFAULT_MODEL_DIR, ModelInfo
from streamcast.registry import Registry
from streamcast.retrain import RetrainConfig, Retrainer, TrainerJob
from streamcast.wire import TickLimits

from .helpers import sample

DEFAULT_VERSION = ModelInfo.read(DEFAULT_MODEL_DIR / "model.json").version

# A stand-in trainer: copies the current model as the "candidate" and reports the given scores.
FAKE_TRAINER = """
import json, shutil, sys
from pathlib import Path
job = Path(sys.argv[-1])
spec = json.loads((job / "job.json").read_text())
shutil.copytree(spec["current_dir"], job / "candidate")
version = json.loads((job / "candidate" / "model.json").read_text())["version"]
scores = json.loads(sys.argv[1])
(job / "result.json").write_text(json.dumps(
    {"candidate_dir": str(job / "candidate"), "version": version, **scores}))
"""


def fake_trainer(**scores: float) -> list[str]:
    return [sys.executable, "-c", FAKE_TRAINER, json.dumps(scores)]


@pytest.fixture
async def deployment(redis_client, shared_data, tmp_path):
    """The S&P closes as the history of two symbols, and a registry serving the shipped model."""
    keys = Keys("rt")
    series = load_series(shared_data / "sp500.csv")
    for k, name in enumerate(("SPA", "SPB")):
        await import_series(redis_client, keys, name, series * (1 + 0.1 * k), maxlen=10_000)
    registry = Registry(redis_client, keys, tmp_path / "cache")
    await registry.ensure_current(DEFAULT_MODEL_DIR)
    return keys, registry


def retrainer(redis, deployment, command=None, **config) -> tuple[Retrainer, Metrics]:
    keys, registry = deployment
    metrics = Metrics(CollectorRegistry())
    options = {"max_points": 1500, "min_windows": 100, **config}
    return (
        Retrainer(
            redis, keys, registry, RetrainConfig(**options), metrics=metrics, command=command
        ),
        metrics,
    )


async def test_real_trainer_promotes_a_better_candidate_and_records_everything(
    redis_client, deployment
):
    keys, registry = deployment
    job, metrics = retrainer(redis_client, deployment, epochs=1, margin=0.0)
    result = await job.run_once()
    assert result.outcome == "promoted", result.reason
    assert result.current == DEFAULT_VERSION and result.candidate != DEFAULT_VERSION
    assert 0 < result.candidate_mse < result.current_mse
    assert result.naive_mse > 0 and result.windows == 2 * (1500 - 50)
    current = await registry.current()
    assert current is not None and current.version == result.candidate
    info = await registry.info(result.candidate)
    assert info.data["parent"] == DEFAULT_VERSION and info.data["symbols"] == ["SPA", "SPB"]
    assert info.training["warm_start"] is True
    # the candidate's sidecar holds its scores in the schema `streamcast train` writes
    assert info.metrics["mse"] == pytest.approx(result.candidate_mse)
    assert info.metrics["parent_mse"] == pytest.approx(result.current_mse)
    assert info.metrics["naive_mse"] == pytest.approx(result.naive_mse)
    assert info.metrics["skill"] == pytest.approx(1 - result.candidate_mse / result.naive_mse)
    assert info.metrics["relative"] is True  # the shipped model is normalised
    assert info.metrics["test_windows"] == info.data["test_windows"] > 0
    # outcome, both scores, the naive score and the reason are in the registry's log
    retrain_event, promotion = await registry.events(2)
    assert promotion["event"] == "promoted" and promotion["version"] == result.candidate
    assert retrain_event["event"] == "retrain" and retrain_event["outcome"] == "promoted"
    assert float(retrain_event["candidate_mse"]) == pytest.approx(result.candidate_mse)
    assert float(retrain_event["naive_mse"]) == pytest.approx(result.naive_mse)
    # and in the metrics
    assert sample(metrics, "streamcast_retrains_total", result="promoted") == 1
    assert sample(metrics, "streamcast_retrain_seconds_count") == 1
    assert sample(metrics, "streamcast_retrain_holdout_mse", model="candidate") == pytest.approx(
        result.candidate_mse
    )
    assert await redis_client.get(keys.retrain_lock) is None, "the lock is released"


async def test_a_worse_candidate_is_rejected_and_the_version_stays(redis_client, deployment):
    _, registry = deployment
    job, metrics = retrainer(
        redis_client,
        deployment,
        fake_trainer(candidate_mse=2.0, current_mse=1.0, naive_mse=1.5),
    )
    result = await job.run_once()
    assert result.outcome == "rejected" and "does not beat" in result.reason
    assert (await registry.current()).version == DEFAULT_VERSION  # type: ignore[union-attr]
    assert sample(metrics, "streamcast_retrains_total", result="rejected") == 1
    assert sample(metrics, "streamcast_retrain_holdout_mse", model="current") == 1.0
    # within the margin is not better either
    job, _ = retrainer(
        redis_client,
        deployment,
        fake_trainer(candidate_mse=0.995, current_mse=1.0, naive_mse=1.5),
        margin=0.01,
    )
    assert (await job.run_once()).outcome == "rejected"


@pytest.mark.parametrize(
    ("command", "limit", "expected"),
    [
        ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", 60, "killed by signal 9"),
        ("import sys; print('trainer: out of memory'); sys.exit(1)", 60, "status 1: out of memory"),
        ("import time; time.sleep(120)", 2, "exceeded its time limit of 2 s"),
    ],
    ids=["killed", "crashed", "hung"],
)
async def test_a_failing_trainer_changes_nothing(
    redis_client, deployment, command, limit, expected
):
    keys, registry = deployment
    job, metrics = retrainer(
        redis_client, deployment, [sys.executable, "-c", command], time_limit_s=limit
    )
    started = time.monotonic()
    result = await job.run_once()
    assert result.outcome == "failed" and expected in result.reason
    assert time.monotonic() - started < limit + 30
    assert (await registry.current()).version == DEFAULT_VERSION  # type: ignore[union-attr]
    assert sample(metrics, "streamcast_retrains_total", result="failed") == 1
    assert await redis_client.get(keys.retrain_lock) is None
    # and the next retrain still runs
    job.command = fake_trainer(candidate_mse=2.0, current_mse=1.0, naive_mse=1.5)
    assert (await job.run_once()).outcome == "rejected"


async def test_a_nan_candidate_is_never_promoted(redis_client, deployment):
    _, registry = deployment
    job, metrics = retrainer(
        redis_client,
        deployment,
        fake_trainer(candidate_mse=float("nan"), current_mse=1.0, naive_mse=1.5),
    )
    result = await job.run_once()
    assert result.outcome == "failed" and "not finite" in result.reason
    assert (await registry.current()).version == DEFAULT_VERSION  # type: ignore[union-attr]
    assert sample(metrics, "streamcast_retrains_total", result="failed") == 1


async def test_two_replicas_never_retrain_at_once(redis_client, deployment):
    slow = [sys.executable, "-c", "import time; time.sleep(3)"]
    a, _ = retrainer(redis_client, deployment, slow)
    b, _ = retrainer(redis_client, deployment, slow)
    results = await asyncio.gather(a.run_once(), b.run_once())
    outcomes = sorted(r.outcome for r in results)
    # one ran (its trainer wrote no result: failed), the other found the lock taken
    assert outcomes == ["failed", "skipped"], [r.reason for r in results]
    skipped = next(r for r in results if r.outcome == "skipped")
    assert "another replica" in skipped.reason


async def test_too_little_history_is_skipped_with_the_reason(redis_client, tmp_path):
    keys = Keys("little")
    await import_series(redis_client, keys, "X", 100 + np.arange(120.0), maxlen=1000)
    registry = Registry(redis_client, keys, tmp_path)
    job = Retrainer(redis_client, keys, registry, RetrainConfig(), initial_model=DEFAULT_MODEL_DIR)
    result = await job.run_once()
    assert result.outcome == "skipped" and "not enough history" in result.reason
    assert (await registry.current()).version == DEFAULT_VERSION  # type: ignore[union-attr]


# A trainer that says it has started (its pid in a marker file), then sleeps for a minute.
MARKED_SLEEPER = """
import os, sys, time
from pathlib import Path
marker = Path(sys.argv[1])
marker.with_suffix(".tmp").write_text(str(os.getpid()))
os.replace(marker.with_suffix(".tmp"), marker)
time.sleep(60)
"""


def running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_redis_gone_mid_retrain_kills_the_trainer_and_fails_cleanly(
    redis_server, deployment, tmp_path
):
    from streamcast.connect import make_redis

    keys, _ = deployment
    marker = tmp_path / "trainer.pid"
    client = make_redis(redis_server.url, timeout_s=1.0)
    job, metrics = retrainer(
        client, deployment, [sys.executable, "-c", MARKED_SLEEPER, str(marker)]
    )
    job.config.lock_ttl_s = 3.0  # renewals every second
    task = asyncio.create_task(job.run_once())
    try:
        deadline = time.monotonic() + 60
        while not marker.is_file():  # the trainer runs (so the lock was taken before it)
            assert not task.done(), f"the retrain ended first: {task.result()}"
            assert time.monotonic() < deadline, "the trainer never started"
            await asyncio.sleep(0.05)
        pid = int(marker.read_text())
        assert running(pid)
        token = await client.get(keys.retrain_lock)
        assert token is not None and len(token) == 32, "the retrain lock is held"
        redis_server.process.kill()
        redis_server.process.wait(10)
        # the trainer sleeps 60 s: ending well within that means it was killed, not awaited
        result = await asyncio.wait_for(task, 30)
    finally:
        task.cancel()
        await client.aclose()
    assert result.outcome == "failed", result.reason
    assert result.reason.startswith("redis unavailable mid-retrain"), result.reason
    assert "; trainer killed" in result.reason, result.reason
    assert not running(pid), "the trainer is still running"
    assert sample(metrics, "streamcast_retrains_total", result="failed") == 1


def test_retrain_config_defaults_are_what_the_service_runs_with(monkeypatch):
    from streamcast.settings import Settings, retrain_config

    for name in list(os.environ):
        if name.startswith("STREAMCAST_"):
            monkeypatch.delenv(name)
    assert retrain_config(Settings(_env_file=None)) == RetrainConfig()
    assert RetrainConfig().margin == 0.01 and RetrainConfig().nice == 19


def test_the_trainer_reads_the_job_its_parent_wrote_and_only_its_user_can(tmp_path):
    import stat

    from streamcast.history import HistorySource

    config = RetrainConfig(symbols=("A", "B"), epochs=3, nice=5, limits=TickLimits(positive=False))
    source = HistorySource("redis://:pw@127.0.0.1:6390/2", False, Keys("p", 4), 2.5)
    TrainerJob(config, tmp_path / "current", source, 50).write(tmp_path)
    job = TrainerJob.read(tmp_path)
    assert job == TrainerJob(config, tmp_path / "current", source, 50)
    assert job.min_points == 102
    # it holds the password: readable and writable by its user, no one else
    assert stat.S_IMODE((tmp_path / "job.json").stat().st_mode) == 0o600
    # a setting missing from the job takes RetrainConfig's default, as the parent's would
    spec = json.loads((tmp_path / "job.json").read_text())
    del spec["nice"], spec["threads"]
    (tmp_path / "job.json").write_text(json.dumps(spec))
    job = TrainerJob.read(tmp_path)
    assert (job.config.nice, job.config.threads) == (RetrainConfig().nice, RetrainConfig().threads)
