"""`streamcast serve` as a process, run the way operators run it by mistake: two copies with the
same settings, a broken current model at a rolling restart, an HTTP port already taken."""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import signal
import socket

import pytest

from streamcast.demo import free_port
from streamcast.keys import Keys
from streamcast.model import DEFAULT_MODEL_DIR
from streamcast.registry import Registry
from streamcast.replay import replay

from .helpers import (
    check_exactly_once,
    feed,
    http_get,
    keep_ticks,
    scraped,
    spawn_daemon,
    wait_for,
    wait_ready,
    wait_settled,
    wait_total,
)

pytestmark = pytest.mark.slow


async def test_two_daemons_with_the_same_settings_one_stands_by_then_takes_over(
    redis_server, redis_client, tmp_path
):
    keys, names, paths = Keys("twin"), [f"W{i}" for i in range(4)], feed()
    await keep_ticks(redis_client, keys)
    ports = [free_port(), free_port()]
    # what `docker compose --scale` or a copied unit file produces: the same shard, the same name
    env = {"STREAMCAST_CONSUMER_NAME": "replica-0", "STREAMCAST_LEASE_TTL_S": "3"}
    first = spawn_daemon(redis_server.url, "twin", ports[0], tmp_path, **env)
    second = None
    try:
        await wait_ready(ports[0], first)
        second = spawn_daemon(redis_server.url, "twin", ports[1], tmp_path, **env)

        async def standing_by() -> bool:
            assert second.poll() is None, "the second daemon exited"
            try:
                return scraped(ports[1], "streamcast_standby ", absent=0.0) == 1.0
            except OSError:
                return False

        await wait_for(standing_by, timeout_s=90, interval_s=0.2)
        assert http_get(ports[1], "/readyz")[0] == 503, "a standby must not say it is ready"
        await replay(redis_client, keys, paths[:, :200], names, rate=800)
        await wait_total(redis_client, keys, names, 4 * (200 - 49))
        await check_exactly_once(redis_client, keys, names)
        # the history holds every tick exactly once (two consumers would have split them)
        for name in names:
            assert await redis_client.xlen(keys.history(name)) == 200
        consumers = await redis_client.xinfo_consumers(keys.ticks(0), keys.group)
        assert len(consumers) == 1, "only the lease holder reads the group"
        # the holder dies: the standby takes over within the lease's time to live
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        await wait_ready(ports[1], second, timeout_s=30)
        await replay(redis_client, keys, paths[:, 200:], names, rate=800)
        await wait_total(redis_client, keys, names, 4 * (400 - 49))
        await wait_settled(redis_client, keys)  # nothing can be added or doubled after this
        await check_exactly_once(redis_client, keys, names)
        assert scraped(ports[1], "streamcast_standby ") == 0.0
    finally:
        for process in (first, second):
            if process is not None:
                process.kill()
                process.wait(10)
    logs = "\n".join(p.read_text() for p in tmp_path.glob("daemon-*.log"))
    assert "standing by" in logs and "took partitions" in logs and "Traceback" not in logs


async def test_a_current_model_that_does_not_load_starts_on_the_packaged_one_loudly(
    redis_server, redis_client, tmp_path
):
    keys = Keys("broken")
    registry = Registry(redis_client, keys, tmp_path / "cache")
    await registry.ensure_current(DEFAULT_MODEL_DIR)
    # bytes that are not a model, with a sidecar whose sha256 matches them
    broken = tmp_path / "broken"
    shutil.copytree(DEFAULT_MODEL_DIR, broken)
    (broken / "model.keras").write_bytes(b"not a model at all")
    sidecar = json.loads((broken / "model.json").read_text())
    sidecar["version"] = "broken-1"
    sidecar["sha256"] = hashlib.sha256(b"not a model at all").hexdigest()
    (broken / "model.json").write_text(json.dumps(sidecar))
    await registry.register(broken)
    await registry.promote("broken-1", reason="a bad promotion")
    port = free_port()
    daemon = spawn_daemon(redis_server.url, "broken", port, tmp_path, STREAMCAST_MODEL_CHECK_S="1")
    try:
        await wait_ready(port, daemon)
        assert scraped(port, 'streamcast_model_load_failures_total{reason="invalid"}') == 1.0
        assert scraped(port, 'streamcast_recoveries_total{what="start_fallback"}') == 1.0
        packaged = json.loads((DEFAULT_MODEL_DIR / "model.json").read_text())["version"]
        assert scraped(port, f'streamcast_model_info{{version="{packaged}"}}') == 1.0
        await asyncio.sleep(3)  # three model checks: the refused version is not tried again
        assert scraped(port, 'streamcast_model_load_failures_total{reason="invalid"}') == 1.0
        await replay(redis_client, keys, feed(1, 60), ["B0"], rate=None)
        await wait_total(redis_client, keys, ["B0"], 11)
    finally:
        daemon.terminate()
        daemon.wait(15)
    log = "\n".join(p.read_text() for p in tmp_path.glob("daemon-*.log"))
    assert "does not load" in log and "NOT THE CURRENT broken-1" in log


@pytest.mark.parametrize("where", ["port_in_use", "unresolvable_host"])
def test_http_that_cannot_bind_is_one_line_and_exit_2_before_compiling(
    redis_server, tmp_path, where
):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    env = {"STREAMCAST_HTTP_HOST": "no-such-host.invalid"} if where == "unresolvable_host" else {}
    try:
        process = spawn_daemon(redis_server.url, "bind", port, tmp_path, **env)
        assert process.wait(120) == 2
    finally:
        taken.close()
    log = "\n".join(p.read_text() for p in tmp_path.glob("daemon-*.log"))
    error_lines = [line for line in log.splitlines() if "error:" in line]
    assert len(error_lines) == 1 and "cannot serve HTTP" in error_lines[0], log
    assert "Traceback" not in log
    assert "programs compiled" not in log, "it compiled the model before finding the port taken"
