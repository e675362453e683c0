"""The demo's stop path, run again and again in-process: however it is asked to stop (its
``--seconds``, SIGTERM, a first Ctrl+C) and whatever it is doing then (starting, filling windows,
forecasting), it ends in time and leaves nothing of itself running."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import pytest

import streamcast.demo
from streamcast.demo import free_port, run_demo

from .helpers import http_get, wait_for

pytestmark = pytest.mark.slow

# the daemon's drain (the batch in flight, within its 10 s shutdown timeout) and the HTTP
# server's stop come first; the feed and the watch end within a slice or a read after that
STOP_BOUND_S = 8.0


@pytest.fixture
def demo_env(monkeypatch, shipped_engine):
    """The demo on its embedded Redis with the shipped engine loaded once (``serve`` closes an
    engine at the end; a later forecast starts its workers again)."""
    monkeypatch.delenv("STREAMCAST_REDIS_URL", raising=False)
    monkeypatch.setattr(streamcast.demo, "load_engine", lambda settings: shipped_engine)

    def new_port() -> int:
        port = free_port()
        monkeypatch.setenv("STREAMCAST_HTTP_PORT", str(port))
        return port

    return new_port


def assert_nothing_left_running() -> None:
    left = asyncio.all_tasks() - {asyncio.current_task()}
    assert not left, f"left running: {sorted(t.get_name() for t in left)}"


# (symbols, ticks a second, stop after): the demo's own feed (8 at 40/s: the old replay slept
# 12.4 s between bursts), and a fast one whose windows fill within the first second
RUNS = [(8, 40.0, 0.5 + 0.5 * k) for k in range(5)] + [(3, 600.0, 1.0 + 0.4 * k) for k in range(7)]


async def test_the_demo_ends_in_time_every_time_it_is_stopped(demo_env, capsys):
    for symbols, rate, seconds in RUNS:
        demo_env()
        started = time.monotonic()
        demo = run_demo(symbols=symbols, rate=rate, seconds=seconds)
        status = await asyncio.wait_for(demo, seconds + STOP_BOUND_S)
        took = time.monotonic() - started
        assert status == 0
        assert took < seconds + STOP_BOUND_S, f"{symbols} at {rate}/s: ended {took:.1f} s in"
        assert_nothing_left_running()
    out = capsys.readouterr().out
    # not a terminal: a line per forecast, no table
    assert "\x1b[" not in out
    assert sum(line.startswith("SYN.") and " next " in line for line in out.splitlines()) > 100


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "ctrl-c"])
async def test_a_signal_stops_the_demo_the_same_way(demo_env, signum):
    for _ in range(3):
        await stopped_by_signal(demo_env(), signum)
        assert_nothing_left_running()


async def stopped_by_signal(port: int, signum: int) -> None:
    demo = asyncio.create_task(run_demo(symbols=3, rate=600.0))

    async def ready() -> bool:
        assert not demo.done(), "the demo ended before it was stopped"
        try:
            return (await asyncio.to_thread(http_get, port, "/readyz"))[0] == 200
        except OSError:
            return False

    # ready: serve's signal handlers are in place (they are set before HTTP binds)
    await wait_for(ready, 120, what="the demo's daemon ready", interval_s=0.2)
    os.kill(os.getpid(), signum)
    assert await asyncio.wait_for(demo, STOP_BOUND_S) == 0


def test_tensorflow_starts_quietly_unless_verbose():
    """The command line's way to import TensorFlow: its C++ start-up lines (oneDNN, CUDA
    probing) are not shown; with -v they are, as TensorFlow writes them."""
    code = (
        "import os, sys\n"
        "from streamcast import cli\n"
        "cli._tensorflow_logging(verbose='-v' in sys.argv)\n"
        "cli._quiet_tensorflow()\n"
        "import tensorflow\n"  # as every command that needs it does next
        "print(os.environ['TF_CPP_MIN_LOG_LEVEL'])\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}

    def start(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-c", code, *args]
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)

    quiet, verbose = start(), start("-v")
    assert quiet.returncode == 0 and quiet.stdout.strip() == "3"
    assert quiet.stderr == ""
    assert verbose.returncode == 0 and verbose.stdout.strip() == "0"
    assert verbose.stderr.strip(), "TensorFlow printed nothing: nothing was silenced either"


def test_free_port_never_gives_a_port_a_bind_to_port_0_can_take():
    """The CI failure at c97b17a: a test's HTTP port from free_port, not yet bound, was the port
    the demo's embedded Redis got from the OS a moment later. free_port now stays below the
    kernel's ephemeral range and hands no port out twice; the embedded server binds port 0."""
    low, high = streamcast.demo.ephemeral_range()
    ports = [free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)
    assert not [p for p in ports if low <= p <= high]
    with streamcast.demo.embedded_redis() as url:
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        assert low <= port <= high
        assert port not in ports
