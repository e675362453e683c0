"""HTTP endpoints: /healthz (alive), /readyz (model, Redis, loop), /metrics (Prometheus), and
the live page (``/``, streamcast.live) when one is given."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = logging.getLogger(__name__)


class HttpServer:
    """Serves the daemon's health and metrics; ``ready`` and ``heartbeat`` come from the daemon."""

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        host: str,
        port: int,
        ready: Callable[[], bool],
        heartbeat: Callable[[], float],
        redis_ping: Callable[[], object] | None = None,
        stale_after_s: float = 5.0,
        page: Any = None,
    ) -> None:
        self.registry = registry
        self.host = host
        self.port = port
        self._ready = ready
        self._heartbeat = heartbeat
        self._redis_ping = redis_ping
        self._stale_after_s = stale_after_s
        self._page = page
        self._runner: web.AppRunner | None = None

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
        self._runner = web.AppRunner(self.app(), access_log=None, shutdown_timeout=5.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        sockets = getattr(site._server, "sockets", None) or []
        if sockets:
            self.port = sockets[0].getsockname()[1]
        log.info(
            "http on http://%s:%d (%s/healthz /readyz /metrics)",
            self.host,
            self.port,
            "/ (live page) " if self._page is not None else "",
        )

    async def stop(self) -> None:
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
            "redis": False,
        }
        if self._redis_ping is not None:
            with contextlib.suppress(Exception):
                result = self._redis_ping()
                if asyncio.iscoroutine(result):
                    result = await asyncio.wait_for(result, 1.0)
                checks["redis"] = bool(result)
        ok = all(checks.values())
        return web.json_response({"ready": ok, "checks": checks}, status=200 if ok else 503)

    async def _metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
