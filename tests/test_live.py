"""The live page: its endpoints in-process, then the page itself in headless Chromium."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import re
import shutil
import subprocess
import time
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path

import aiohttp
import pytest
from prometheus_client import CollectorRegistry
from redis import exceptions as redis_errors

from streamcast.connect import make_redis
from streamcast.demo import free_port
from streamcast.http import HttpServer
from streamcast.keys import Keys
from streamcast.live import LivePage, MetricsStatus, bucket_quantile
from streamcast.metrics import Metrics
from streamcast.replay import replay, synthetic_feed
from streamcast.wire import Forecast, Tick

from .helpers import http_get, spawn_daemon, start_redis_cluster, wait_for, wait_ready

SCREENSHOT_ENV = "STREAMCAST_LIVE_SCREENSHOT"  # also save the screenshot here (the README's)
# what the page_server's status callable says: the header's numbers
STATUS = {"throughput_per_s": 12.5, "p99_latency_ms": 48.0, "lag": 3.0, "model": "v1"}


async def put_forecast(redis, keys: Keys, symbol: str, price: float, bands=None) -> str:
    """A tick and its forecast, as the daemon publishes them; the forecast's id."""
    tick = {"symbol": symbol, "price": repr(price)}
    tick_id = (await redis.xadd(keys.ticks_for(symbol), tick)).decode()
    forecast = Forecast.of(Tick(tick_id, symbol, price, None), "v1", price * 1.01, bands=bands)
    fields = forecast.encode(0)
    await redis.xadd(keys.forecasts(symbol), fields, id=tick_id)
    await redis.sadd(keys.symbols(keys.partition(symbol)), symbol)
    return tick_id


async def put_path(
    redis, keys: Keys, symbol: str, tick_id: str, price: float, path, bands=None
) -> None:
    """A path as the daemon publishes it, apart from (after) its tick's forecast: to the paths
    stream, its entry id the tick's it starts from."""
    entry = Forecast.path_of(Tick(tick_id, symbol, price, None), "v1", path, bands)
    await redis.xadd(keys.paths(symbol), entry.encode(5), id=tick_id)


@pytest.fixture
async def page_server(redis_client):
    keys = Keys("live", partitions=4)
    page = LivePage(
        redis_client,
        keys,
        skill=lambda: {"v1": {1: {"skill": 0.5, "n": 3}}},
        status=lambda: dict(STATUS),
    )
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
    # raw, as a hostile client sends it: an HTTP client would normalise the `..` away first
    port = int(base.rsplit(":", 1)[1])
    for target in ("/static/../settings.py", "/static/..%2Fsettings.py", "/static/../../cli.py"):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"GET {target} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode())
        response = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        await writer.wait_closed()
        assert response.startswith(b"HTTP/1.1 404 "), (target, response[:200])
        assert b"import" not in response  # no source file's text


# the prediction intervals of a forecast at 100.0 (next 101.0) and of a 2-step path from it, as
# the daemon publishes them (streamcast.intervals.wire): the forecast entry's and the path entry's
NEXT_BANDS = {"80": {"next": [100.5, 101.5]}, "95": {"next": [100.0, 102.0]}}
PATH_BANDS = {
    "80": {"path": [[100.5, 101.5], [100.75, 103.25]]},
    "95": {"path": [[100.0, 102.0], [100.0, 104.0]]},
}


async def test_events_stream_recent_and_new_forecasts_then_skill_and_status(
    page_server, redis_client
):
    base, keys = page_server
    old = await put_forecast(redis_client, keys, "L0", 99.0)
    await put_path(redis_client, keys, "L0", old, 99.0, [98.0, 97.0])  # older: not sent
    first = await put_forecast(redis_client, keys, "L0", 100.0, bands=NEXT_BANDS)
    await put_path(redis_client, keys, "L0", first, 100.0, [101.0, 102.0], PATH_BANDS)
    await put_forecast(redis_client, keys, "K9", 50.0)
    assert keys.partition("L0") != keys.partition("K9")
    async with aiohttp.ClientSession() as http:
        async with http.get(base + "/api/symbols") as r:  # from every partition's set
            assert (await r.json()) == {"symbols": ["K9", "L0"]}
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

            await asyncio.wait_for(read_events(5), 10)
            second = await put_forecast(redis_client, keys, "L0", 101.0)
            await put_path(redis_client, keys, "L0", second, 101.0, [100.0, 99.5, 99.0])
            await asyncio.wait_for(read_events(7), 10)
    # the recent forecasts, then the newest path (after its tick's forecast)
    assert [(kind, data["id"]) for kind, data in events[:3]] == [
        ("forecast", old), ("forecast", first), ("path", first)]  # fmt: skip
    assert events[1][1]["next"] == pytest.approx(101.0) and "path" not in events[1][1]
    assert events[1][1]["bands"] == NEXT_BANDS  # the intervals reach the page as published
    # a path: from its tick (id, tick_id, price), no next, its bands as published
    assert events[2][1] == {"id": first, "tick_id": first, "symbol": "L0", "price": 100.0,
                            "model": "v1", "ts": 5, "path": [101.0, 102.0], "bands": PATH_BANDS}  # fmt: skip
    assert events[3] == ("skill", {"v1": {"1": {"skill": 0.5, "n": 3}}})
    assert events[4] == ("status", {"redis": True, **STATUS})
    assert events[5][0] == "forecast" and events[5][1]["id"] == second
    assert "bands" not in events[5][1]  # a forecast without intervals: no field, not null
    assert events[6] == ("path", {"id": second, "tick_id": second, "symbol": "L0", "price": 101.0,
                                  "model": "v1", "ts": 5, "path": [100.0, 99.5, 99.0]})  # fmt: skip


async def test_events_and_symbols_on_a_redis_cluster_over_several_partitions(tmp_path):
    """Symbols in other partitions are other slots: the page reads them without a cross-slot
    command (no error event, every symbol's forecasts, old and new)."""
    cluster = start_redis_cluster(tmp_path)
    redis = make_redis(cluster.url)
    keys = Keys("clive", partitions=6)
    names = ["L0", "K9", "M5", "C2"]
    assert len({keys.partition(n) for n in names}) >= 3
    page = LivePage(redis, keys, status=lambda: dict(STATUS))
    server = HttpServer(
        CollectorRegistry(), host="127.0.0.1", port=0, ready=lambda: True,
        heartbeat=time.monotonic, page=page,
    )  # fmt: skip
    try:
        old = {n: await put_forecast(redis, keys, n, 10.0 + i) for i, n in enumerate(names)}
        events: list = []
        async with server, aiohttp.ClientSession() as http:
            base = f"http://127.0.0.1:{server.port}"
            async with http.get(base + "/api/symbols") as r:
                assert (await r.json()) == {"symbols": sorted(names)}
            async with http.get(base + "/events?symbols=" + ",".join(names)) as r:
                await asyncio.wait_for(read_sse(r, events, lambda e: e[-1][0] == "status"), 10)
                new = {n: await put_forecast(redis, keys, n, 20.0 + i) for i, n in enumerate(names)}
                for i, n in enumerate(names):  # each from its newest tick
                    await put_path(redis, keys, n, new[n], 20.0 + i, [21.0 + i])

                def all_new(e: list) -> bool:
                    # by symbol and id: two partitions' streams can give two ticks one id
                    wanted = set(new.items())
                    seen = [
                        {(d.get("symbol"), d.get("id")) for k, d in e if k == kind}
                        for kind in ("forecast", "path")
                    ]
                    return all(got >= wanted for got in seen)

                await asyncio.wait_for(read_sse(r, events, all_new), 10)
    finally:
        await redis.aclose()
        cluster.stop()
    forecasts = [(d["symbol"], d["id"], d["price"]) for k, d in events if k == "forecast"]
    assert forecasts[:4] == [(n, old[n], 10.0 + i) for i, n in enumerate(names)]
    assert sorted(forecasts[4:]) == sorted((n, new[n], 20.0 + i) for i, n in enumerate(names))
    paths = [(d["symbol"], d["id"], d["path"]) for k, d in events if k == "path"]
    assert sorted(paths) == sorted((n, new[n], [21.0 + i]) for i, n in enumerate(names))
    assert ("status", {"redis": True, **STATUS}) in events
    assert all(d.get("redis") is not False for k, d in events if k == "status")


async def read_sse(response: aiohttp.ClientResponse, events: list, until) -> None:
    """Append (kind, data) for each event read until ``until(events)``; data's raw JSON too."""
    kind = None
    async for raw in response.content:
        line = raw.decode().rstrip("\n")
        if line.startswith("event: "):
            kind = line[7:]
        elif line.startswith("data: "):
            assert "NaN" not in line and "Infinity" not in line, line  # JSON a browser parses
            events.append((kind, json.loads(line[6:])))
            if until(events):
                return


async def xread_calls(redis) -> int:
    return int((await redis.info("commandstats")).get("cmdstat_xread", {}).get("calls", 0))


async def test_dropped_event_streams_end_free_their_place_and_stop_polling(redis_client):
    page = LivePage(redis_client, Keys("drop"), max_clients=20)
    server = HttpServer(
        CollectorRegistry(), host="127.0.0.1", port=0, ready=lambda: True,
        heartbeat=time.monotonic, page=page,
    )  # fmt: skip
    request = b"GET /events?symbols=D0 HTTP/1.1\r\nHost: t\r\n\r\n"
    async with server:
        statuses = []
        for _ in range(100):  # a page opened and closed (a tab, curl -m 1), a hundred times
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(request)
            statuses.append(int((await asyncio.wait_for(reader.readline(), 5)).split()[1]))
            writer.close()
            await writer.wait_closed()
        assert set(statuses) <= {200, 503} and statuses[:20] == [200] * 20
        # each stream ends within a poll (1 s)
        await wait_for(lambda: page.clients == 0, timeout_s=5)
        polls = await xread_calls(redis_client)
        await asyncio.sleep(2.2)  # an observation window: two polls of any stream left behind
        assert await xread_calls(redis_client) == polls
        url = f"http://127.0.0.1:{server.port}/events?symbols=D0"
        async with aiohttp.ClientSession() as http, http.get(url) as r:
            assert r.status == 200 and page.clients == 1
        await wait_for(lambda: page.clients == 0, timeout_s=5)


async def test_events_carry_forecasts_without_next_or_non_finite_and_skip_unparsable(
    page_server, redis_client, caplog
):
    base, keys = page_server
    stream = keys.forecasts("N0")
    tick = Tick("1-1", "N0", 100.0, None)
    await redis_client.sadd(keys.symbols(keys.partition("N0")), "N0")
    # what the daemon publishes when the model's output is not finite: no next, a reason
    no_next = Forecast(tick, "v1", reason="model output not finite").encode(0)
    await redis_client.xadd(stream, no_next, id="1-1")
    base_fields = {"symbol": "N0", "price": "100.0", "model": "v1", "ts": "0"}

    async def put(entry_id: str, **fields: str) -> None:
        # as the daemon publishes: the entry's id is its tick's id
        entry = {**base_fields, "tick_id": entry_id, **fields}
        await redis_client.xadd(stream, entry, id=entry_id)

    await put("2-1", next="nan", path="[NaN, 101.5, Infinity]",
              bands='{"80": {"next": [NaN, 101.0], "path": [[1.0, Infinity]]}}')  # fmt: skip
    await put("3-1", next="not a number")
    await put("4-1", next="104.0")
    # a hand-written path entry with non-finite numbers (the daemon withholds such a path)
    await redis_client.xadd(
        keys.paths("N0"),
        {**base_fields, "tick_id": "2-1", "path": "[NaN, 101.5]",
         "bands": '{"80": {"path": [[1.0, Infinity], [2.0, 3.0]]}}'},
        id="2-1",
    )  # fmt: skip
    events: list = []
    async with aiohttp.ClientSession() as http, http.get(base + "/events?symbols=N0") as r:
        assert r.status == 200
        await asyncio.wait_for(read_sse(r, events, lambda e: e[-1][0] == "skill"), 10)
        # and the same while streaming (XREAD rather than the first XREVRANGE)
        await put("5-1", path="[1.0,")
        await redis_client.xadd(stream, {**no_next, "tick_id": "6-1"}, id="6-1")
        await put("7-1", next="106.0")
        await asyncio.wait_for(read_sse(r, events, lambda e: e[-1][1].get("id") == "7-1"), 10)
    forecasts = {data["id"]: data for kind, data in events if kind == "forecast"}
    assert list(forecasts) == ["1-1", "2-1", "4-1", "6-1", "7-1"]
    assert "next" not in forecasts["1-1"] and "path" not in forecasts["1-1"]
    assert forecasts["1-1"]["reason"] == "model output not finite"
    assert forecasts["1-1"]["price"] == 100.0 and "next" not in forecasts["6-1"]
    assert forecasts["2-1"]["next"] is None and forecasts["2-1"]["path"] == [None, 101.5, None]
    assert forecasts["2-1"]["bands"] == {"80": {"next": [None, 101.0], "path": [[1.0, None]]}}
    assert forecasts["4-1"]["next"] == 104.0 and forecasts["7-1"]["next"] == 106.0
    # the path, sent as it is, its non-finite numbers null
    paths = [data for kind, data in events if kind == "path"]
    assert paths == [{"id": "2-1", "tick_id": "2-1", "symbol": "N0", "price": 100.0, "model": "v1",
                      "ts": 0, "path": [None, 101.5],
                      "bands": {"80": {"path": [[1.0, None], [2.0, 3.0]]}}}]  # fmt: skip
    # the live page reads through the client, which logs a bad entry once per page
    warnings = [r for r in caplog.records if r.name == "streamcast.client"]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING  # once, not per entry


async def test_events_with_redis_down_say_so_and_end_without_an_error_log(caplog):
    from redis.asyncio import Redis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    # nothing listens there; no retries, so that the refusal comes at once
    down = Redis(host="127.0.0.1", port=free_port(), protocol=2, retry=Retry(NoBackoff(), 0))
    server = HttpServer(
        CollectorRegistry(), host="127.0.0.1", port=0, ready=lambda: True,
        heartbeat=time.monotonic, page=LivePage(down, Keys("down")),
    )  # fmt: skip
    events: list = []
    try:
        async with server:
            url = f"http://127.0.0.1:{server.port}/events?symbols=A"
            async with aiohttp.ClientSession() as http, http.get(url) as r:
                assert r.status == 200
                await asyncio.wait_for(read_sse(r, events, lambda e: False), 10)  # to the end
    finally:
        await down.aclose()
    assert events == [("status", {"redis": False})]
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


# -- the header's numbers ------------------------------------------------------------------------


def test_metrics_status_reads_the_header_numbers_over_a_sliding_window():
    metrics = Metrics(CollectorRegistry())
    now = [100.0]
    status = MetricsStatus(metrics.prometheus, window_s=10.0, clock=lambda: now[0])
    # nothing happened yet: no rate over no time, no latency, no model loaded
    assert status() == {
        "throughput_per_s": None,
        "p99_latency_ms": None,
        "lag": 0.0,
        "model": None,
        "window_s": 0.0,
    }
    metrics.forecasts.labels("next").inc(50)
    metrics.forecasts.labels("path").inc(7)  # paths are no forecasts: not counted
    for _ in range(100):
        metrics.latency.observe(0.03)  # in the bucket (0.025, 0.05]
    metrics.stream_lag.set(7)
    metrics.model_info.labels("v9").set(1)
    now[0] = 105.0
    got = status()
    assert got["throughput_per_s"] == pytest.approx(10.0) and got["window_s"] == 5.0
    # rank 99 of 100, all in (25 ms, 50 ms]: 25 + 25 * 99/100, as histogram_quantile says
    assert got["p99_latency_ms"] == pytest.approx(49.75)
    assert (got["lag"], got["model"]) == (7.0, "v9")
    # 11 s later the window starts at the reading of 105 s: the first 50 forecasts are out of it
    metrics.forecasts.labels("next").inc(22)
    for _ in range(10):
        metrics.latency.observe(0.18)  # (150 ms, 200 ms]
    metrics.model_info.clear()  # a hot swap, as the model watcher does it
    metrics.model_info.labels("v10").set(1)
    now[0] = 116.0
    got = status()
    assert got["throughput_per_s"] == pytest.approx(2.0) and got["window_s"] == 11.0
    assert got["p99_latency_ms"] == pytest.approx(150 + 50 * 9.9 / 10)
    assert got["model"] == "v10"


def test_bucket_quantile_interpolates_like_prometheus():
    inf = float("inf")
    assert bucket_quantile(0.99, []) is None
    assert bucket_quantile(0.99, [(1.0, 0.0), (inf, 0.0)]) is None
    assert bucket_quantile(0.5, [(1.0, 10.0), (inf, 10.0)]) == pytest.approx(0.5)  # from 0
    assert bucket_quantile(0.5, [(1.0, 0.0), (2.0, 4.0), (inf, 4.0)]) == pytest.approx(1.5)
    # beyond the highest finite bound: that bound (nothing finer is known)
    assert bucket_quantile(0.99, [(1.0, 1.0), (2.0, 1.0), (inf, 10.0)]) == 2.0


# -- the page's script, in node with a stub DOM (no browser needed) -------------------------------

PAGE_SCRIPT_HARNESS = r"""
const fs = require("fs");
const vm = require("vm");
const errors = [];
const points = [];
const texts = [];
const fills = []; // the fill style of each shape the last drawing filled
const ctx = {
  clearRect() { fills.length = 0; }, beginPath() {}, stroke() {}, closePath() {},
  fill() { fills.push(this.fillStyle); },
  moveTo(x, y) { points.push([x, y]); }, lineTo(x, y) { points.push([x, y]); },
  fillText(text, x, y) { texts.push(text); points.push([x, y]); },
};
const element = () => ({
  textContent: "", children: [], clientWidth: 300, clientHeight: 100, width: 0, height: 0,
  append(...xs) { this.children.push(...xs); }, getContext() { return ctx; },
});
const elements = {};
for (const id of ["charts", "skill", "status", "throughput", "lag", "p99", "model"]) elements[id] = element();
const sources = [];
class EventSource {
  constructor(url) { this.url = url; this.listeners = {}; sources.push(this); }
  addEventListener(kind, f) { this.listeners[kind] = f; }
}
let frames = [];
const sandbox = {
  window: {}, EventSource, URLSearchParams, setTimeout, devicePixelRatio: 1,
  location: { search: "?symbols=A" },
  document: { getElementById: (id) => elements[id], createElement: () => element() },
  requestAnimationFrame: (f) => frames.push(f),
  fetch: () => { throw new Error("fetch is not expected with ?symbols="); },
  console: { error: (...a) => errors.push(a.join(" ")), warn() {}, log() {} },
};
vm.createContext(sandbox);
const run = (f) => { try { f(); } catch (e) { errors.push(String(e && e.stack || e)); } };
run(() => vm.runInContext(fs.readFileSync(process.argv[2], "utf8"), sandbox));
const input = JSON.parse(fs.readFileSync(0, "utf8"));
for (const [kind, data] of input) {
  run(() => sources[0].listeners[kind]({ data: JSON.stringify(data) }));
  const pending = frames; frames = [];
  for (const f of pending) run(f);  // draw, as the next animation frame would
}
const captions = elements.charts.children.map((figure) => figure.children[0].textContent);
console.log(JSON.stringify({
  errors, captions, skill: elements.skill.textContent, state: sandbox.window.streamcast, texts, fills,
  header: ["status", "throughput", "lag", "p99", "model"].map((id) => elements[id].textContent),
  points: points.length, finite: points.every(([x, y]) => Number.isFinite(x) && Number.isFinite(y)),
}));
"""


def run_page_script(tmp_path: Path, events: list) -> dict:
    """The page's script fed ``events`` (kind, data) in node, each drawn as the next frame
    would: what it showed and drew (PAGE_SCRIPT_HARNESS's output)."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    harness = tmp_path / "harness.js"
    harness.write_text(PAGE_SCRIPT_HARNESS)
    app = tmp_path / "app.js"
    app.write_bytes(resources.files("streamcast").joinpath("web", "app.js").read_bytes())
    done = subprocess.run(
        [node, str(harness), str(app)],
        env={**os.environ, "TZ": "UTC"},
        input=json.dumps(events),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_the_page_script_draws_axes_skill_and_header_and_skips_a_forecast_without_next(tmp_path):
    events = [
        ("forecast", {"symbol": "A", "price": 100.0, "next": 101.0, "model": "v1", "id": "1-0"}),
        ("path", {"symbol": "A", "price": 100.0, "path": [101.0, 102.0], "model": "v1",
                  "id": "1-0", "tick_id": "1-0"}),
        ("forecast", {"symbol": "A", "price": 101.0, "model": "v1", "id": "2-0",
                      "reason": "model output not finite"}),
        ("forecast", {"symbol": "A", "price": 102.0, "next": None, "model": "v1", "id": "3-0"}),
        ("path", {"symbol": "A", "price": 102.0, "path": [None, 103.0], "model": "v1",
                  "id": "3-0", "tick_id": "3-0"}),
        ("skill", {"v1": {"1": {"skill": None, "n": 0}, "5": {"n": 2}, "10": None}}),
        ("forecast", {"symbol": "A", "price": 103.0, "next": 104.0, "model": "v1", "id": "4-0"}),
        ("status", {"redis": True, "throughput_per_s": 12.345, "p99_latency_ms": 48.4, "lag": 3.0,
                    "model": "v1"}),
    ]  # fmt: skip
    result = run_page_script(tmp_path, events)
    assert result["errors"] == []
    state = result["state"]
    assert (state["events"], state["forecasts"], state["paths"]) == (8, 4, 2)
    assert state["skill"] == events[5][1] and state["status"] == events[7][1]
    # four prices (the paths are none); the newest path drawn from its tick, the 3rd
    assert state["prices"] == {"A": 4}
    assert state["path"] == {"A": {"from": "3-0", "at": 2, "steps": 2}}
    assert result["header"] == ["live", "12.3 forecasts/s", "3 ticks", "48 ms", "v1"]
    # only 100 -> 101 was forecast and then seen (the other forecasts had no next): the model
    # was exact where no change was off by 1 %, so its skill is 1
    assert state["symbolSkill"] == {"A": {"skill": 1.0, "n": 1}}
    assert result["captions"] == ["A  price 103.00  next 104.00  skill h1 +1.000 (n=1)  model v1"]
    # prices 100..104 in steps of 1; the newest tick's time (tick ids 1..4 ms after the epoch,
    # UTC) and the end of the newest path, 2 ticks ahead of its tick
    assert state["axes"] == {"A": {"price": ["100", "101", "102", "103", "104"],
                                  "time": ["00:00:00", "+2 ticks"]}}  # fmt: skip
    assert set(state["axes"]["A"]["price"] + state["axes"]["A"]["time"]) <= set(result["texts"])
    assert result["skill"].endswith("v1: h1 - (n=0)  h5 - (n=2)  h10 - (n=0)")
    assert result["points"] > 0 and result["finite"]
    # entries without bands (older ones): no band shaded, none in the caption
    assert result["fills"] == []
    assert state["bands"] == {
        "A": {"levels": [], "polygons": 0, "bar": [], "path": [], "next": None}
    }


def test_the_page_script_draws_a_path_from_its_own_tick_and_moves_no_price(tmp_path):
    def tick(k: int, **more) -> tuple:
        return ("forecast", {"symbol": "P", "price": 100.0 + k, "next": 101.0 + k, "model": "v1",
                             "id": f"{k}-0", "tick_id": f"{k}-0", **more})  # fmt: skip

    def path(k: int, steps: int, **more) -> tuple:
        return ("path", {"symbol": "P", "price": 100.0 + k, "path": [200.0] * steps,
                         "model": "v1", "id": f"{k}-0", "tick_id": f"{k}-0", **more})  # fmt: skip

    ticks = [tick(k) for k in range(1, 6)]
    # a path from the 3rd tick, come after the 5th: drawn from the 3rd, the 5 prices as they were
    result = run_page_script(tmp_path, [*ticks, path(3, 4)])
    state = result["state"]
    assert result["errors"] == [] and result["finite"]
    assert (state["forecasts"], state["paths"], state["prices"]) == (5, 1, {"P": 5})
    assert state["path"] == {"P": {"from": "3-0", "at": 2, "steps": 4}}
    # no new price, no new forecast: the caption is the 5th tick's, its skill over 4 scored
    assert result["captions"] == ["P  price 105.00  next 106.00  skill h1 +1.000 (n=4)  model v1"]
    # one from a tick the chart does not have, one older than the path shown, and a withheld
    # one (no path): the path shown stays
    later = [path(9, 7), path(2, 5), ("path", {**path(4, 1)[1], "path": None,
                                                "reason": "path is not finite"})]  # fmt: skip
    state = run_page_script(tmp_path, [*ticks, path(3, 4), *later])["state"]
    assert state["path"] == {"P": {"from": "3-0", "at": 2, "steps": 4}} and state["prices"] == {
        "P": 5}  # fmt: skip
    # a path of a symbol with no chart yet makes none
    state = run_page_script(tmp_path, [("path", {**path(1, 2)[1], "symbol": "Q"}), *ticks])["state"]
    assert list(state["prices"]) == ["P"] and state["path"] == {"P": None}
    # the prices scroll left (200 kept): the path's origin with them, then off the chart
    many = [tick(k) for k in range(1, 201)]
    state = run_page_script(tmp_path, [*many, path(150, 3), tick(201), tick(202)])["state"]
    assert state["prices"] == {"P": 200}
    assert state["path"] == {"P": {"from": "150-0", "at": 147, "steps": 3}}
    state = run_page_script(tmp_path, [*many, path(2, 3), tick(201), tick(202)])["state"]
    assert state["path"] == {"P": None}  # from the 2nd tick: scrolled off with it


NEXT_FILL, PATH_FILL = "rgba(79, 195, 247, 0.16)", "rgba(255, 183, 77, 0.2)"  # app.js's


def test_the_page_script_shades_the_bands_and_skips_those_it_cannot_draw(tmp_path):
    events = [
        # with its bands, and a 2-step path from it with its bands
        ("forecast", {"symbol": "A", "price": 100.0, "next": 101.0, "model": "v1", "id": "1-0",
                      "bands": NEXT_BANDS}),
        ("path", {"symbol": "A", "price": 100.0, "path": [101.0, 102.0], "model": "v1",
                  "id": "1-0", "tick_id": "1-0", "bands": PATH_BANDS}),
        ("forecast", {"symbol": "A", "price": 101.0, "next": 101.5, "model": "v1", "id": "2-0"}),
        ("forecast", {"symbol": "A", "price": 102.0, "next": 103.0, "model": "v1", "id": "3-0",
                      "bands": {"80": {"next": [102.5, 103.5]}, "95": {"next": [102.0, 104.0]}}}),
        # 80 % with a null bound (a NaN the server nulled), a path band without a path, a level
        # that is no level (the JSON names it __proto__) and one that is no band
        ("forecast", {"symbol": "A", "price": 103.0, "next": 104.0, "model": "v1", "id": "4-0",
                      "bands": {"80": {"next": [None, 104.5]},
                                "95": {"next": [103.0, 105.0], "path": [[1.0, 2.0]]},
                                "__proto__": {"next": [0.0, 1.0]}, "90": 5}}),
    ]  # fmt: skip
    result = run_page_script(tmp_path, events)
    assert result["errors"] == [] and result["finite"]
    # the newest band: 95 % alone (its 80 % had a null bound), so the caption shows the 95 %
    assert result["captions"][0].startswith("A  price 103.00  next 104.00 95% [103.00, 105.00]  ")
    bands = result["state"]["bands"]["A"]
    assert bands["levels"] == ["95", "80"] and bands["next"] == {"95": [103.0, 105.0]}
    assert bands["bar"] == ["95"]  # the newest forecast's band, as a bar
    # around the 1-step forecasts: 95 % over forecasts 3 and 4 (one polygon; the 1st alone, after
    # it one without bands), 80 % only at 1 and 3: no run to shade; around the path: 95 %, then
    # 80 % over it
    assert bands["path"] == ["95", "80"] and bands["polygons"] == 3
    assert result["fills"] == [NEXT_FILL, PATH_FILL, PATH_FILL]
    # the price scale makes room for every band: 100 .. 105
    assert result["state"]["axes"]["A"]["price"] == ["100", "101", "102", "103", "104", "105"]


class Untouchable:
    """A stand-in for the Redis client that records every use (and then fails like an outage)."""

    def __init__(self) -> None:
        self.used: list[str] = []

    def __getattr__(self, name: str):
        self.used.append(name)
        raise redis_errors.ConnectionError(f"redis was touched: {name}")


@pytest.mark.parametrize(
    "query",
    [
        "symbols=bad%20symbol",
        "symbols=",
        "symbols=,",
        "symbols=A,..%2Fx",
        "symbols=" + ",".join(f"S{i}" for i in range(13)),
    ],
)
async def test_events_refuse_bad_symbols_before_touching_redis(query):
    redis = Untouchable()
    server = HttpServer(
        CollectorRegistry(), host="127.0.0.1", port=0, ready=lambda: True,
        heartbeat=time.monotonic, page=LivePage(redis, Keys("refuse")),  # type: ignore[arg-type]
    )  # fmt: skip
    async with server, aiohttp.ClientSession() as http:
        base = f"http://127.0.0.1:{server.port}"
        async with http.get(f"{base}/events?{query}") as r:
            assert r.status == 400
        assert redis.used == [], "a refused request reached redis"
        # the stand-in does notice a request that is let through
        events: list = []
        async with http.get(f"{base}/events?symbols=A") as r:
            assert r.status == 200
            await asyncio.wait_for(read_sse(r, events, lambda e: False), 10)
        assert redis.used and events == [("status", {"redis": False})]


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


# what the page shows in its header, with the status event it drew it from, and one real chart
HEADER_PROBE = """({
  sent: window.streamcast.status,
  shown: ['status', 'throughput', 'lag', 'p99', 'model'].map(
    (id) => document.getElementById(id).textContent),
  axes: window.streamcast.axes['SYN.2'],
  skill: window.streamcast.symbolSkill['SYN.2'],
})"""

# a chart of known ticks: 150 prices 100.0, 100.1, ... one second apart from 12:00:00 UTC, each
# forecast 0.05 up where the next price is 0.1 up (so the model's error is half the naive's,
# and its skill 1 - 0.5^2 = 0.75), and a 50-step path from 115.0 to 119.9 at the newest
KNOWN_CHART = """(() => {
  const t0 = Date.UTC(2026, 10, 29, 12, 0, 0);
  for (let i = 0; i < 150; i++) {
    const price = 100 + 0.1 * i;
    onForecast({symbol: 'AX', price, next: price + 0.05, model: 'vX', tick_ts: t0 + 1000 * i,
                tick_id: '1-' + i});
  }
  onPath({symbol: 'AX', price: 114.9, model: 'vX', tick_id: '1-149',
          path: Array.from({length: 50}, (_, k) => 115 + 0.1 * k)});
  return new Promise((done) => requestAnimationFrame(() => requestAnimationFrame(() => done({
    axes: window.streamcast.axes.AX,
    skill: window.streamcast.symbolSkill.AX,
    caption: [...document.querySelectorAll('figcaption')].map((e) => e.textContent)
      .find((text) => text.startsWith('AX ')),
  }))));
})()"""


# a chart with bands: 60 forecasts of 100 (80 % band 99..101, 95 % band 98..102) and the newest
# with a flat 50-step path and the same bands; then the alpha of the canvas's pixels (its
# background is transparent) at 101.5 (in the 95 % band only) and at 100.5 (in both), at
# position 30 (the 1-step band's ribbon) and at position 140 (right of the path's end: no band),
# by the chart's geometry in app.js's draw (98..102 is the price scale: the bands' extremes)
BANDS_CHART = """(() => {
  const band = (lo, hi, n) => Array.from({length: n}, () => [lo, hi]);
  for (let i = 0; i < 60; i++) {
    onForecast({symbol: 'BX', price: 100, next: 100, model: 'vX', tick_id: '1-' + i,
                bands: {'80': {next: [99, 101]}, '95': {next: [98, 102]}}});
  }
  onPath({symbol: 'BX', price: 100, model: 'vX', tick_id: '1-59', path: Array(50).fill(100),
          bands: {'80': {path: band(99, 101, 50)}, '95': {path: band(98, 102, 50)}}});
  return new Promise((done) => requestAnimationFrame(() => requestAnimationFrame(() => {
    const figure = [...document.querySelectorAll('figure')]
      .find((e) => e.querySelector('figcaption').textContent.startsWith('BX '));
    const canvas = figure.querySelector('canvas');
    const dpr = devicePixelRatio, w = canvas.width, h = canvas.height;
    const left = 4 * dpr, right = w - 64 * dpr, top = 8 * dpr, bottom = h - 20 * dpr;
    const x = (i) => Math.round(left + (i / 249) * (right - left));
    const y = (v) => Math.round(bottom - ((v - 98) / 4) * (bottom - top));
    const ctx = canvas.getContext('2d');
    const alpha = (i, v) => ctx.getImageData(x(i), y(v), 1, 1).data[3];
    done({
      drawn: window.streamcast.bands.BX,
      price: window.streamcast.axes.BX.price,
      alpha: {outside: alpha(140, 101.5), band95: alpha(30, 101.5), band80: alpha(30, 100.5),
              path95: alpha(90, 101.5), path80: alpha(90, 100.5)},
      legend: [...document.querySelectorAll('.legend .band')].map((e) => e.textContent),
    });
  })));
})()"""


def check_bands_chart(probe: dict) -> None:
    """The bands are drawn: shaded where they are, the 80 % band darker than the 95 % alone."""
    assert "exceptionDetails" not in probe, probe
    chart = probe["result"]["value"]
    assert chart["legend"] == ["80 % band", "95 % band"]
    assert chart["price"] == ["98", "99", "100", "101", "102"]
    drawn = chart["drawn"]
    assert drawn["levels"] == ["95", "80"] and drawn["path"] == ["95", "80"]
    assert drawn["next"] == {"80": [99, 101], "95": [98, 102]} and drawn["bar"] == ["95", "80"]
    alpha = chart["alpha"]
    assert alpha["outside"] == 0, alpha
    assert 0 < alpha["band95"] < alpha["band80"], alpha  # lighter for the wider band
    assert 0 < alpha["path95"] < alpha["path80"], alpha


def served_version(http_port: int) -> str:
    """The model version the daemon says it serves (streamcast_model_info on /metrics)."""
    _, body = http_get(http_port, "/metrics")
    found = re.findall(r'^streamcast_model_info\{version="([^"]+)"\} 1\.0$', body, re.M)
    assert len(found) == 1, found
    return found[0]


def check_header(header: dict, serving: str) -> None:
    """The header shows the daemon's last status event: this replica's numbers."""
    sent, (status, throughput, lag, p99, model) = header["sent"], header["shown"]
    assert sent["redis"] is True and status == "live"
    assert sent["model"] == serving and model == serving
    # the feed runs at 30 ticks/s: forecasts flow, each within the daemon's latency
    assert sent["throughput_per_s"] > 1 and 0 < sent["p99_latency_ms"] < 10_000
    assert re.fullmatch(r"\d+\.\d forecasts/s", throughput), throughput
    assert float(throughput.split()[0]) == pytest.approx(sent["throughput_per_s"], abs=0.051)
    assert re.fullmatch(r"\d+ ms", p99) and int(p99.split()[0]) == pytest.approx(
        sent["p99_latency_ms"], abs=0.51
    )
    ticks = round(sent["lag"])
    assert ticks >= 0 and lag == (f"{ticks} ticks" if ticks != 1 else "1 tick")
    # a real chart: a price scale of round numbers, ascending, and today's times (UTC) of ticks
    # sent during this test; its skill is over the forecasts it shows
    prices = [float(p) for p in header["axes"]["price"]]
    assert len(prices) >= 2 and prices == sorted(prices)
    times = [t for t in header["axes"]["time"] if t != "+50 ticks"]  # the path's end aside
    assert times and all(re.fullmatch(r"\d\d:\d\d:\d\d", t) for t in times), header["axes"]
    assert times == sorted(set(times)) or times[0] > times[-1]  # ascending (but for midnight)
    newest = datetime.strptime(times[-1], "%H:%M:%S").time()
    now = datetime.now(UTC)
    age_s = (now.hour * 3600 + now.minute * 60 + now.second) - (
        newest.hour * 3600 + newest.minute * 60 + newest.second
    )
    assert 0 <= age_s % 86400 < 120, (times, now)
    assert header["skill"]["n"] >= 10 and isinstance(header["skill"]["skill"], float)


def check_known_chart(known: dict) -> None:
    assert "exceptionDetails" not in known, known
    chart = known["result"]["value"]
    assert chart["axes"] == {
        # 100 .. 119.9 (the path's end) in steps of 5
        "price": ["100", "105", "110", "115"],
        # positions 0 and 67 (the next label, at 133, would crowd the newest), the newest (149),
        # then the path's end
        "time": ["12:00:00", "12:01:07", "12:02:29", "+50 ticks"],
    }
    assert chart["skill"]["n"] == 149 and chart["skill"]["skill"] == pytest.approx(0.75)
    assert chart["caption"] == "AX  price 114.90  next 114.95  skill h1 +0.750 (n=149)  model vX"


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
                # the time axis shows local times: UTC here, whatever the machine's zone
                await tools.call("Emulation.setTimezoneOverride", timezoneId="UTC")
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
                while await tools.value("window.streamcast.status") is None:
                    assert time.monotonic() < deadline, "no status event reached the page"
                    await asyncio.sleep(0.5)
                await asyncio.sleep(3)  # a few more updates drawn, then the picture
                charts = await tools.value("document.querySelectorAll('canvas').length")
                status = await tools.value("document.getElementById('status').textContent")
                shot = await tools.call("Page.captureScreenshot", format="png")
                # entries as the daemon publishes them when the model's output is not finite (a
                # forecast without next, a path without path) or as a hand-written one with NaN
                # reaches the page (null): the page draws on, two frames later, without an error
                injected = await tools.call(
                    "Runtime.evaluate",
                    expression=(
                        "onForecast({symbol: 'SYN.0', price: 100.5, model: 'v1',"
                        " reason: 'model output not finite'});"
                        "onForecast({symbol: 'SYN.1', price: 100.5, next: null, model: 'v1',"
                        " tick_id: '1-1'});"
                        "onPath({symbol: 'SYN.1', price: 100.5, path: [null, 101.0],"
                        " model: 'v1', tick_id: '1-1'});"
                        "onPath({symbol: 'SYN.2', price: 100.5, model: 'v1', tick_id: '1-1',"
                        " reason: 'path is not finite'});"
                        "new Promise((done) => requestAnimationFrame("
                        "() => requestAnimationFrame(() => done(true))))"
                    ),
                    awaitPromise=True,
                    returnByValue=True,
                )
                header = await tools.value(HEADER_PROBE)
                known = await tools.call(
                    "Runtime.evaluate",
                    expression=KNOWN_CHART,
                    awaitPromise=True,
                    returnByValue=True,
                )
                banded = await tools.call(
                    "Runtime.evaluate",
                    expression=BANDS_CHART,
                    awaitPromise=True,
                    returnByValue=True,
                )
                tools.reader.cancel()
        png = base64.b64decode(shot["data"])
        (tmp_path / "live.png").write_bytes(png)
        if os.environ.get(SCREENSHOT_ENV):
            Path(os.environ[SCREENSHOT_ENV]).write_bytes(png)
        assert png.startswith(b"\x89PNG") and len(png) > 10_000
        assert charts == 3 and status == "live"
        assert "exceptionDetails" not in injected and injected["result"]["value"] is True, injected
        check_header(header, serving=served_version(http_port))
        check_known_chart(known)
        check_bands_chart(banded)
        assert tools.errors == [], tools.errors
    finally:
        if producer is not None:
            producer.cancel()
        if chrome is not None:
            chrome.terminate()
            chrome.wait(15)
        daemon.terminate()
        daemon.wait(30)
