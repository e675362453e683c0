"""Helpers the test modules share: a private redis-server, `serve` as a process, waits on a
condition, metric reads, and the exactly-once check. Fixtures are in tests/conftest.py; no test
module imports from another (tests/test_layout.py checks it)."""

from __future__ import annotations

import asyncio
import inspect
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest

from streamcast.demo import claim_port, ephemeral_range, free_port
from streamcast.keys import Keys

if TYPE_CHECKING:
    from streamcast.daemon import Daemon
    from streamcast.metrics import Metrics

# the consumer group that never reads: see keep_ticks
WITNESS = "witness"

# -- waiting for a condition -------------------------------------------------------------------


async def wait_for(
    condition: Callable[[], Any],
    timeout_s: float = 60.0,
    what: str | None = None,
    interval_s: float = 0.05,
) -> Any:
    """Poll ``condition`` until it returns something true, and return that.

    Args:
        condition: a plain or async callable (or one returning an awaitable).
        what: names what is awaited in the failure; by default the callable's name, or a
            lambda's source line.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        assert time.monotonic() < deadline, (
            f"{what or _describe(condition)} not met within {timeout_s} s"
        )
        await asyncio.sleep(interval_s)


def _describe(condition: Callable[[], Any]) -> str:
    name = getattr(condition, "__name__", "")
    if name and name != "<lambda>":
        return name
    try:
        source = inspect.getsource(condition).strip()
    except (OSError, TypeError):
        return "condition"
    return source[source.find("lambda") :] if "lambda" in source else source


# -- metrics: read from a registry in-process, or scraped from /metrics ------------------------


def sample(metrics: Metrics, name: str, *, absent: float | None = None, **labels: str) -> float:
    """One sample of ``metrics``' registry.

    Args:
        absent: the value read when the sample is not exported; None fails naming the sample.
    """
    value = metrics.prometheus.get_sample_value(name, labels)
    if value is None:
        assert absent is not None, f"{name}{labels} is not exported"
        return absent
    return value


def scraped(port: int, line_start: str, *, absent: float | None = None) -> float:
    """The value on the first line of the daemon's /metrics that starts with ``line_start``
    (the name and labels as exported: ``'streamcast_standby '``, ``'x_total{reason="oom"}'``).

    Args:
        absent: the value read when no line starts so; None fails naming it.
    """
    _, body = http_get(port, "/metrics")
    for line in body.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    assert absent is not None, f"{line_start} not in /metrics"
    return absent


# -- a private redis-server ----------------------------------------------------------------------


@dataclass
class RedisServer:
    port: int
    process: subprocess.Popen
    directory: Path

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


def start_redis_server(directory: Path, *extra: str, port: int | None = None) -> RedisServer:
    """A redis-server on a free port (or ``port``), nothing saved, answering PING."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail(
            "redis-server is not installed (apt-get install -y redis-server; .ci/run does it)"
        )
    port = port or free_port()
    process = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(directory),
            *extra,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(64).startswith((b"+PONG", b"-NOAUTH")):
                    return RedisServer(port, process, directory)
        except OSError:
            time.sleep(0.02)
    process.kill()
    process.wait(10)
    pytest.fail(f"redis-server did not start on port {port}")


# -- `streamcast serve` as a process -------------------------------------------------------------


def spawn_daemon(
    redis_url: str, prefix: str, http_port: int, tmp_path, **env: str
) -> subprocess.Popen:
    """`streamcast serve` in ``tmp_path``, its output in a ``daemon-*.log`` there (``log_path``)."""
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
    log_path = tmp_path / f"daemon-{time.monotonic_ns()}.log"
    with open(log_path, "w") as log:
        # the child keeps its own copy of the descriptor
        process = subprocess.Popen(
            [sys.executable, "-m", "streamcast.cli", "serve"],
            env=environment,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
        )
    process.log_path = log_path  # type: ignore[attr-defined]
    return process


def http_get(port: int, path: str) -> tuple[int, str]:
    """The status and body of GET ``path`` on 127.0.0.1; OSError when nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


async def wait_ready(
    port: int, process: subprocess.Popen, timeout_s: float = 90, status: int = 200
) -> None:
    """Wait until the daemon ``process`` answers ``status`` on /readyz (200: ready, 503: not);
    fail if it exits first."""

    async def answers() -> bool:
        assert process.poll() is None, f"the daemon exited waiting for /readyz {status}"
        try:
            return http_get(port, "/readyz")[0] == status
        except OSError:
            return False

    await wait_for(answers, timeout_s, what=f"/readyz answering {status}", interval_s=0.2)


# -- ticks and forecasts in Redis ----------------------------------------------------------------


def feed(symbols: int = 4, points: int = 400) -> np.ndarray:
    """Seeded random-walk prices, one row a symbol."""
    rng = np.random.default_rng(11)
    return 100 * np.exp(np.cumsum(rng.normal(0, 0.01, (symbols, points)), axis=1))


def known_settings() -> set[str]:
    """Every STREAMCAST_* variable streamcast.settings reads."""
    from streamcast.settings import ENV_PREFIX, Settings

    return {ENV_PREFIX + name.upper() for name in Settings.model_fields}


async def keep_ticks(redis, keys: Keys) -> None:
    """A consumer group that never reads, on every partition stream: the daemon trims only what
    every group has acknowledged, so the streams stay whole as the truth the checks compare
    against."""
    for ticks in keys.all_ticks():
        await redis.xgroup_create(ticks, WITNESS, id="0", mkstream=True)


async def xlen_at_least(redis, key: str, n: int) -> bool:
    return await redis.xlen(key) >= n


async def total_forecasts(redis, keys: Keys, names) -> int:
    return sum([await redis.xlen(keys.forecasts(n)) for n in names])


async def wait_total(redis, keys, names, target: int, timeout_s: float = 120) -> None:
    """Wait until the forecast streams of ``names`` hold ``target`` entries in all."""
    deadline = time.monotonic() + timeout_s
    while await total_forecasts(redis, keys, names) < target:
        assert time.monotonic() < deadline, (
            f"only {await total_forecasts(redis, keys, names)} of {target} forecasts"
        )
        await asyncio.sleep(0.2)


async def wait_settled(redis, keys: Keys, timeout_s: float = 60) -> None:
    """Wait until every daemon's group was delivered the whole ticks stream and acknowledged it
    all: nothing is left to forecast (publish and ack are one transaction), so nothing can be
    added, or doubled, after this."""

    def text(value) -> str:
        return value.decode() if isinstance(value, bytes) else str(value)

    deadline = time.monotonic() + timeout_s
    while True:
        waiting, seen = [], 0
        for ticks in keys.all_ticks():
            newest = await redis.xrevrange(ticks, count=1)
            if not newest:
                continue  # no tick was sent to this partition
            try:
                found = await redis.xinfo_groups(ticks)
            except Exception:
                found = []
            groups = [g for g in found if text(g["name"]) != WITNESS]
            seen += len(groups)
            waiting += [
                (ticks, text(g["name"]), g["pending"], text(g["last-delivered-id"]))
                for g in groups
                if g["pending"] or text(g["last-delivered-id"]) != text(newest[0][0])
            ]
            if not groups:
                waiting.append((ticks, "no group", 0, ""))
        if seen and not waiting:
            return
        assert time.monotonic() < deadline, f"groups not settled: {waiting}"
        await asyncio.sleep(0.1)


async def tick_ids_by_symbol(redis, keys: Keys) -> dict[str, list[str]]:
    """The ids in the ticks stream, by symbol."""
    out: dict[str, list[str]] = {}
    for ticks in keys.all_ticks():
        for eid, fields in await redis.xrange(ticks):
            out.setdefault(fields[b"symbol"].decode(), []).append(eid.decode())
    return out


async def forecast_ids(redis, keys: Keys, symbol: str) -> list[str]:
    return [eid.decode() for eid, _ in await redis.xrange(keys.forecasts(symbol))]


async def check_exactly_once(redis, keys: Keys, names) -> None:
    """Each symbol's forecasts are its ticks from the 50th on, each once, in order."""
    ticks = await tick_ids_by_symbol(redis, keys)
    for name in names:
        forecast = await forecast_ids(redis, keys, name)
        assert forecast == ticks[name][49:], f"{name}: lost or doubled forecasts"


# -- a local Redis Cluster -------------------------------------------------------------------------


@dataclass
class RedisClusterNodes:
    """Masters (and replicas) on free ports (``start_redis_cluster``); ``url`` names the first."""

    nodes: list[RedisServer]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.nodes[0].port}"

    def cli(self, *args: str, timeout: float = 120) -> str:
        """``redis-cli --cluster ARGS`` against the first node (reshard, rebalance, check)."""
        done = subprocess.run(
            ["redis-cli", "--cluster", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=True,
        )
        return done.stdout

    def stop(self) -> None:
        for node in self.nodes:
            node.process.terminate()
        for node in self.nodes:
            try:
                node.process.wait(10)
            except subprocess.TimeoutExpired:
                node.process.kill()
                node.process.wait(10)


def _cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free too, both below the kernel's
    ephemeral range (where a bind to port 0 or an outgoing connection could take the bus port)."""
    for _ in range(200):
        port = free_port(below=ephemeral_range()[0] - 10000)
        if claim_port(port + 10000):  # the bus port, free and not handed out meanwhile
            return port
    raise RuntimeError("no free port pair for a cluster node")


def start_redis_cluster(
    directory: Path, masters: int = 3, replicas: int = 0, node_timeout_ms: int = 5000
) -> RedisClusterNodes:
    """``masters`` redis-servers with ``--cluster-enabled yes`` (and ``replicas`` replicas of
    each), joined by ``redis-cli --cluster create``; returns once every slot is served
    (``cluster_state:ok`` on every node) and every replica is in sync with its master."""
    nodes: list[RedisServer] = []
    try:
        for i in range(masters * (1 + replicas)):
            node_dir = directory / f"node-{i}"
            node_dir.mkdir(parents=True, exist_ok=True)
            nodes.append(
                start_redis_server(
                    node_dir,
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    str(node_dir / "nodes.conf"),
                    "--cluster-node-timeout",
                    str(node_timeout_ms),
                    "--logfile",
                    str(node_dir / "redis.log"),
                    port=_cluster_port(),
                )
            )
    except BaseException:
        RedisClusterNodes(nodes).stop()
        raise
    cluster = RedisClusterNodes(nodes)
    addresses = [f"127.0.0.1:{n.port}" for n in nodes]
    try:
        cluster.cli("create", *addresses, "--cluster-replicas", str(replicas), "--cluster-yes")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            states = [
                subprocess.run(
                    ["redis-cli", "-p", str(n.port), what, detail],
                    capture_output=True,
                    text=True,
                    timeout=10,
                ).stdout
                for n in nodes
                for what, detail in (("cluster", "info"), ("info", "replication"))
            ]
            clusters, replication = states[0::2], states[1::2]
            copies = [r for r in replication if "role:slave" in r]
            synced = len(copies) == masters * replicas and all(
                "master_link_status:up" in r for r in copies
            )
            if synced and all("cluster_state:ok" in s for s in clusters):
                return cluster
            time.sleep(0.1)
    except BaseException:
        cluster.stop()
        raise
    cluster.stop()
    pytest.fail(
        "the Redis Cluster did not come up (cluster_state:ok, every replica in sync) within 30 s"
    )


async def crash(daemon: Daemon) -> None:
    """As kill -9: every task stops at once, the publish in flight with them; no lease is
    released, nothing more is published."""
    from streamcast.tasks import cancelled

    tasks = list(daemon._tasks)
    if daemon._writing is not None and not daemon._writing.done():
        tasks.append(daemon._writing)  # a killed process does not finish its publish
    for task in tasks:
        task.cancel()
    # bounded, cancelling again: a task inside a Redis call may take one cancellation in
    await cancelled(tasks)
    daemon._tasks = []
    daemon._started = False
