"""HTTP endpoints: /healthz (alive), /readyz (model, Redis, loop), /metrics (Prometheus), and
the live page (``/``, streamcast.live) when one is given.

The listening socket is guarded against clients that hold connections without asking anything: a
connection's first request head must arrive within ``header_timeout_s``, an idle kept-alive one
closes after ``keepalive_timeout_s`` (aiohttp's own timer, which also bounds any later head), and
beyond ``max_connections`` open at once a new connection gets a bare 503 and is closed. A malformed
request (an oversized line or header) is answered 400 by aiohttp and logged as one line, not a
traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.http import HttpProcessingError
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from streamcast.logs import RateLimitedLog
from streamcast.tasks import within

log = logging.getLogger(__name__)

_OVERLOADED = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"Content-Type: text/plain\r\nContent-Length: 26\r\nConnection: close\r\n\r\n"
    b"too many connections open\n"
)


class HttpServer:
    """Serves the daemon's health and metrics; ``ready`` and ``heartbeat`` come from the daemon.

    Args:
        header_timeout_s: a new connection is closed unless its first request head (request line
            and headers) is complete within this time.
        keepalive_timeout_s: an idle connection (no request in progress) is closed after this
            long; it also bounds how long a second or later request head may take to arrive.
        max_connections: connections open at once; one more is answered 503 and closed.
    """

    def __init__(
        self,
        prometheus: CollectorRegistry,
        *,
        host: str,
        port: int,
        ready: Callable[[], bool],
        heartbeat: Callable[[], float],
        redis_ping: Callable[[], object] | None = None,
        stale_after_s: float = 5.0,
        page: Any = None,
        header_timeout_s: float = 10.0,
        keepalive_timeout_s: float = 75.0,
        max_connections: int = 1000,
    ) -> None:
        if header_timeout_s <= 0 or keepalive_timeout_s <= 0:
            raise ValueError("header_timeout_s and keepalive_timeout_s must be > 0")
        if max_connections < 1:
            raise ValueError("max_connections must be >= 1")
        self.prometheus = prometheus
        self.host = host
        self.port = port
        self._ready = ready
        self._heartbeat = heartbeat
        self._redis_ping = redis_ping
        self._ping: asyncio.Future[bool] | None = None  # the one PING in flight, shared
        self._stale_after_s = stale_after_s
        self._page = page
        self.header_timeout_s = header_timeout_s
        self.keepalive_timeout_s = keepalive_timeout_s
        self.max_connections = max_connections
        self._runner: web.AppRunner | None = None
        self.connections: _Connections | None = None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        if self._page is not None:
            self._page.add_routes(app)
        return app

    async def start(self) -> None:
        if self._runner is not None:
            return
        # a stopping server waits this long for open requests (the live page's event streams
        # end within a second of close())
        runner = web.AppRunner(
            self.app(),
            access_log=None,
            shutdown_timeout=5.0,
            keepalive_timeout=self.keepalive_timeout_s,
            logger=_ServerLog(logging.getLogger("aiohttp.server")),
        )
        await runner.setup()
        assert runner.server is not None
        self.connections = _Connections(
            runner.server,
            header_timeout_s=self.header_timeout_s,
            max_connections=self.max_connections,
        )
        site = _GuardedSite(runner, self.host, self.port, self.connections)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = site.port
        log.info(
            "http on http://%s:%d (%s/healthz /readyz /metrics)",
            self.host,
            self.port,
            "/ (live page) " if self._page is not None else "",
        )

    async def stop(self) -> None:
        if self._ping is not None:
            self._ping.cancel()
        if self._page is not None:
            self._page.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> HttpServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def _readyz(self, request: web.Request) -> web.Response:
        checks = {
            "serving": self._ready(),
            "loop": time.monotonic() - self._heartbeat() < self._stale_after_s,
            "redis": await self._redis_ok(),
        }
        ok = all(checks.values())
        return web.json_response({"ready": ok, "checks": checks}, status=200 if ok else 503)

    async def _redis_ok(self) -> bool:
        """Whether Redis answers a PING within 1 s. Requests that come while one is in flight
        share it: however many ask at once, one PING (one connection of the daemon's pool)."""
        if self._redis_ping is None:
            return False
        if self._ping is None or self._ping.done():
            self._ping = asyncio.ensure_future(self._ping_once())
        try:  # shielded: a client that goes away cancels its wait, not the others' PING
            return await asyncio.shield(self._ping)
        except asyncio.CancelledError:
            raise
        except Exception:
            return False

    async def _ping_once(self) -> bool:
        assert self._redis_ping is not None
        with contextlib.suppress(Exception):
            result = self._redis_ping()
            if asyncio.iscoroutine(result):
                result = await within(result, 1.0)  # None: no reply in time
            return bool(result)
        return False

    async def _metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.prometheus)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


class _ServerLog(logging.LoggerAdapter[logging.Logger]):
    """aiohttp's server log, where a client's malformed request is one line, not a traceback.

    aiohttp answers a request it cannot parse (a 100 kB URL, a huge header) with a 400 and logs
    the parser's exception at ERROR with its traceback: anyone could flood the log that way.
    """

    _say = RateLimitedLog(logging.getLogger("aiohttp.server"))

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info")
        if isinstance(exc, HttpProcessingError) and 400 <= exc.code < 500:
            # at most one line every 10 s, with how many more there were
            self._say(
                min(level, logging.WARNING),
                "bad-request",
                f"{msg} ({exc.code} {type(exc).__name__})",
                *args,
            )
            return
        super().log(level, msg, *args, **kwargs)


class _Connections:
    """The listening socket's protocol factory: aiohttp's handler for each connection, behind a
    deadline for the first request head and a cap on open connections."""

    def __init__(self, server: web.Server, *, header_timeout_s: float, max_connections: int):
        self.server = server
        self.header_timeout_s = header_timeout_s
        self.max_connections = max_connections
        self.open = 0
        self.refused = 0
        self.head_timeouts = 0
        self._full = False

    def __call__(self) -> asyncio.Protocol:
        if self.open >= self.max_connections:
            self.refused += 1
            if not self._full:  # once per episode: each refusal is not worth a line
                self._full = True
                log.warning(
                    "http: %d connections open, answering 503 until some close",
                    self.max_connections,
                )
            return _Refused()
        return _Connection(self, self.server())

    def opened(self) -> None:
        self.open += 1

    def closed(self) -> None:
        self.open -= 1
        if self.open < self.max_connections:
            self._full = False


class _Refused(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(_OVERLOADED)
        transport.close()


class _Connection(asyncio.Protocol):
    """One connection: forwards everything to aiohttp's handler, and closes the connection if the
    first request head (up to its blank line) has not arrived within the deadline."""

    def __init__(self, connections: _Connections, handler: asyncio.Protocol) -> None:
        self._connections = connections
        self._handler = handler
        self._transport: asyncio.BaseTransport | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self._tail = b""  # the last bytes seen, for a blank line split across reads

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        self._connections.opened()
        self._deadline = asyncio.get_running_loop().call_later(
            self._connections.header_timeout_s, self._head_too_slow
        )
        self._handler.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._deadline is not None:
            seen = self._tail + data
            if not self._tail:  # blank lines before a request line are allowed, and no head
                seen = seen.lstrip(b"\r\n")
            # later heads on this connection are bounded by aiohttp's keep-alive timer
            if b"\r\n\r\n" in seen or b"\n\n" in seen:
                self._deadline.cancel()
                self._deadline = None
                self._tail = b""
            else:
                self._tail = seen[-3:]
        self._handler.data_received(data)

    def eof_received(self) -> bool | None:
        return self._handler.eof_received()

    def pause_writing(self) -> None:
        self._handler.pause_writing()

    def resume_writing(self) -> None:
        self._handler.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self._connections.closed()
        self._handler.connection_lost(exc)

    def _head_too_slow(self) -> None:
        self._deadline = None
        self._connections.head_timeouts += 1
        log.debug("http: no request head within %.1fs, closing", self._connections.header_timeout_s)
        if self._transport is not None:
            self._transport.close()


class _GuardedSite(web.BaseSite):
    """aiohttp's TCPSite, listening with the guarded protocol factory instead of the bare one."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int, factory: _Connections) -> None:
        super().__init__(runner, backlog=128)
        self._host = host
        self._port = port
        self._factory = factory
        self._bound_port: int | None = None

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self.port}"

    @property
    def port(self) -> int:
        """The port bound (the one asked for until started)."""
        return self._bound_port or self._port

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            self._factory, self._host, self._port, backlog=self._backlog
        )
        self._server = server
        self._bound_port = int(server.sockets[0].getsockname()[1]) if server.sockets else None
