"""The HTTP server under hostile clients: oversized requests, slow request heads, too many sockets."""

from __future__ import annotations

import asyncio
import logging
import time

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from streamcast.http import HttpServer
from streamcast.keys import Keys
from streamcast.live import LivePage

from .helpers import wait_for


def make_server(redis_client, **guards) -> HttpServer:
    """The daemon's HTTP server, live page included (on the test's redis-server)."""
    return HttpServer(
        CollectorRegistry(),
        host="127.0.0.1",
        port=0,
        ready=lambda: True,
        heartbeat=time.monotonic,
        page=LivePage(redis_client, Keys("http")),
        **guards,
    )


async def status_of(port: int, request: bytes) -> int:
    """Send one raw request; the status code of the answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        line = await asyncio.wait_for(reader.readline(), 5)
        return int(line.split()[1])
    finally:
        writer.close()
        await writer.wait_closed()


async def healthz(port: int) -> int:
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/healthz") as r:
        return r.status


OVERSIZED = [
    b"GET /healthz?q=" + b"x" * 100_000 + b" HTTP/1.1\r\nHost: t\r\n\r\n",  # a 100 kB URL
    b"GET /events?symbols=A HTTP/1.1\r\nHost: t\r\nX-Big: " + b"y" * 100_000 + b"\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: t\r\n" + b"X-H: v\r\n" * 1000 + b"\r\n",  # 1000 headers
]


async def test_oversized_requests_get_400_and_fold_into_one_short_warning_line(
    redis_client, caplog
):
    caplog.set_level(logging.DEBUG)
    async with make_server(redis_client) as server:
        statuses = [await status_of(server.port, OVERSIZED[i % 3]) for i in range(50)]
        assert await healthz(server.port) == 200
    assert statuses == [400] * 50
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert [r.getMessage() for r in caplog.records if r.exc_info or r.exc_text] == []
    lines = [r for r in caplog.records if r.name == "aiohttp.server"]
    assert len(lines) == 1, "50 bad requests in a second must not be 50 log lines"
    assert all(r.levelno == logging.WARNING and "\n" not in r.getMessage() for r in lines)
    assert all(len(r.getMessage()) < 120 for r in lines), lines[0].getMessage()
    assert "(400 LineTooLong)" in lines[0].getMessage()


async def test_slow_request_heads_are_closed_after_the_header_timeout(redis_client):
    async with make_server(redis_client, header_timeout_s=1.0) as server:
        loop = asyncio.get_running_loop()
        started = loop.time()
        sockets = []
        for i in range(200):
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            if i % 4:  # a head that never ends; one in four sends nothing at all
                writer.write(b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Slow: a")
            sockets.append((reader, writer))
        assert server.connections is not None
        await wait_for(lambda: server.connections.open == 200, timeout_s=5)
        assert await healthz(server.port) == 200  # the server still answers meanwhile
        try:
            # each read ends at EOF: the server closed the connection without an answer
            answers = await asyncio.wait_for(asyncio.gather(*(r.read() for r, _ in sockets)), 5)
            elapsed = loop.time() - started
        finally:
            for _, writer in sockets:
                writer.close()
        assert answers == [b""] * 200
        assert 0.9 <= elapsed < 5, elapsed
        assert server.connections.head_timeouts == 200
        await wait_for(lambda: server.connections.open == 0, timeout_s=5)
        assert await healthz(server.port) == 200


async def test_a_complete_head_is_not_cut_and_an_idle_connection_closes_at_keepalive(redis_client):
    async with make_server(redis_client, header_timeout_s=0.3, keepalive_timeout_s=1.5) as server:
        loop = asyncio.get_running_loop()
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        request = b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n"
        try:
            for i in range(2):  # the second request comes after the head deadline has passed
                writer.write(request)
                assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"HTTP/1.1 200")
                await asyncio.wait_for(reader.readuntil(b'{"status": "alive"}'), 5)
                idle_from = loop.time()
                if i == 0:
                    await asyncio.sleep(0.6)  # an observation window: twice the head deadline
            assert await asyncio.wait_for(reader.read(), 5) == b""  # then idle: closed
            assert 1.2 <= loop.time() - idle_from < 4
        finally:
            writer.close()
        assert server.connections is not None and server.connections.head_timeouts == 0


async def test_connections_beyond_the_cap_get_503_and_are_closed(redis_client):
    async with make_server(redis_client, max_connections=5) as server:
        assert server.connections is not None
        held = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(5)]
        try:
            await wait_for(lambda: server.connections.open == 5, timeout_s=5)
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            answer = await asyncio.wait_for(reader.read(), 5)
            writer.close()
            assert answer.startswith(b"HTTP/1.1 503 ")
            assert answer.endswith(b"too many connections open\n")
            assert server.connections.refused == 1
        finally:
            for _, w in held:
                w.close()
        await wait_for(lambda: server.connections.open == 0, timeout_s=5)
        assert await healthz(server.port) == 200


@pytest.mark.parametrize(
    "guards", [{"header_timeout_s": 0}, {"keepalive_timeout_s": -1}, {"max_connections": 0}]
)
def test_guards_must_be_positive(guards):
    with pytest.raises(ValueError):
        HttpServer(
            CollectorRegistry(),
            host="127.0.0.1",
            port=0,
            ready=lambda: True,
            heartbeat=time.monotonic,
            **guards,
        )


async def test_readyz_asks_redis_once_however_many_ask_at_once(redis_client):
    """200 /readyz at once (a probe storm, or anyone): one PING in flight, not one each (each
    would take a connection from the daemon's pool, which has no cap, and keep it)."""
    calls = in_flight = most = 0

    async def ping() -> bool:
        nonlocal calls, in_flight, most
        calls += 1
        in_flight += 1
        most = max(most, in_flight)
        await asyncio.sleep(0.3)
        in_flight -= 1
        return True

    server = make_server(redis_client, redis_ping=ping)
    async with server, aiohttp.ClientSession() as http:

        async def readyz() -> int:
            async with http.get(f"http://127.0.0.1:{server.port}/readyz") as r:
                assert (await r.json())["checks"]["redis"] is True
                return r.status

        statuses = await asyncio.gather(*(readyz() for _ in range(200)))
    assert statuses == [200] * 200
    assert most == 1, f"{most} PINGs in flight at once"
    assert calls <= 20, f"{calls} PINGs for 200 requests"
