"""The live page: its endpoints in-process, then the page itself in headless Chromium."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from streamcast.demo import free_port
from streamcast.http import HttpServer
from streamcast.keys import Keys
from streamcast.live import LivePage
from streamcast.replay import replay, synthetic_feed
from streamcast.schema import Tick, encode_forecast

from .test_service import spawn_daemon, wait_ready

SCREENSHOT_ENV = "STREAMCAST_LIVE_SCREENSHOT"  # also save the screenshot here (the README's)


async def put_forecast(redis, keys: Keys, symbol: str, price: float, path=None) -> str:
    tick_id = (await redis.xadd(keys.ticks, {"symbol": symbol, "price": repr(price)})).decode()
    fields = encode_forecast(Tick(tick_id, symbol, price, None), price * 1.01, path, "v1", 0)
    await redis.xadd(keys.forecasts(symbol), fields, id=tick_id)
    await redis.sadd(keys.symbols, symbol)
    return tick_id


@pytest.fixture
async def page_server(redis_client):
    keys = Keys("live")
    page = LivePage(redis_client, keys, skill=lambda: {"v1": {1: {"skill": 0.5, "n": 3}}})
    server = HttpServer(
        CollectorRegistry(),
        host="127.0.0.1",
        port=0,
        ready=lambda: True,
        heartbeat=time.monotonic,
        page=page,
    )
    async with server:
        yield f"http://127.0.0.1:{server.port}", keys


async def test_page_and_assets_are_served_by_the_daemon_with_nothing_external(page_server):
    base, _ = page_server
    async with aiohttp.ClientSession() as http:
        async with http.get(base + "/") as r:
            html = await r.text()
            assert r.status == 200 and r.content_type == "text/html"
        for src in re.findall(r'(?:src|href)="([^"]+)"', html):
            assert src.startswith("/static/"), f"loads {src} from elsewhere"
            async with http.get(base + src) as r:
                assert r.status == 200
                assert "http://" not in await r.text() and "https://" not in await r.text()
        async with http.get(base + "/static/../settings.py") as r:
            assert r.status == 404


async def test_events_stream_recent_and_new_forecasts_then_skill(page_server, redis_client):
    base, keys = page_server
    first = await put_forecast(redis_client, keys, "L0", 100.0, path=[101.0, 102.0])
    async with aiohttp.ClientSession() as http:
        async with http.get(base + "/api/symbols") as r:
            assert (await r.json()) == {"symbols": ["L0"]}
        async with http.get(base + "/events?symbols=L0") as r:
            assert r.status == 200 and r.headers["Content-Type"] == "text/event-stream"
            events = []

            async def read_events(n: int) -> None:
                kind = None
                async for raw in r.content:
                    line = raw.decode().rstrip("\n")
                    if line.startswith("event: "):
                        kind = line[7:]
                    elif line.startswith("data: "):
                        events.append((kind, json.loads(line[6:])))
                        if len(events) >= n:
                            return

            await asyncio.wait_for(read_events(2), 10)
            second = await put_forecast(redis_client, keys, "L0", 101.0)
            await asyncio.wait_for(read_events(3), 10)
    assert events[0][0] == "forecast" and events[0][1]["id"] == first
    assert events[0][1]["path"] == [101.0, 102.0] and events[0][1]["next"] == pytest.approx(101.0)
    assert events[1] == ("skill", {"v1": {"1": {"skill": 0.5, "n": 3}}})
    assert events[2][0] == "forecast" and events[2][1]["id"] == second


@pytest.mark.parametrize(
    "query", ["symbols=bad%20symbol", "symbols=", "symbols=" + ",".join(f"S{i}" for i in range(13))]
)
async def test_events_refuse_bad_symbols_before_touching_redis(page_server, query):
    base, _ = page_server
    async with aiohttp.ClientSession() as http, http.get(base + "/events?" + query) as r:
        assert r.status == 400


# -- the page in a real browser ------------------------------------------------------------------


class DevTools:
    """Just enough of the Chrome DevTools Protocol: commands, and the events we care about."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.next_id = 0
        self.errors: list[str] = []
        self.replies: dict[int, dict] = {}
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for message in self.ws:
            data = json.loads(message.data)
            if "id" in data:
                self.replies[data["id"]] = data
            method, params = data.get("method"), data.get("params", {})
            if method == "Runtime.exceptionThrown":
                self.errors.append(json.dumps(params["exceptionDetails"])[:500])
            elif method == "Runtime.consoleAPICalled" and params.get("type") == "error":
                self.errors.append(json.dumps(params.get("args"))[:500])
            elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
                self.errors.append(params["entry"].get("text", "")[:500])

    async def call(self, method: str, **params) -> dict:
        self.next_id += 1
        ident = self.next_id
        await self.ws.send_json({"id": ident, "method": method, "params": params})
        for _ in range(300):
            if ident in self.replies:
                reply = self.replies.pop(ident)
                assert "error" not in reply, reply
                return reply["result"]
            await asyncio.sleep(0.05)
        raise AssertionError(f"no reply to {method}")

    async def value(self, expression: str):
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")


@pytest.mark.slow
async def test_the_live_page_in_headless_chromium(redis_server, redis_client, tmp_path):
    browser = shutil.which("chromium")
    if browser is None:
        pytest.fail("chromium is not installed (apt-get install -y chromium; .ci/run does it)")
    keys = Keys("page")
    http_port, debug_port = free_port(), free_port()
    daemon = spawn_daemon(redis_server.url, "page", http_port, tmp_path)
    chrome = None
    producer = None
    try:
        await wait_ready(http_port, daemon)
        names = ["SYN.0", "SYN.1", "SYN.2"]
        prices = synthetic_feed(3, 2000, seed=1)  # the demo's feed
        await replay(redis_client, keys, prices[:, :150], names, rate=None)  # windows fill
        producer = asyncio.create_task(
            replay(redis_client, keys, prices[:, 150:], names, rate=30, chunk=3)
        )
        chrome = subprocess.Popen(
            [
                browser,
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={tmp_path / 'chrome'}",
                f"--remote-debugging-port={debug_port}",
                "--window-size=1280,900",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        async with aiohttp.ClientSession() as http:
            deadline = time.monotonic() + 30
            while True:
                try:
                    async with http.get(f"http://127.0.0.1:{debug_port}/json/list") as r:
                        targets = [t for t in await r.json() if t["type"] == "page"]
                    if targets:
                        break
                except aiohttp.ClientError:
                    pass
                assert time.monotonic() < deadline, "chromium did not start"
                await asyncio.sleep(0.2)
            async with http.ws_connect(targets[0]["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                tools = DevTools(ws)
                for domain in ("Runtime", "Log", "Page"):
                    await tools.call(f"{domain}.enable")
                await tools.call("Page.navigate", url=f"http://127.0.0.1:{http_port}/")
                deadline = time.monotonic() + 60
                while not (
                    await tools.value("window.streamcast && window.streamcast.forecasts") or 0
                ):
                    assert time.monotonic() < deadline, "the page received no forecast"
                    await asyncio.sleep(0.5)
                first = await tools.value("window.streamcast.forecasts")
                deadline = time.monotonic() + 30
                while await tools.value("window.streamcast.forecasts") <= first + 10:
                    assert time.monotonic() < deadline, "the page stopped receiving updates"
                    await asyncio.sleep(0.5)
                while await tools.value("window.streamcast.skill") is None:
                    assert time.monotonic() < deadline, "no skill event reached the page"
                    await asyncio.sleep(0.5)
                await asyncio.sleep(3)  # a few more updates drawn, then the picture
                charts = await tools.value("document.querySelectorAll('canvas').length")
                status = await tools.value("document.getElementById('status').textContent")
                shot = await tools.call("Page.captureScreenshot", format="png")
                tools.reader.cancel()
        png = base64.b64decode(shot["data"])
        (tmp_path / "live.png").write_bytes(png)
        if os.environ.get(SCREENSHOT_ENV):
            Path(os.environ[SCREENSHOT_ENV]).write_bytes(png)
        assert png.startswith(b"\x89PNG") and len(png) > 10_000
        assert charts == 3 and status == "live"
        assert tools.errors == [], tools.errors
    finally:
        if producer is not None:
            producer.cancel()
        if chrome is not None:
            chrome.terminate()
            chrome.wait(15)
        daemon.terminate()
        daemon.wait(30)
