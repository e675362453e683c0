"""The simulated feed and the watch: even pacing against a real redis-server, each tick in its
symbol's partition stream, the live table as text (each symbol's newest path from its paths
stream), plain lines when the output is not a terminal, and ``streamcast watch --json --count``."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import zlib

import numpy as np
import pytest

from streamcast.cli import main
from streamcast.client import PathForecast
from streamcast.keys import Keys
from streamcast.replay import (
    Board,
    LogTail,
    Row,
    Screen,
    format_forecast,
    render_table,
    replay,
    ticks_behind,
    watch,
)
from streamcast.wire import Forecast, Tick

from .helpers import wait_for

# -- pacing: a feed, not bursts ----------------------------------------------------------------


def stream_ms(entry_id: bytes) -> int:
    return int(entry_id.split(b"-")[0])


async def test_a_paced_replay_sends_ticks_evenly_at_the_rate_asked(redis_client):
    """The demo's rate: 40 ticks/s over 8 symbols, 400 ticks (10 s). Each tick's stream id is
    its arrival in Redis (ms): no gap near a burst's 12.4 s, and 40 ticks/s within 2 %."""
    keys, names = Keys("pace"), [f"P{i}" for i in range(8)]
    paths = 100 + np.arange(8 * 50, dtype=float).reshape(8, 50)
    sent = await replay(redis_client, keys, paths, names, rate=40.0)
    assert sent == 400
    arrivals = [stream_ms(eid) for eid, _ in await redis_client.xrange(keys.ticks(0))]
    assert len(arrivals) == 400
    gaps = np.diff(arrivals)
    assert gaps.max() < 100, f"largest gap {gaps.max()} ms"
    achieved = (len(arrivals) - 1) / ((arrivals[-1] - arrivals[0]) / 1000)
    assert achieved == pytest.approx(40.0, rel=0.02)
    # interleaved as before: time step by time step, every symbol in turn
    first = [
        (f[b"symbol"], f[b"price"]) for _, f in await redis_client.xrange(keys.ticks(0), count=9)
    ]
    assert [s for s, _ in first] == [n.encode() for n in names] + [b"P0"]
    assert [float(p) for _, p in first] == [100.0 + 50 * i for i in range(8)] + [101.0]


async def test_a_fast_paced_replay_sends_a_slice_at_a_time_not_a_chunk(redis_client):
    """At 300 ticks/s (the S&P CSV's replay in the README), ticks go out in slices of about
    10 ms, 3 ticks each, never a 500-tick chunk at once."""
    keys = Keys("fast")
    paths = np.linspace(100, 200, 600)[None, :]
    assert await replay(redis_client, keys, paths, ["SPX"], rate=300.0) == 600
    arrivals = np.array([stream_ms(eid) for eid, _ in await redis_client.xrange(keys.ticks(0))])
    per_ms = np.unique(arrivals, return_counts=True)[1]
    assert per_ms.max() <= 10, f"{per_ms.max()} ticks in one millisecond"
    achieved = (len(arrivals) - 1) / ((arrivals[-1] - arrivals[0]) / 1000)
    assert achieved == pytest.approx(300.0, rel=0.02)


async def test_a_looping_replay_continues_from_the_last_price_and_stops_within_a_slice(
    redis_client,
):
    keys, stop = Keys("loop"), asyncio.Event()
    paths = np.array([[10.0, 11.0, 12.0], [20.0, 18.0, 16.0]])
    task = asyncio.create_task(
        replay(redis_client, keys, paths, ["A", "B"], rate=200.0, loop=True, stop=stop)
    )
    await wait_for(lambda: _xlen_at_least(redis_client, keys, 12), timeout_s=10, what="two passes")
    stop.set()
    sent = await asyncio.wait_for(task, 1.0)  # a slice, not a chunk's worth of sleep
    prices = [float(f[b"price"]) for _, f in await redis_client.xrange(keys.ticks(0))]
    assert sent == len(prices) >= 12
    # the second pass starts where the first ended: A 12 * 10/10, B 16 * 20/20 ...
    assert prices[:12] == pytest.approx([10, 20, 11, 18, 12, 16, 12, 16, 13.2, 14.4, 14.4, 12.8])


async def _xlen_at_least(redis, keys: Keys, n: int) -> bool:
    return await redis.xlen(keys.ticks(0)) >= n


async def test_an_unpaced_replay_sends_every_tick_in_chunks(redis_client):
    keys = Keys("fastest")
    paths = np.arange(1, 1201, dtype=float).reshape(2, 600)
    assert await replay(redis_client, keys, paths, ["X", "Y"], rate=None, chunk=500) == 1200
    assert await redis_client.xlen(keys.ticks(0)) == 1200


async def test_a_replay_puts_each_symbols_ticks_in_its_partition_stream(redis_client):
    keys, names = Keys("parts", partitions=4), [f"R{i}" for i in range(6)]
    paths = 100 + np.arange(6 * 5, dtype=float).reshape(6, 5)
    assert await replay(redis_client, keys, paths, names, rate=None) == 30
    partition = {n: zlib.crc32(n.encode()) % 4 for n in names}
    assert len(set(partition.values())) > 1
    for p in range(4):
        entries = await redis_client.xrange(f"parts:{{p{p}}}:ticks")
        mine = [n for n in names if partition[n] == p]
        # time step by time step, this partition's symbols in turn, each at its own price
        assert [(f[b"symbol"].decode(), float(f[b"price"])) for _, f in entries] == [
            (n, paths[names.index(n), t]) for t in range(5) for n in mine
        ]


# -- the live table ----------------------------------------------------------------------------

ROWS = [
    Row("SYN.1", 98.5, None, None, None, 0, 7, "v2"),
    Row("SYN.0", 101.25, 101.3125, -0.0625, 103.5, 50, 12, "v1", (101.0625, 101.5625)),
]


def test_the_table_has_a_header_of_totals_and_a_row_per_symbol_in_order():
    text = render_table(
        ROWS, forecasts=1234, per_s=39.75, lag=3, title=["demo: here"], notes=["a log line"]
    )
    assert text.splitlines() == [
        "demo: here",
        "forecasts 1234  throughput 39.8 forecasts/s  lag 3 ticks",
        "",
        "symbol              price         next              80 % band  last error"
        "             path end    latency  model",
        "SYN.0            101.2500     101.3125   [101.0625, 101.5625]     -0.0625"
        "       103.5000 (+50)      12 ms  v1",
        "SYN.1             98.5000            -                      -           -"
        "                    -       7 ms  v2",
        "",
        "a log line",
    ]


def test_the_table_says_what_it_does_not_know_yet():
    text = render_table([], forecasts=0, per_s=None, lag=None)
    assert text.splitlines()[0] == "forecasts 0  throughput -  lag -"


def forecast(
    symbol: str, price: float, nxt: float | None, path=None, tick_id="1000-0", bands=None
) -> Forecast:
    return Forecast(Tick(tick_id, symbol, price, None), "v1", nxt, path, bands=bands)


def forecast_fields(symbol: str, price: float, nxt: float | None, tick_id: str, bands=None) -> dict:
    return forecast(symbol, price, nxt, tick_id=tick_id, bands=bands).encode(now_ms=1000)


def path_entry(symbol: str, price: float, path, tick_id: str, bands=None) -> PathForecast:
    """A path entry as the client reads it from the paths stream (from the tick ``tick_id``)."""
    return PathForecast(Tick(tick_id, symbol, price, None), "v1", None, tuple(path), bands=bands)


def path_fields(symbol: str, price: float, path, tick_id: str, bands=None) -> dict:
    """A paths stream entry's fields, as the daemon publishes them."""
    tick = Tick(tick_id, symbol, price, None)
    return Forecast.path_of(tick, "v1", path, bands).encode(now_ms=2000)


def bands_around(nxt: float) -> dict:
    """Prediction intervals of a 1-step forecast ``nxt``, as the daemon publishes them."""
    return {"80": {"next": [nxt - 0.25, nxt + 0.25]}, "95": {"next": [nxt - 0.5, nxt + 0.5]}}


def test_the_board_scores_each_forecast_against_the_next_price_and_keeps_the_last_path():
    now = [0.0]
    board = Board(window_s=5.0, clock=lambda: now[0])
    board.add(forecast("A", 100.0, 101.0), now_ms=1040)
    assert board.rows["A"] == Row("A", 100.0, 101.0, None, None, 0, 40, "v1")
    # the path from that tick, published apart, later: the row's path only, not a forecast
    board.add(path_entry("A", 100.0, (102.0, 103.0), "1000-0"), now_ms=1900)
    assert board.rows["A"] == Row("A", 100.0, 101.0, None, 103.0, 2, 40, "v1")
    board.add(forecast("A", 100.5, 100.25, tick_id="1100-0"), now_ms=1110)
    # this price less the previous 1-step forecast; the path shown stays until the next one
    assert board.rows["A"] == Row("A", 100.5, 100.25, -0.5, 103.0, 2, 10, "v1")
    board.add(path_entry("A", 100.5, (99.0, 98.0, 97.5), "1100-0"), now_ms=1500)
    assert board.rows["A"] == Row("A", 100.5, 100.25, -0.5, 97.5, 3, 10, "v1")
    # a withheld path leaves the last one shown
    withheld = PathForecast(Tick("1100-0", "A", 100.5, None), "v1", reason="path is not finite")
    board.add(withheld, now_ms=1600)
    assert board.rows["A"].path_end == 97.5 and board.forecasts == 2


def test_a_path_before_its_symbols_first_forecast_waits_for_it():
    board = Board(window_s=5.0, clock=lambda: 0.0)
    board.add(path_entry("B", 50.0, (51.0, 52.0), "900-0"), now_ms=1000)
    assert board.rows == {} and board.forecasts == 0  # no row without a price and a forecast
    board.add(forecast("B", 50.5, 51.0, tick_id="1000-0"), now_ms=1020)
    assert board.rows["B"] == Row("B", 50.5, 51.0, None, 52.0, 2, 20, "v1")


def test_the_board_shows_each_forecasts_own_80_percent_band_and_none_where_it_has_none():
    board = Board(window_s=5.0, clock=lambda: 0.0)
    board.add(forecast("A", 100.0, 101.0, bands=bands_around(101.0)), now_ms=1040)
    assert board.rows["A"].band == (100.75, 101.25)
    # an older entry (no bands) and one whose 80 % band is not two finite numbers: no band,
    # not the previous forecast's
    board.add(forecast("A", 100.5, 100.25, tick_id="1100-0"), now_ms=1110)
    assert board.rows["A"].band is None
    nulled = {"80": {"next": [None, 101.0]}, "95": {"next": [99.0, 102.0]}}
    board.add(forecast("A", 100.5, 100.25, tick_id="1200-0", bands=nulled), now_ms=1210)
    assert board.rows["A"].band is None
    text = render_table(board.rows.values(), forecasts=3, per_s=None, lag=None)
    assert text.splitlines()[-1].startswith(
        "A                100.5000     100.2500" + " " * 22 + "-"
    )


def test_a_forecast_line_shows_the_80_percent_band_after_next_when_there_is_one():
    with_band = format_forecast(forecast("A", 100.0, 101.0, bands=bands_around(101.0)), 1040)
    assert "price 100.0000     next 101.0000 [100.7500, 101.2500]     path end -" in with_band
    without = format_forecast(forecast("A", 100.0, 101.0), 1040)
    assert "next 101.0000" + " " * 26 + "path end -" in without
    assert with_band.index("path end") == without.index("path end")  # columns stay aligned
    only_95 = {"95": {"next": [100.5, 101.5]}}  # STREAMCAST_INTERVAL_LEVELS=95: no 80 % band
    assert "[" not in format_forecast(forecast("A", 100.0, 101.0, bands=only_95), 1040)


def test_a_path_line_shows_its_end_and_the_80_percent_band_of_its_last_step_and_no_next():
    bands = {"80": {"path": [[100.0, 102.0], [101.0, 105.0]]}, "95": {"path": [[1, 2], [3, 4]]}}
    line = format_forecast(path_entry("A", 100.0, (101.0, 103.0), "1000-0", bands), 1250)
    assert line == (
        "A            1000-0             price 100.0000     path end "
        f"{'103.0000 (+2) [101.0000, 105.0000]':<50} model v1  latency 250 ms"
    )
    assert " next " not in line
    withheld = PathForecast(Tick("1000-0", "A", 100.0, None), "v1", reason="path is not finite")
    assert "price 100.0000     path end - " in format_forecast(withheld, 1250)


def test_the_board_rate_is_over_the_last_seconds():
    now = [0.0]
    board = Board(window_s=5.0, clock=lambda: now[0])
    assert board.per_s() is None  # nothing to say in the first second
    for t in range(100):  # 10 a second for 10 s
        now[0] = t / 10
        board.add(forecast("A", 100.0, 100.0, tick_id=f"{t}-0"), now_ms=t)
    now[0] = 10.0
    assert board.per_s() == pytest.approx(10.0, abs=0.2)
    now[0] = 12.5  # nothing new for 2.5 s: half the window empty
    assert board.per_s() == pytest.approx(5.0, abs=0.2)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_screen_redraws_in_place_cut_to_the_terminal(monkeypatch):
    monkeypatch.setenv("COLUMNS", "10")
    monkeypatch.setenv("LINES", "3")
    out = _Terminal()
    screen = Screen(out)
    screen.draw("first line, long\nsecond\nthird\n")
    screen.draw("again\n")
    # cleared once, then home; each line cleared to its end; no line wraps, none scrolls
    assert out.getvalue() == (
        "\x1b[H\x1b[2J" + "first lin\x1b[K\n" + "second\x1b[K\n" + "\x1b[J"
        "\x1b[H" + "again\x1b[K\n" + "\x1b[J"
    )


def test_the_log_tail_keeps_the_newest_lines_and_errors_whole():
    logger = logging.getLogger("test_replay.tail")
    logger.propagate = False
    tail = LogTail(size=2)
    logger.addHandler(tail)
    try:
        for i in range(3):
            logger.warning("line %d", i)
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("it failed")
    finally:
        logger.removeHandler(tail)
    assert list(tail.lines) == ["line 2", "it failed"]
    assert len(tail.errors) == 1 and "ValueError: boom" in tail.errors[0]


# -- watch: lines off a terminal, the table on one ---------------------------------------------


async def publish(
    redis, keys: Keys, symbol: str, price: float, nxt: float, tick_id: str, bands=None
) -> None:
    """A forecast as the daemon publishes it: its entry id is its tick's."""
    await redis.xadd(
        keys.forecasts(symbol), forecast_fields(symbol, price, nxt, tick_id, bands), id=tick_id
    )


async def publish_path(redis, keys: Keys, symbol: str, price: float, path, tick_id: str) -> None:
    """A path as the daemon publishes it: to the paths stream, its entry id the tick's it starts
    from."""
    await redis.xadd(keys.paths(symbol), path_fields(symbol, price, path, tick_id), id=tick_id)


async def test_watch_writes_plain_lines_when_the_output_is_not_a_terminal(redis_client):
    keys = Keys("lines", partitions=3)
    for i in range(3):
        await publish(redis_client, keys, "A", 100.0 + i, 101.0 + 2 * i, f"{1000 + i}-0")
    await publish(redis_client, keys, "A", 103.0, 104.0, "1003-0", bands=bands_around(104.0))
    await publish_path(redis_client, keys, "A", 101.0, [102.0, 106.5], "1001-0")
    out = io.StringIO()
    assert await watch(redis_client, keys, ["A"], out=out, start="0", limit=4) == 4
    lines = out.getvalue().splitlines()
    # four forecasts, and the path (not counted) after its tick's forecast
    assert len(lines) == 5 and "\x1b" not in out.getvalue()
    assert lines[2].startswith("A ") and "1001-0" in lines[2]
    assert "price 101.0000     path end 106.5000 (+2) " in lines[2] and " next " not in lines[2]
    assert lines[3].startswith("A ") and "1002-0" in lines[3]
    assert "price 102.0000" in lines[3] and "next 105.0000 " in lines[3] and "[" not in lines[3]
    assert "price 103.0000     next 104.0000 [103.7500, 104.2500] " in lines[4]


async def test_watch_writes_a_json_object_per_forecast_per_line_even_on_a_terminal(redis_client):
    keys = Keys("jsonl", partitions=3)
    await publish(redis_client, keys, "A", 100.0, 101.0, "5-0")
    await publish(redis_client, keys, "B", 200.0, 201.5, "6-0", bands=bands_around(201.5))
    # a producer's non-finite number: null, as JSON has no NaN (in bands too)
    raw = {"tick_id": "7-0", "symbol": "A", "price": "102.0", "model": "v2", "next": "nan",
           "bands": '{"80": {"next": [NaN, 103.0]}}'}  # fmt: skip
    await redis_client.xadd(keys.forecasts("A"), raw, id="7-0")
    path_bands = {"80": {"path": [[100.5, 101.5], [100.0, 103.0]]}}
    await redis_client.xadd(
        keys.paths("A"), path_fields("A", 100.0, [101.0, 102.0], "5-0", path_bands), id="5-0"
    )
    out = _Terminal()
    assert (
        await watch(redis_client, keys, ["A", "B"], out=out, start="0", as_json=True, limit=3) == 3
    )
    assert "\x1b" not in out.getvalue()
    assert [json.loads(line) for line in out.getvalue().splitlines()] == [
        {"kind": "forecast", "tick_id": "5-0", "symbol": "A", "price": 100.0, "model": "v1",
         "ts": 1000, "next": 101.0},
        {"kind": "path", "tick_id": "5-0", "symbol": "A", "price": 100.0, "model": "v1",
         "ts": 2000, "path": [101.0, 102.0], "bands": path_bands},
        {"kind": "forecast", "tick_id": "6-0", "symbol": "B", "price": 200.0, "model": "v1",
         "ts": 1000, "next": 201.5,
         "bands": {"80": {"next": [201.25, 201.75]}, "95": {"next": [201.0, 202.0]}}},
        {"kind": "forecast", "tick_id": "7-0", "symbol": "A", "price": 102.0, "model": "v2",
         "next": None, "bands": {"80": {"next": [None, 103.0]}}},
    ]  # fmt: skip


def test_streamcast_watch_json_count_prints_n_forecasts_and_exits(
    redis_server, monkeypatch, capsys
):
    import redis

    keys = Keys("cli", partitions=4)
    with redis.Redis.from_url(redis_server.url) as sync:
        sync.hset(keys.meta, "partitions", "4")  # as the daemon writes it
        for i, symbol in enumerate(["A", "B", "A", "B", "A"]):
            fields = forecast_fields(symbol, 100.0 + i, 100.5 + i, f"{10 + i}-0")
            sync.xadd(keys.forecasts(symbol), fields, id=f"{10 + i}-0")
    monkeypatch.setenv("STREAMCAST_REDIS_URL", redis_server.url)
    monkeypatch.setenv("STREAMCAST_KEY_PREFIX", "cli")
    monkeypatch.setenv("STREAMCAST_PARTITIONS", "4")
    assert main(["watch", "A", "B", "--from-start", "--json", "--count", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line) for line in lines] == [
        {"kind": "forecast", "tick_id": f"{10 + i}-0", "symbol": s, "price": 100.0 + i,
         "model": "v1", "ts": 1000, "next": 100.5 + i}
        for i, s in enumerate(["A", "B", "A"])
    ]  # fmt: skip
    # --limit is the same; a partition count other than the deployment's is refused
    assert main(["watch", "B", "--from-start", "--limit", "1"]) == 0
    assert "11-0" in capsys.readouterr().out
    monkeypatch.setenv("STREAMCAST_PARTITIONS", "2")
    assert main(["watch", "A", "--json"]) == 2
    err = capsys.readouterr().err
    assert "deployment on this Redis has 4 partitions" in err and "STREAMCAST_PARTITIONS=4" in err


def test_streamcast_replay_names_the_partition_streams_it_wrote(redis_server, monkeypatch, capsys):
    import redis

    monkeypatch.setenv("STREAMCAST_REDIS_URL", redis_server.url)
    monkeypatch.setenv("STREAMCAST_KEY_PREFIX", "rp")
    monkeypatch.setenv("STREAMCAST_PARTITIONS", "4")
    args = ["replay", "--symbols", "3", "--points", "5", "--as-fast-as-possible"]
    assert main(args) == 0
    keys = Keys("rp", partitions=4)
    used = sorted({keys.partition(f"SYN.{k}") for k in range(3)})
    streams = ", ".join(f"rp:{{p{p}}}:ticks" for p in used)
    message = capsys.readouterr().out.strip().splitlines()[-1]
    assert (
        message
        == f"replayed 15 ticks for 3 symbol(s) to {len(used)} of 4 partition streams ({streams})"
    )
    with redis.Redis.from_url(redis_server.url) as sync:
        assert sum(sync.xlen(keys.ticks(p)) for p in used) == 15


async def test_streamcast_replay_stops_on_sigterm_at_once(redis_server, redis_client, tmp_path):
    """As a container's process 1, which ignores a signal it has no handler for: `docker stop`
    (SIGTERM) must not wait out its grace period and kill a looping replay."""
    import os
    import signal
    import subprocess
    import sys
    import time

    env = {**os.environ, "STREAMCAST_REDIS_URL": redis_server.url, "STREAMCAST_KEY_PREFIX": "term"}
    command = [sys.executable, "-m", "streamcast.cli", "replay", "--symbol", "T", "--loop"]
    replaying = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path
    )
    try:
        stream = Keys("term").ticks_for("T")

        async def sending() -> bool:
            assert replaying.poll() is None, replaying.communicate()[1]
            return await redis_client.xlen(stream) > 0

        await wait_for(sending, 60, what="the replay's first ticks")
        started = time.monotonic()
        replaying.send_signal(signal.SIGTERM)
        _, err = await asyncio.to_thread(replaying.communicate, None, 10)
        took = time.monotonic() - started
    finally:
        replaying.kill()
        replaying.wait(10)
    assert replaying.returncode == 143, err
    assert err.strip().splitlines()[-1] == "streamcast replay: terminated"
    assert "Traceback" not in err and took < 5


async def test_watch_draws_the_table_on_a_terminal_with_the_lag_over_every_partition(
    redis_client, monkeypatch
):
    monkeypatch.setenv("COLUMNS", "160")  # the path's column too
    keys = Keys("table", partitions=2)
    for p, (added, read) in enumerate([(5, 2), (3, 0)]):
        await redis_client.xgroup_create(keys.ticks(p), keys.group, id="0", mkstream=True)
        for _ in range(added):
            await redis_client.xadd(keys.ticks(p), {"symbol": "A", "price": "1"})
        if read:  # read, not acknowledged
            await redis_client.xreadgroup(keys.group, "c", {keys.ticks(p): ">"}, count=read)
    for i in range(3):
        await publish(redis_client, keys, "A", 100.0 + i, 101.0 + 2 * i, f"{1000 + i}-0")
    await publish_path(redis_client, keys, "A", 101.0, [101.5] * 49 + [108.25], "1001-0")
    out = _Terminal()
    assert (
        await watch(redis_client, keys, ["A"], out=out, start="0", limit=3, group=keys.group) == 3
    )
    last = out.getvalue().rsplit("\x1b[H", 1)[1]
    # partition 0: 3 not delivered + 2 pending; partition 1: 3 not delivered; the path is no
    # forecast
    assert "forecasts 3  " in last and "lag 8 ticks" in last
    # the newest forecast's price, next and error, and the newest path (from the tick before)
    assert (
        "A                102.0000     105.0000                      -     -1.0000"
        "       108.2500 (+50)" in last
    )


async def test_ticks_behind_is_none_until_the_group_exists_then_summed_over_partitions(
    redis_client,
):
    keys = Keys("behind", partitions=3)
    assert await ticks_behind(redis_client, keys) is None
    await redis_client.xadd(keys.ticks(1), {"symbol": "A", "price": "1"})
    assert await ticks_behind(redis_client, keys) is None
    await redis_client.xgroup_create(keys.ticks(1), keys.group, id="0")
    assert await ticks_behind(redis_client, keys) == 1
    await redis_client.xgroup_create(keys.ticks(2), keys.group, id="0", mkstream=True)
    await redis_client.xadd(keys.ticks(2), {"symbol": "B", "price": "1"})
    await redis_client.xadd(keys.ticks(2), {"symbol": "B", "price": "2"})
    assert await ticks_behind(redis_client, keys) == 3
    assert await ticks_behind(redis_client, keys, "another") is None
