"""`streamcast serve` as a real process: signals, kill -9, restart, HTTP, settings errors."""

from __future__ import annotations

import asyncio
import datetime
import os
import signal
import subprocess
import sys

import pytest

from streamcast.demo import free_port
from streamcast.keys import Keys
from streamcast.replay import replay

from .helpers import (
    check_exactly_once,
    feed,
    http_get,
    keep_ticks,
    spawn_daemon,
    start_redis_server,
    total_forecasts,
    wait_ready,
    wait_settled,
    wait_total,
)

pytestmark = pytest.mark.slow


def log_time(log: str, needle: str) -> float:
    """The time (epoch seconds) of the first log line containing ``needle``."""
    line = next(line for line in log.splitlines() if needle in line)
    stamp = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
    return stamp.timestamp()


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
        await wait_settled(redis_client, keys)  # anything doubled would have landed
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
        daemon.send_signal(signal.SIGTERM)
        # the exit includes TensorFlow's teardown, slow on a loaded machine: a generous bound
        assert daemon.wait(60) == 0
        log = daemon.log_path.read_text()  # type: ignore[attr-defined]
        # the drain itself, by the daemon's own clock: within the 10 s shutdown timeout, and
        # the batch in flight was finished, not abandoned
        drained_s = log_time(log, "stopped: ") - log_time(log, "SIGTERM: stopping")
        assert 0 <= drained_s < 10, f"stopped {drained_s:.1f} s after the signal"
        assert "shutdown timeout" not in log and "Traceback" not in log
        # and acknowledged: the group has nothing pending (ticks read but not acknowledged)
        assert (await redis_client.xpending(keys.ticks(0), keys.group))["pending"] == 0
        await producer
        daemon = spawn_daemon(redis_server.url, "term", port, tmp_path)
        await wait_total(redis_client, keys, names, 4 * (400 - 49))
        await wait_settled(redis_client, keys)
        await check_exactly_once(redis_client, keys, names)
    finally:
        daemon.terminate()
        daemon.wait(60)


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


async def test_demo_runs_with_no_server_and_prints_forecasts(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "STREAMCAST_REDIS_URL"}
    env["STREAMCAST_HTTP_PORT"] = str(free_port())
    cli = [sys.executable, "-m", "streamcast.cli", "demo", "--symbols", "3", "--rate", "60"]
    with open(tmp_path / "demo.err", "w") as err:
        demo = await asyncio.create_subprocess_exec(
            *cli, env=env, stdout=asyncio.subprocess.PIPE, stderr=err, cwd=tmp_path
        )
    lines: list[str] = []

    def forecasts() -> list[str]:
        return [line for line in lines if line.startswith("SYN.")]

    def enough() -> bool:
        paths = [line for line in forecasts() if "path end" in line and "(+50)" in line]
        return len(forecasts()) > 20 and bool(paths)

    async def read_until_enough() -> None:
        while not enough():
            raw = await demo.stdout.readline()  # type: ignore[union-attr]
            if not raw:
                return  # the demo exited
            lines.append(raw.decode())

    try:
        # generous: the model loads and compiles first, slowly on a loaded machine
        await asyncio.wait_for(read_until_enough(), 240)
    finally:
        if demo.returncode is None:
            demo.send_signal(signal.SIGINT)  # Ctrl+C, as a user stops it
        # drain its output, or a full pipe would keep it from exiting
        rest = await asyncio.wait_for(demo.stdout.read(), 60)  # type: ignore[union-attr]
        status = await asyncio.wait_for(demo.wait(), 60)
    output = "".join(lines) + rest.decode()
    assert enough(), output[-2000:] + (tmp_path / "demo.err").read_text()[-2000:]
    assert status == 0, (tmp_path / "demo.err").read_text()[-2000:]
    assert "embedded redis at redis://127.0.0.1:" in output


def test_password_in_the_url_works_and_a_wrong_one_is_refused_clearly(tmp_path):
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


async def test_the_daemons_signal_handlers_give_back_the_ones_from_before():
    """While the daemon runs its handler stops it in order; after, the command line's is back
    (a SIGTERM while closing ends the process as `terminated`, not by the default action)."""
    from streamcast.service import _signals

    def before(signum, frame):  # stands for streamcast.cli's
        raise AssertionError("not called")

    saved = signal.signal(signal.SIGTERM, before)
    try:
        stop = asyncio.Event()
        interrupt = signal.getsignal(signal.SIGINT)  # asyncio.run's, here
        with _signals(stop, install=True):
            assert signal.getsignal(signal.SIGTERM) is not before
            os.kill(os.getpid(), signal.SIGTERM)
            await asyncio.wait_for(stop.wait(), 5)  # the daemon's: stop, in order
        assert signal.getsignal(signal.SIGTERM) is before
        assert signal.getsignal(signal.SIGINT) is interrupt
    finally:
        signal.signal(signal.SIGTERM, saved)
