"""Faults, bad input and access, with real redis-servers, real processes and real signals.

docs/RELIABILITY.md lists each test with what it does to the system and what it shows.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import typing
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from redis import exceptions as redis_errors

from streamcast.connect import make_redis
from streamcast.daemon import Daemon, DaemonConfig
from streamcast.data import load_series
from streamcast.demo import free_port
from streamcast.keys import Keys
from streamcast.metrics import Metrics
from streamcast.replay import fan_out, replay
from streamcast.settings import Settings, SettingsError, load_settings
from streamcast.wire import Tick, TickError

from .helpers import (
    check_exactly_once,
    feed,
    http_get,
    keep_ticks,
    scraped,
    spawn_daemon,
    start_redis_server,
    total_forecasts,
    wait_for,
    wait_ready,
    wait_settled,
    wait_total,
)

# -- settings: every one refuses a wrong type with a message naming it ---------------------------


# free text (a host name, a path checked when it is used) takes any string
FREE_TEXT = {"model_path", "model_cache_dir", "http_host"}


def wrong_value(name: str) -> tuple[str, str]:
    """A value of the wrong type for setting ``name``, and the rule its refusal must state."""
    annotation = Settings.model_fields[name].annotation
    if typing.get_origin(annotation) is typing.Literal:  # a choice: the refusal lists them
        return "bad value", "Input should be " + repr(typing.get_args(annotation)[0])
    kinds = set(typing.get_args(annotation)) or {annotation}
    if bool in kinds:
        return "perhaps", "valid boolean"
    if int in kinds:
        return "lots", "valid integer"
    if float in kinds:
        return "soon", "valid number"
    if name == "redis_url":
        return "http://127.0.0.1:6379/0", "must start with redis://"
    return "bad value with spaces and {{ braces }}" + "x" * 100, "should match pattern"


def test_free_text_settings_exist():
    assert not FREE_TEXT - set(Settings.model_fields), "a free-text setting is gone"


@pytest.mark.parametrize("name", sorted(set(Settings.model_fields) - FREE_TEXT))
def test_every_setting_refuses_a_wrong_type_naming_the_variable(monkeypatch, name):
    bad, rule = wrong_value(name)
    variable = f"STREAMCAST_{name.upper()}"
    monkeypatch.setenv(variable, bad)
    with pytest.raises(SettingsError) as refused:
        load_settings()
    lines = [line.strip() for line in str(refused.value).splitlines()]
    named = [line for line in lines if line.startswith(f"{variable}:")]
    assert len(named) == 1 and rule in named[0], str(refused.value)


# a representative set: an int, a float, a bool, a pattern, a URL, a number out of range
START_UP_REFUSALS = [
    ("STREAMCAST_BATCH_MAX_SIZE", "lots", "valid integer"),
    ("STREAMCAST_SHUTDOWN_TIMEOUT_S", "soon", "valid number"),
    ("STREAMCAST_RETRAIN_RESIDUAL", "perhaps", "valid boolean"),
    ("STREAMCAST_KEY_PREFIX", "bad prefix", "should match pattern"),
    ("STREAMCAST_REDIS_URL", "http://127.0.0.1:6379/0", "must start with redis://"),
    ("STREAMCAST_HTTP_PORT", "70000", "less than or equal to 65535"),
]


@pytest.mark.parametrize(("variable", "bad", "rule"), START_UP_REFUSALS)
def test_serve_refuses_a_wrong_type_at_start_up_naming_the_variable(tmp_path, variable, bad, rule):
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMCAST_")}
    env[variable] = bad
    out = subprocess.run(
        [sys.executable, "-m", "streamcast.cli", "serve"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert out.returncode == 2, out.stderr[-2000:]
    named = [line for line in out.stderr.splitlines() if line.strip().startswith(f"{variable}:")]
    assert len(named) == 1 and rule in named[0], out.stderr
    assert "Traceback" not in out.stderr


# -- Redis unreachable at start, then there ----------------------------------------------------


@pytest.mark.slow
async def test_redis_unreachable_at_start_then_served_once_it_comes(tmp_path):
    port, http_port = free_port(), free_port()
    url = f"redis://127.0.0.1:{port}/0"
    daemon = spawn_daemon(url, "late", http_port, tmp_path, STREAMCAST_REDIS_TIMEOUT_S="1")

    async def tried_redis() -> bool:  # up (model loaded, consuming): it tried Redis, failed
        assert daemon.poll() is None, "the daemon exited without Redis"
        try:
            return scraped(http_port, "streamcast_redis_errors_total ", absent=0.0) >= 2
        except OSError:
            return False

    server = None
    try:
        await wait_for(tried_redis, timeout_s=90, interval_s=0.5)
        assert http_get(http_port, "/readyz")[0] == 503
        assert daemon.poll() is None
        server = start_redis_server(tmp_path, port=port)
        await wait_ready(http_port, daemon, timeout_s=60)
        client = make_redis(url)
        keys, names = Keys("late"), ["L0", "L1"]
        await keep_ticks(client, keys)
        await replay(client, keys, feed(2, 120), names, rate=None)
        await wait_total(client, keys, names, 2 * 71)
        await check_exactly_once(client, keys, names)
        await client.aclose()
    finally:
        daemon.terminate()
        assert daemon.wait(30) == 0
        if server is not None:
            server.process.terminate()
            server.process.wait(10)
    log = "\n".join(p.read_text() for p in tmp_path.glob("daemon-*.log"))
    assert "redis unavailable (ConnectionError); retrying in" in log
    assert "Traceback" not in log


# -- Redis restarts (append-only file on) mid-replay ---------------------------------------------


async def feed_through_outages(
    url: str, keys: Keys, paths: np.ndarray, names, rate: float
) -> tuple[list[str], int]:
    """XADD ticks at ``rate``, retrying each one until Redis takes it.

    Returns (the ids Redis acknowledged, retries). A retry after a lost reply may add a tick
    twice (Redis had written it): the feed is at-least-once, like any producer that retries.
    """
    # no retries inside the client: every one is the feed's own, and counted
    client = make_redis(url, timeout_s=1.0, retries=0)
    acknowledged: list[str] = []
    retries = 0
    try:
        for t in range(paths.shape[1]):
            for s, name in enumerate(names):
                while True:
                    try:
                        eid = await client.xadd(
                            keys.ticks_for(name), Tick.encode(name, float(paths[s, t]))
                        )
                        break
                    except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError):
                        retries += 1
                        await asyncio.sleep(0.2)
                acknowledged.append(eid.decode())
            await asyncio.sleep(len(names) / rate)
    finally:
        await client.aclose()
    return acknowledged, retries


# the consume loop's backoff (the ownership rounds retry each second, in their own lines)
RETRY_DELAY = re.compile(
    r"streamcast\.daemon\.loop: redis unavailable \(\w+\); retrying in ([0-9.]+) s"
)


def tail(log_path: Path, lines: int = 12) -> str:
    return "\n".join(log_path.read_text().splitlines()[-lines:])


def retry_delays(log_path: Path) -> list[float]:
    return [float(m.group(1)) for m in RETRY_DELAY.finditer(log_path.read_text())]


@pytest.mark.slow
async def test_redis_restart_with_aof_mid_replay_loses_nothing_it_kept(tmp_path):
    aof = ("--appendonly", "yes", "--appendfsync", "always")
    server = start_redis_server(tmp_path, *aof)
    port, url = server.port, server.url
    keys, names = Keys("aof", partitions=2), [f"A{i}" for i in range(6)]
    client = make_redis(url)
    await keep_ticks(client, keys)
    http_ports = [free_port(), free_port()]
    daemons = [
        spawn_daemon(
            url,
            "aof",
            http_ports[i],
            tmp_path,
            STREAMCAST_PARTITIONS="2",
            STREAMCAST_ASSIGNMENT="static",  # replica i of 2 owns partition i
            STREAMCAST_SHARD_INDEX=str(i),
            STREAMCAST_SHARD_COUNT="2",
            STREAMCAST_REDIS_TIMEOUT_S="1",
        )
        for i in range(2)
    ]
    logs: list[Path] = [d.log_path for d in daemons]  # type: ignore[attr-defined]
    try:
        for i, d in enumerate(daemons):
            await wait_ready(http_ports[i], d)
        producer = asyncio.create_task(feed_through_outages(url, keys, feed(6, 300), names, 300))
        await wait_total(client, keys, names, 100)  # forecasts are flowing: mid-replay
        assert not producer.done(), "the feed ended before the outage"
        server.process.send_signal(signal.SIGKILL)  # kill -9: only the append-only file remains
        server.process.wait(10)
        seen_down = [False, False]
        deadline = time.monotonic() + 30
        # the outage lasts until both replicas reported it and each retried three times
        while not all(seen_down) or min(len(retry_delays(log)) for log in logs) < 3:
            for i in range(2):
                with contextlib.suppress(OSError):
                    seen_down[i] |= http_get(http_ports[i], "/readyz")[0] == 503
            assert time.monotonic() < deadline, (seen_down, [tail(g) for g in logs])
            await asyncio.sleep(0.1)
        assert not producer.done(), "the feed ended during the outage"
        server = start_redis_server(tmp_path, *aof, port=port)
        for i, d in enumerate(daemons):
            await wait_ready(http_ports[i], d, timeout_s=60)
        acknowledged, retries = await producer
        kept = [eid.decode() for ticks in keys.all_ticks() for eid, _ in await client.xrange(ticks)]
        # appendfsync always: every tick Redis acknowledged survived; a tick retried after a
        # lost reply may be there twice, under an id the feed never saw
        assert set(acknowledged) <= set(kept), "acknowledged ticks lost"
        assert len(kept) - len(acknowledged) <= retries
        assert retries > 0, "the feed never saw the outage"
        await wait_total(client, keys, names, len(kept) - 6 * 49, timeout_s=120)
        await wait_settled(client, keys)
        await check_exactly_once(client, keys, names)
        assert all(d.poll() is None for d in daemons), "a replica exited"
    finally:
        await client.aclose()
        for d in daemons:
            d.terminate()
        for d in daemons:
            d.wait(30)
        server.process.terminate()
        server.process.wait(10)
    for log in logs:
        delays = retry_delays(log)
        # the client's backoff: each retry of one outage waits longer than the one before
        assert len(delays) >= 3 and delays[0] < delays[1] < delays[2], (log.name, delays)
        assert "Traceback" not in log.read_text()


# -- three replicas, one killed -9 mid-replay and restarted ------------------------------------


@pytest.mark.slow
async def test_three_replicas_one_killed_mid_sp500_replay_exactly_once(
    redis_server, redis_client, tmp_path, shared_data
):
    keys = Keys("three", partitions=3)
    await keep_ticks(redis_client, keys)
    series = load_series(shared_data / "sp500.csv")[:600]
    names = [f"SPX.{i}" for i in range(12)]
    paths = fan_out(series, len(names))
    ports = [free_port() for _ in range(3)]

    def start(i: int) -> subprocess.Popen:
        return spawn_daemon(
            redis_server.url,
            "three",
            ports[i],
            tmp_path,
            STREAMCAST_PARTITIONS="3",
            STREAMCAST_ASSIGNMENT="static",  # replica i of 3 owns partition i
            STREAMCAST_SHARD_INDEX=str(i),
            STREAMCAST_SHARD_COUNT="3",
        )

    daemons = [start(i) for i in range(3)]
    try:
        for i in range(3):
            await wait_ready(ports[i], daemons[i])
        producer = asyncio.create_task(replay(redis_client, keys, paths, names, rate=1200))
        await wait_total(redis_client, keys, names, 1500)
        daemons[1].send_signal(signal.SIGKILL)
        daemons[1].wait(10)
        total = 12 * (600 - 49)
        assert await total_forecasts(redis_client, keys, names) < total
        await producer
        daemons[1] = start(1)
        await wait_total(redis_client, keys, names, total, timeout_s=180)
        await wait_settled(redis_client, keys)
        await check_exactly_once(redis_client, keys, names)
    finally:
        for d in daemons:
            d.kill()
            d.wait(10)


# -- 10,000 malformed entries interleaved with valid ticks ----------------------------------------


def malformed(rng: np.random.Generator, n: int) -> list[tuple[dict, str]]:
    """Entries bad by construction, each with the dead-letter reason it must get."""
    kinds = [
        (lambda: {"price": "1.0"}, "missing_symbol"),
        (lambda: {"symbol": rng.choice(["a b", "x/y", "é", "s" * 65]), "price": "1"}, "bad_symbol"),
        (lambda: {"symbol": "Z"}, "missing_price"),
        (lambda: {"symbol": "Z", "price": rng.choice(["abc", "1,5", "0x1p", "--1"])}, "bad_price"),
        (lambda: {"symbol": "Z", "price": rng.choice(["nan", "inf", "-inf"])}, "non_finite_price"),
        (lambda: {"symbol": "Z", "price": rng.choice(["0", "-1.5"])}, "non_positive_price"),
        (lambda: {"symbol": "Z", "price": "1", "ts": rng.choice(["soon", "1.5e"])}, "bad_ts"),
        (lambda: {"symbol": "Z", "price": "9" * int(rng.integers(70, 300))}, "oversized"),
        (lambda: {"symbol": bytes(rng.integers(128, 256, 8).astype(np.uint8)), "price": "1"},
         "bad_encoding"),
    ]  # fmt: skip
    out = []
    for _ in range(n):
        make, reason = kinds[int(rng.integers(len(kinds)))]
        out.append((make(), reason))
    return out


def expected_letter(entry_id: str, reason: str, fields: dict) -> dict[bytes, bytes]:
    """The dead letter of a malformed entry: its reason, the decoder's detail, its id, and each
    original field (cut to 256 bytes, the full size noted)."""
    raw = {
        str(k).encode(): v if isinstance(v, bytes) else str(v).encode() for k, v in fields.items()
    }
    with pytest.raises(TickError) as refused:
        Tick.decode(entry_id, raw)
    assert refused.value.reason == reason  # the case is bad in the way it claims
    letter = {
        b"reason": reason.encode(),
        b"detail": refused.value.detail.encode(),
        b"tick_id": entry_id.encode(),
    }
    for name, value in raw.items():
        letter[b"field:" + name] = value[:256]
        if len(value) > 256:
            letter[b"size:" + name] = str(len(value)).encode()
    return letter


@pytest.mark.slow
async def test_ten_thousand_malformed_entries_interleaved_with_valid_ticks(
    redis_client, shipped_engine
):
    keys = Keys("fuzz")
    rng = np.random.default_rng(6)
    bad = malformed(rng, 10_000)
    prices = 100 * np.exp(np.cumsum(rng.normal(0, 0.01, (4, 300)), axis=1))
    valid_at = sorted(rng.choice(10_000 + 1200, size=1200, replace=False))
    valid_iter = ((f"V{k % 4}", float(prices[k % 4, k // 4])) for k in range(1200))
    expected_reasons = []
    pipe = redis_client.pipeline(transaction=False)
    v = 0
    b = 0
    valid_symbol_at: dict[int, str] = {}
    bad_at: list[int] = []
    for position in range(10_000 + 1200):
        if v < len(valid_at) and position == valid_at[v]:
            symbol, price = next(valid_iter)
            pipe.xadd(keys.ticks(0), Tick.encode(symbol, price))
            valid_symbol_at[position] = symbol
            v += 1
        else:
            fields, reason = bad[b]
            pipe.xadd(keys.ticks(0), fields)
            expected_reasons.append(reason)
            bad_at.append(position)
            b += 1
    ids = await pipe.execute()
    bad_entries = [(ids[p].decode(), bad[k][0], bad[k][1]) for k, p in enumerate(bad_at)]
    valid_ids: dict[str, list[str]] = {}
    for position, symbol in valid_symbol_at.items():
        valid_ids.setdefault(symbol, []).append(ids[position].decode())
    metrics = Metrics(CollectorRegistry())
    daemon = Daemon(
        redis_client, shipped_engine, metrics, keys=keys, config=DaemonConfig(batch_max_size=512)
    )
    async with daemon:
        deadline = time.monotonic() + 180
        while await redis_client.xlen(keys.dead(0)) < 10_000 or await total_forecasts(
            redis_client, keys, [f"V{i}" for i in range(4)]
        ) < 4 * (300 - 49):
            assert daemon._tasks[0].done() is False, "the consume loop ended"
            assert time.monotonic() < deadline
            await asyncio.sleep(0.2)
    letters = await redis_client.xrange(keys.dead(0), count=20_000)
    assert [f[b"reason"].decode() for _, f in letters] == expected_reasons
    # each letter: the entry's id, the decoder's detail for that entry, its original fields
    for (_, letter), (entry_id, fields, reason) in zip(letters, bad_entries, strict=True):
        assert letter == expected_letter(entry_id, reason, fields), (entry_id, letter)
    for symbol, expected in valid_ids.items():
        forecast = [e.decode() for e, _ in await redis_client.xrange(keys.forecasts(symbol))]
        assert forecast == expected[49:], f"{symbol}: lost or doubled forecasts"


# -- access: TLS and passwords --------------------------------------------------------------------


def make_certificates(directory: Path) -> None:
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out",
            "ca.crt", "-days", "2", "-subj", "/CN=streamcast-test-ca")  # fmt: skip
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out",
            "server.csr", "-subj", "/CN=127.0.0.1")  # fmt: skip
    (directory / "ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "server.crt", "-days", "2", "-extfile", "ext")  # fmt: skip


@pytest.mark.slow
async def test_tls_and_password_daemon_replay_and_watch_work_and_refuse_clearly(tmp_path):
    make_certificates(tmp_path)
    port = free_port()
    server = subprocess.Popen(
        ["redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
         "--tls-cert-file", "server.crt", "--tls-key-file", "server.key",
         "--tls-ca-cert-file", "ca.crt", "--tls-auth-clients", "no",
         "--requirepass", "tls-s3cret", "--save", "", "--dir", str(tmp_path)],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    ca = tmp_path / "ca.crt"
    url = f"rediss://:tls-s3cret@127.0.0.1:{port}/0?ssl_ca_certs={ca}"
    http_port = free_port()
    daemon = None
    try:
        client = make_redis(url)
        for _ in range(100):
            try:
                await client.ping()
                break
            except (redis_errors.ConnectionError, OSError):
                await asyncio.sleep(0.1)
        await client.aclose()
        daemon = spawn_daemon(url, "tls", http_port, tmp_path)
        await wait_ready(http_port, daemon)
        env = {**os.environ, "STREAMCAST_REDIS_URL": url, "STREAMCAST_KEY_PREFIX": "tls"}
        cli = [sys.executable, "-m", "streamcast.cli"]
        replayed = subprocess.run(
            [*cli, "replay", "--symbols", "2", "--points", "80", "--as-fast-as-possible"],
            env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path,
        )  # fmt: skip
        assert replayed.returncode == 0 and "replayed 160 ticks" in replayed.stdout, replayed.stderr
        watched = subprocess.run(
            [*cli, "watch", "SYN.0", "--from-start", "--limit", "3"],
            env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path,
        )  # fmt: skip
        assert watched.returncode == 0 and len(watched.stdout.splitlines()) == 3, watched.stderr
        metrics = http_get(http_port, "/metrics")[1]
        for wrong, needle in (
            (url.replace("tls-s3cret", "wrong-pw"), "refused the credentials"),
            (f"rediss://:tls-s3cret@127.0.0.1:{port}/0", "certificate verify failed"),
            (f"redis://:tls-s3cret@127.0.0.1:{port}/0", "cannot reach redis"),
        ):
            out = subprocess.run(
                [*cli, "replay", "--symbols", "1", "--points", "5"],
                env={**env, "STREAMCAST_REDIS_URL": wrong, "STREAMCAST_REDIS_TIMEOUT_S": "2"},
                capture_output=True, text=True, timeout=60, cwd=tmp_path,
            )  # fmt: skip
            assert out.returncode == 2 and needle in out.stderr, out.stderr
            assert "s3cret" not in out.stderr + out.stdout and "wrong-pw" not in out.stderr
            assert "Traceback" not in out.stderr
    finally:
        if daemon is not None:
            daemon.terminate()
            daemon.wait(30)
        server.terminate()
        server.wait(10)
    log = "\n".join(p.read_text() for p in tmp_path.glob("daemon-*.log"))
    assert "rediss://:***@127.0.0.1" in log
    assert "tls-s3cret" not in log and "tls-s3cret" not in metrics


def listening_addresses(port: int) -> set[str]:
    """The local addresses of the TCP sockets listening on ``port`` (IPv4 and IPv6)."""
    found = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        with contextlib.suppress(FileNotFoundError), open(table) as rows:
            next(rows)
            for row in rows:
                local, state = row.split()[1], row.split()[3]
                address, _, hex_port = local.partition(":")
                if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                    raw = bytes.fromhex(address)
                    # the kernel writes each 32-bit word in host (little-endian) order
                    words = b"".join(raw[i : i + 4][::-1] for i in range(0, width // 2, 4))
                    family = socket.AF_INET if width == 8 else socket.AF_INET6
                    found.add(socket.inet_ntop(family, words))
    return found


def other_ipv4_addresses() -> list[str]:
    """This machine's IPv4 addresses on interfaces other than loopback."""
    import fcntl
    import struct

    found = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        for _, name in socket.if_nameindex():
            if name == "lo":
                continue
            request = struct.pack("256s", name.encode()[:15])
            try:
                reply = fcntl.ioctl(probe.fileno(), 0x8915, request)  # SIOCGIFADDR
            except OSError:
                continue  # no IPv4 address on it
            found.append(socket.inet_ntoa(reply[20:24]))
    return found


def refused(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


@pytest.mark.slow
async def test_http_binds_only_the_configured_address(redis_server, tmp_path):
    # 127.0.0.2 reaches this machine (all of 127/8 is loopback on Linux): shown by a socket on
    # every address, which accepts it; a server on 127.0.0.1 alone must refuse it
    with socket.create_server(("0.0.0.0", 0)) as everywhere:
        assert not refused("127.0.0.2", everywhere.getsockname()[1])
    port = free_port()
    daemon = spawn_daemon(
        redis_server.url, "bind", port, tmp_path, STREAMCAST_HTTP_HOST="127.0.0.1"
    )
    try:
        deadline = time.monotonic() + 90
        while True:  # HTTP answers (it binds before the model is compiled)
            assert daemon.poll() is None, "serve exited"
            with contextlib.suppress(OSError):
                http_get(port, "/healthz")
                break
            assert time.monotonic() < deadline, "serve never answered on 127.0.0.1"
            await asyncio.sleep(0.2)
        assert listening_addresses(port) == {"127.0.0.1"}
        for other in ["127.0.0.2", *other_ipv4_addresses()]:
            assert refused(other, port), f"{other}:{port} accepted a connection"
    finally:
        daemon.kill()
        daemon.wait(30)
