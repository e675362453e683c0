"""The live page: ``/`` draws a chart per symbol, fed by server-sent events from the forecasts and
paths streams.

* ``GET /`` and ``GET /static/{app.js,style.css}``: the page, served from the package (no CDN).
* ``GET /api/symbols``: the first ``max_symbols`` symbols with history over every partition,
  sorted; past 10,000 names in all, the first of a sample of each partition's (so it changes from
  one request to the next: the work stays bounded).
* ``GET /events?symbols=A,B``: ``text/event-stream``. First the recent forecasts of each symbol
  (``forecast`` events, oldest first) and its newest path (a ``path`` event, after its tick's
  forecast), then each new forecast and path as it is published (read through
  :class:`streamcast.client.Client`, following the paths streams: one blocking XREAD on one
  server, a sweep of the symbols' partitions on a Redis Cluster). A ``path`` event is a paths
  stream entry (:class:`streamcast.client.PathForecast`): ``tick_id`` (and ``id``) the tick the
  path starts from, ``price`` that tick's, ``path`` and the ``path`` part of ``bands``, no
  ``next``; it is no new tick (app.js draws it from the tick with that id, on the chart already,
  and moves no price). Every ``skill_every_s`` a ``skill`` event with the replica's
  online skill by version and horizon and a ``status`` event with the header's numbers
  (``{"redis": true, ...}`` from the ``status`` callable: throughput, lag, p99 latency, model;
  ``{"redis": false}`` while Redis cannot be read).

The page draws a price scale and a time axis per chart, each symbol's 1-step skill over the
forecasts it shows, and the prediction intervals where the entries carry ``bands`` (shaded
around the 1-step forecasts and the newest path, the wider level lighter; app.js).
:class:`MetricsStatus` computes the header's numbers from a Prometheus registry, by the names the
daemon exports (README, "Metrics"): this module touches no daemon object, and serve passes it in.

Symbols in a request must match the wire contract's symbol pattern (anything else is a 400), so
nothing a browser sends reaches Redis but a validated stream key; at most ``max_clients`` event
streams are open at once (503 beyond). A stream ends within a poll (``poll_ms``) of its client
going away, so the cap counts connected pages only. An entry is sent as it is: a forecast without
``next`` (the daemon publishes none when the model's output is not finite) has no ``next``, a
non-finite number is sent as null (in ``bands`` too: the page draws no band with a null bound),
an older entry without ``bands`` is sent without, and an entry that does not parse is skipped
(the client logs it once).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry
from redis import exceptions as redis_errors
from redis.asyncio import Redis

from streamcast.client import Client, PathForecast
from streamcast.keys import Keys
from streamcast.wire import SYMBOL_RE, Forecast

log = logging.getLogger(__name__)

STATIC = {"app.js": "text/javascript", "style.css": "text/css"}


def _asset(name: str) -> bytes:
    return resources.files("streamcast").joinpath("web", name).read_bytes()


class LivePage:
    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        *,
        skill: Callable[[], dict[str, Any]] | None = None,
        status: Callable[[], dict[str, Any]] | None = None,
        max_symbols: int = 12,
        history: int = 200,
        max_clients: int = 20,
        skill_every_s: float = 2.0,
        poll_ms: int = 1000,
    ) -> None:
        self.client = Client(redis, keys)
        self.skill = skill
        self.status = status
        self.max_symbols = max_symbols
        self.history = history
        self.max_clients = max_clients
        self.skill_every_s = skill_every_s
        self.poll_ms = poll_ms
        self.clients = 0
        self.closing = asyncio.Event()

    def close(self) -> None:
        """End every open event stream (the server is stopping); browsers reconnect elsewhere."""
        self.closing.set()

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/", self._index)
        app.router.add_get("/static/{name}", self._static)
        app.router.add_get("/favicon.ico", self._no_icon)
        app.router.add_get("/api/symbols", self._symbols)
        app.router.add_get("/events", self._events)

    async def _index(self, request: web.Request) -> web.Response:
        return web.Response(body=_asset("index.html"), content_type="text/html", charset="utf-8")

    async def _no_icon(self, request: web.Request) -> web.Response:
        return web.Response(status=204)

    async def _static(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in STATIC:
            raise web.HTTPNotFound()
        return web.Response(body=_asset(name), content_type=STATIC[name], charset="utf-8")

    async def _symbols(self, request: web.Request) -> web.Response:
        try:
            names = await self.client.symbols(limit=self.max_symbols)
        except (redis_errors.RedisError, OSError):
            raise web.HTTPServiceUnavailable(text="redis unavailable") from None
        return web.json_response({"symbols": names})

    async def _events(self, request: web.Request) -> web.StreamResponse:
        raw = request.query.get("symbols", "")
        symbols = [s for s in raw.split(",") if s]
        if not symbols or len(symbols) > self.max_symbols:
            raise web.HTTPBadRequest(text=f"symbols: give 1 to {self.max_symbols}, comma-separated")
        bad = [s for s in symbols if not SYMBOL_RE.fullmatch(s)]
        if bad:
            raise web.HTTPBadRequest(text="symbols must be 1-64 of A-Z a-z 0-9 . _ : -")
        if self.closing.is_set():
            raise web.HTTPServiceUnavailable(text="stopping")
        if self.clients >= self.max_clients:
            raise web.HTTPServiceUnavailable(text="too many live pages open")
        self.clients += 1
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
            }
        )
        try:
            await response.prepare(request)
            await self._stream(request, response, symbols)
        except ConnectionResetError:
            pass  # the page went away while we wrote to it
        finally:
            self.clients -= 1
        return response

    async def _stream(
        self, request: web.Request, response: web.StreamResponse, symbols: list[str]
    ) -> None:
        subscription = self.client.subscribe(symbols, paths=True)
        try:
            recent = await subscription.recent(self.history)
        except (redis_errors.RedisError, OSError):
            await _send(response, "status", {"redis": False})
            return  # the page's EventSource reconnects by itself a few seconds later
        for forecast in recent:
            await _send_forecast(response, forecast)
        await self._send_summary(response)
        loop = asyncio.get_running_loop()
        next_summary = loop.time() + self.skill_every_s
        # aiohttp does not cancel a handler whose client left: look each poll, or an abandoned
        # stream would poll Redis (and hold a place under max_clients) forever
        while not self.closing.is_set() and _connected(request):
            try:
                forecasts = await subscription.read(self.poll_ms, count=200)
            except (redis_errors.RedisError, OSError):
                await _send(response, "status", {"redis": False})
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.closing.wait(), 1.0)
                continue
            for forecast in forecasts:
                await _send_forecast(response, forecast)
            if loop.time() >= next_summary:
                next_summary = loop.time() + self.skill_every_s
                await self._send_summary(response)

    async def _send_summary(self, response: web.StreamResponse) -> None:
        """The skill by version, then the header's numbers (Redis answered: it is up)."""
        if self.skill is not None:
            await _send(response, "skill", self.skill())
        if self.status is not None:
            await _send(response, "status", {"redis": True, **self.status()})


async def _send_forecast(response: web.StreamResponse, forecast: Forecast) -> None:
    # the entry's id is the tick's (the daemon publishes it so): for a path, its origin's
    kind = "path" if isinstance(forecast, PathForecast) else "forecast"
    await _send(response, kind, {**forecast.as_dict(), "id": forecast.tick.id})


def _connected(request: web.BaseRequest) -> bool:
    transport = request.transport
    return transport is not None and not transport.is_closing()


def _clean(value: Any) -> Any:
    """JSON has no NaN: send null instead."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


async def _send(response: web.StreamResponse, kind: str, data: Any) -> None:
    """One server-sent event; raises ConnectionResetError once the page has gone."""
    payload = json.dumps(_clean(data), separators=(",", ":"))
    await response.write(f"event: {kind}\ndata: {payload}\n\n".encode())


# -- the header's numbers, from the metrics the daemon exports -----------------------------------

FORECASTS = "streamcast_forecasts"  # counter, by kind: one "next" per forecast tick
LATENCY = "streamcast_tick_to_forecast_seconds"  # histogram
LAG = "streamcast_stream_lag"  # gauge: ticks not yet read by the shard's group
MODEL = "streamcast_model_info"  # gauge, 1 for the version serving


@dataclass(frozen=True)
class _Reading:
    forecasts: float
    latency: tuple[tuple[float, float], ...]  # (upper bound, cumulative count), ascending
    lag: float | None
    model: str | None


class MetricsStatus:
    """The live page header's numbers, read from a Prometheus registry at each call.

    ``throughput_per_s`` (forecasts published per second) and ``p99_latency_ms`` (tick to
    forecast, interpolated within the histogram's buckets as Prometheus's ``histogram_quantile``
    does) are over the last ``window_s`` (since the first reading, until that long has passed);
    ``lag`` is the ticks the shard's group has not read; ``model`` the version serving. A number
    with nothing to say yet (no forecast in the window, no model loaded) is None.
    """

    def __init__(
        self,
        prometheus: CollectorRegistry,
        *,
        window_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.prometheus = prometheus
        self.window_s = window_s
        self.clock = clock
        # bounded: each open page reads every couple of seconds
        self._readings: deque[tuple[float, _Reading]] = deque(maxlen=256)
        self._readings.append((clock(), self._read()))

    def __call__(self) -> dict[str, Any]:
        now, new = self.clock(), self._read()
        self._readings.append((now, new))
        # keep one reading at least window_s old: the window's start
        while len(self._readings) > 2 and now - self._readings[1][0] >= self.window_s:
            self._readings.popleft()
        then, old = self._readings[0]
        elapsed = now - then
        counts = [
            (bound, count - before)
            for (bound, count), (_, before) in zip(new.latency, old.latency, strict=False)
        ]
        p99 = bucket_quantile(0.99, counts) if len(new.latency) == len(old.latency) else None
        return {
            "throughput_per_s": (new.forecasts - old.forecasts) / elapsed if elapsed > 0 else None,
            "p99_latency_ms": None if p99 is None else p99 * 1000.0,
            "lag": new.lag,
            "model": new.model,
            "window_s": elapsed,
        }

    def _read(self) -> _Reading:
        forecasts, lag, model = 0.0, None, None
        latency: list[tuple[float, float]] = []
        for family in self.prometheus.collect():
            for s in family.samples:
                if s.name == FORECASTS + "_total" and s.labels.get("kind") == "next":
                    forecasts = s.value
                elif s.name == LATENCY + "_bucket":
                    latency.append((float(s.labels["le"]), s.value))
                elif s.name == LAG:
                    lag = s.value
                elif s.name == MODEL and s.value == 1:
                    model = s.labels.get("version")
        return _Reading(forecasts, tuple(sorted(latency)), lag, model)


def bucket_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """The ``q`` quantile of a histogram given as (upper bound, cumulative count), ascending and
    ending with +Inf; linear within a bucket, as Prometheus's ``histogram_quantile``. None
    without observations; the highest finite bound when the quantile lies beyond it."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for upper, count in buckets:
        if count >= rank:
            if math.isinf(upper):
                return lower
            if count == below:
                return upper
            return lower + (upper - lower) * (rank - below) / (count - below)
        lower, below = upper, count
    return lower
