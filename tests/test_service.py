"""`streamcast serve` as a real process: signals, kill -9, restart, HTTP, settings errors."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

from streamcast.demo import free_port
from streamcast.keys import Keys
from streamcast.replay import replay

pytestmark = pytest.mark.slow


def spawn_daemon(
    redis_url: str, prefix: str, http_port: int, tmp_path, **env: str
) -> subprocess.Popen:
    environment = {
        **os.environ,
        "STREAMCAST_REDIS_URL": redis_url,
        "STREAMCAST_KEY_PREFIX": prefix,
        "STREAMCAST_HTTP_PORT": str(http_port),
        "STREAMCAST_SHUTDOWN_TIMEOUT_S": "10",
        "STREAMCAST_BATCH_MAX_SIZE": "64",
        "TF_CPP_MIN_LOG_LEVEL": "3",
        **env,
    }
    with open(tmp_path / f"daemon-{time.monotonic_ns()}.log", "w") as log:
        # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "streamcast.cli", "serve"],
            env=environment,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
        )


def http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


async def wait_ready(port: int, process: subprocess.Popen, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, "the daemon exited during start-up"
        try:
            if http_get(port, "/readyz")[0] == 200:
                return
        except OSError:
            pass
        await asyncio.sleep(0.2)
    raise AssertionError("daemon not ready in time")


async def total_forecasts(redis, keys: Keys, names) -> int:
    return sum([await redis.xlen(keys.forecasts(n)) for n in names])


async def keep_ticks(redis, keys: Keys) -> None:
    """A consumer group that never reads: the daemon trims only what every group has
    acknowledged, so the ticks stream stays whole as the truth the checks compare against."""
    await redis.xgroup_create(keys.ticks, "witness", id="0", mkstream=True)


async def check_exactly_once(redis, keys: Keys, names) -> None:
    ticks: dict[str, list[str]] = {}
    for eid, fields in await redis.xrange(keys.ticks):
        ticks.setdefault(fields[b"symbol"].decode(), []).append(eid.decode())
    for name in names:
        forecast = [eid.decode() for eid, _ in await redis.xrange(keys.forecasts(name))]
        assert forecast == ticks[name][49:], f"{name}: lost or doubled forecasts"


def feed(symbols: int = 4, points: int = 400):
    rng = np.random.default_rng(11)
    return 100 * np.exp(np.cumsum(rng.normal(0, 0.01, (symbols, points)), axis=1))


async def wait_total(redis, keys, names, target: int, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while await total_forecasts(redis, keys, names) < target:
        assert time.monotonic() < deadline, (
            f"only {await total_forecasts(redis, keys, names)} of {target} forecasts"
        )
        await asyncio.sleep(0.2)


async def test_kill_9_mid_replay_then_restart_loses_and_doubles_nothing(
    redis_server, redis_client, tmp_path
):
    keys, names, paths = Keys("k9"), [f"K{i}" for i in range(4)], feed()
    await keep_ticks(redis_client, keys)
    port = free_port()
    daemon = spawn_daemon(redis_server.url, "k9", port, tmp_path)
    try:
        await wait_ready(port, daemon)
        producer = asyncio.create_task(replay(redis_client, keys, paths, names, rate=800))
        await wait_total(redis_client, keys, names, 200)
        daemon.send_signal(signal.SIGKILL)
        daemon.wait(10)
        await producer
        assert await total_forecasts(redis_client, keys, names) < 4 * (400 - 49), (
            "killed too late to test anything"
        )
        daemon = spawn_daemon(redis_server.url, "k9", port, tmp_path)
        await wait_total(redis_client, keys, names, 4 * (400 - 49))
        await asyncio.sleep(1.0)  # anything doubled would land now
        await check_exactly_once(redis_client, keys, names)
    finally:
        daemon.kill()
        daemon.wait(10)


async def test_sigterm_mid_replay_exits_0_in_time_and_restart_completes(
    redis_server, redis_client, tmp_path
):
    keys, names, paths = Keys("term"), [f"T{i}" for i in range(4)], feed()
    await keep_ticks(redis_client, keys)
    port = free_port()
    daemon = spawn_daemon(redis_server.url, "term", port, tmp_path)
    try:
        await wait_ready(port, daemon)
        status, body = http_get(port, "/metrics")
        assert status == 200 and "streamcast_ticks_total" in body
        assert http_get(port, "/healthz")[0] == 200
        producer = asyncio.create_task(replay(redis_client, keys, paths, names, rate=800))
        await wait_total(redis_client, keys, names, 200)
        started = time.monotonic()
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(15) == 0
        assert time.monotonic() - started < 10.5
        await producer
        daemon = spawn_daemon(redis_server.url, "term", port, tmp_path)
        await wait_total(redis_client, keys, names, 4 * (400 - 49))
        await asyncio.sleep(1.0)
        await check_exactly_once(redis_client, keys, names)
    finally:
        daemon.terminate()
        daemon.wait(15)


def test_bad_setting_stops_start_up_naming_the_variable(tmp_path):
    env = {**os.environ, "STREAMCAST_SHARD_COUNT": "zero", "STREAMCAST_BATCH_MAX_SIZE": "-1"}
    out = subprocess.run(
        [sys.executable, "-m", "streamcast.cli", "serve"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert out.returncode == 2
    assert "STREAMCAST_SHARD_COUNT" in out.stderr and "STREAMCAST_BATCH_MAX_SIZE" in out.stderr
    assert "Traceback" not in out.stderr


def test_replay_then_watch_from_the_command_line(redis_server, tmp_path, shared_data):
    env = {**os.environ, "STREAMCAST_REDIS_URL": redis_server.url, "STREAMCAST_KEY_PREFIX": "cli"}
    cli = [sys.executable, "-m", "streamcast.cli"]
    out = subprocess.run(
        [
            *cli,
            "replay",
            str(shared_data / "sp500.csv"),
            "--symbol",
            "SPX",
            "--symbols",
            "3",
            "--as-fast-as-possible",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert "replayed 12513 ticks for 3 symbol(s)" in out.stdout
    port = free_port()
    daemon = spawn_daemon(redis_server.url, "cli", port, tmp_path)
    try:
        watched = subprocess.run(
            [*cli, "watch", "SPX.0", "SPX.2", "--from-start", "--limit", "5"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,
        )
    finally:
        daemon.terminate()
        daemon.wait(15)
    lines = watched.stdout.strip().splitlines()
    assert watched.returncode == 0 and len(lines) == 5, watched.stderr
    assert all(line.startswith("SPX.") and " next " in line and " model " in line for line in lines)


def test_replay_names_an_unreachable_redis_without_a_traceback(tmp_path):
    env = {
        **os.environ,
        "STREAMCAST_REDIS_URL": f"redis://:hunter2@127.0.0.1:{free_port()}/0",
        "STREAMCAST_REDIS_TIMEOUT_S": "1",
    }
    out = subprocess.run(
        [sys.executable, "-m", "streamcast.cli", "replay", "--symbols", "2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert out.returncode == 2
    assert "cannot reach redis at redis://:***@127.0.0.1" in out.stderr
    assert "hunter2" not in out.stderr and "Traceback" not in out.stderr


def test_demo_runs_with_no_server_and_prints_forecasts(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "STREAMCAST_REDIS_URL"}
    env["STREAMCAST_HTTP_PORT"] = str(free_port())
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "streamcast.cli",
            "demo",
            "--symbols",
            "3",
            "--rate",
            "60",
            "--seconds",
            "25",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "embedded redis at redis://127.0.0.1:" in out.stdout
    forecasts = [line for line in out.stdout.splitlines() if line.startswith("SYN.")]
    assert len(forecasts) > 20
    assert any("path end" in line and "(+50)" in line for line in forecasts)


def test_password_in_the_url_works_and_a_wrong_one_is_refused_clearly(tmp_path):
    from .conftest import start_redis_server

    server = start_redis_server(tmp_path, "--requirepass", "s3cret-pw")
    try:
        cli = [
            sys.executable,
            "-m",
            "streamcast.cli",
            "replay",
            "--symbols",
            "2",
            "--points",
            "60",
            "--as-fast-as-possible",
        ]
        good = {
            **os.environ,
            "STREAMCAST_REDIS_URL": f"redis://:s3cret-pw@127.0.0.1:{server.port}/0",
        }
        out = subprocess.run(
            cli, env=good, capture_output=True, text=True, timeout=60, cwd=tmp_path
        )
        assert out.returncode == 0, out.stderr
        assert "replayed 120 ticks" in out.stdout
        bad = {**os.environ, "STREAMCAST_REDIS_URL": f"redis://:wrong-pw@127.0.0.1:{server.port}/0"}
        out = subprocess.run(cli, env=bad, capture_output=True, text=True, timeout=60, cwd=tmp_path)
        assert out.returncode == 2
        assert "refused the credentials" in out.stderr
        assert "wrong-pw" not in out.stderr + out.stdout and "Traceback" not in out.stderr
    finally:
        server.process.terminate()
        server.process.wait(10)
