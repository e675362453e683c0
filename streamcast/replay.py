"""Simulated feeds: replay a CSV (or the synthetic series) as ticks, evenly paced; and watch
forecasts and paths, as lines, as JSON lines or as a live table redrawn in place on a terminal.
Both go through :class:`streamcast.client.Client`, so they work on one server and on a Redis
Cluster.

The watch follows each symbol's forecasts stream and its paths stream (a path comes apart from
its tick's forecast, later, and not for every tick): a forecast updates the symbol's price, next,
error and latency; a path entry (a :class:`~streamcast.client.PathForecast`) the path shown."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import shutil
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, TextIO

import numpy as np
from redis.asyncio import Redis

from streamcast.client import Client, PathForecast, Subscription
from streamcast.data import synthetic_prices
from streamcast.keys import Keys
from streamcast.wire import Forecast, id_key, text

log = logging.getLogger(__name__)


def fan_out(series: np.ndarray, symbols: int, seed: int = 0) -> np.ndarray:
    """(symbols, len) distinct deterministic price paths from one series.

    Path 0 is the series itself; path k > 0 multiplies it by a seeded random walk (0.2 % per
    step), so every symbol has its own path, yet keeps the series' character.
    """
    series = np.asarray(series, dtype=np.float64)
    if symbols == 1:
        return series[None, :]
    rng = np.random.default_rng(seed)
    drift = np.exp(np.cumsum(rng.normal(0.0, 0.002, size=(symbols, len(series))), axis=1))
    drift[0] = 1.0
    return series[None, :] * drift


def symbol_names(base: str, count: int) -> list[str]:
    return [base] if count == 1 else [f"{base}.{k}" for k in range(count)]


def synthetic_feed(symbols: int, points: int = 5000, seed: int = 0) -> np.ndarray:
    return synthetic_prices(symbols, points, seed=seed)


class Progress:
    """A one-line progress bar on a terminal; a log line every 10 % otherwise."""

    def __init__(self, total: int | None, stream: TextIO = sys.stderr) -> None:
        self.total = total
        self.stream = stream
        self.tty = stream.isatty()
        self.started = time.monotonic()
        self._last_decile = -1
        self._last_draw = 0.0

    def update(self, done: int) -> None:
        now = time.monotonic()
        rate = done / max(now - self.started, 1e-9)
        if self.tty:
            if now - self._last_draw < 0.1 and done != self.total:
                return
            self._last_draw = now
            if self.total:
                filled = int(30 * done / self.total)
                bar = "#" * filled + "-" * (30 - filled)
                self.stream.write(f"\r[{bar}] {done}/{self.total} ticks  {rate:,.0f}/s ")
            else:
                self.stream.write(f"\r{done} ticks  {rate:,.0f}/s ")
            self.stream.flush()
        elif self.total:
            decile = 10 * done // self.total
            if decile != self._last_decile:
                self._last_decile = decile
                log.info("replayed %d/%d ticks (%d%%), %.0f/s", done, self.total, 10 * decile, rate)

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


class _Feed:
    """The ticks of ``paths`` in the order they are sent (time steps, symbols interleaved), pass
    after pass with ``loop``: each pass scaled to continue from the last price, so no jumps."""

    def __init__(self, paths: np.ndarray, loop: bool) -> None:
        self.paths = paths
        self.loop = loop
        self.scale = np.ones(paths.shape[0])
        self.position = 0  # the next tick within the pass
        self.sent = 0
        self.done = paths.size == 0

    def take(self, count: int) -> list[tuple[int, float]]:
        """Up to ``count`` next ticks as (symbol index, price), ending at the end of a pass."""
        symbols = self.paths.shape[0]
        end = min(self.position + count, self.paths.size)
        ticks = []
        for i in range(self.position, end):
            t, s = divmod(i, symbols)
            ticks.append((s, float(self.paths[s, t] * self.scale[s])))
        self.sent += end - self.position
        self.position = end
        if end == self.paths.size:
            if self.loop:
                self.scale = self.scale * self.paths[:, -1] / self.paths[:, 0]
                self.position = 0
            else:
                self.done = True
        return ticks


async def replay(
    redis: Redis,
    keys: Keys,
    paths: np.ndarray,
    names: Sequence[str],
    *,
    rate: float | None,
    loop: bool = False,
    chunk: int = 500,
    progress: Progress | None = None,
    stop: asyncio.Event | None = None,
    clock: Callable[[], float] = time.time,
    slice_s: float = 0.01,
) -> int:
    """Publish paths[:, t] for every t (symbols interleaved) at ``rate`` ticks/s (None: no
    pacing), each tick to its symbol's partition stream (:meth:`Client.publish_many`).

    Paced, the ticks go out evenly, as a feed does, not in bursts: every ``slice_s`` (or at each
    tick's own time, when ticks are further apart) the ticks due by then are sent, counted from a
    monotonic start so that rounding never drifts. Unpaced, they go in pipelines of ``chunk``.
    Returns the ticks sent. With ``loop`` it starts over at the end, scaling each pass to continue
    from the last price so the feed has no jumps; ``stop`` ends it within a slice.
    """
    client = Client(redis, keys)
    feed = _Feed(paths, loop)
    started = time.monotonic()
    while not feed.done and (stop is None or not stop.is_set()):
        # tick n is due at n / rate; unpaced, a chunk at a time
        due = int((time.monotonic() - started) * rate) + 1 if rate else feed.sent + chunk
        while feed.sent < due and not feed.done:
            ticks = feed.take(min(due - feed.sent, chunk))
            now_ms = int(clock() * 1000)
            await client.publish_many((names[s], price, now_ms) for s, price in ticks)
        if progress is not None:
            progress.update(feed.sent)
        if rate and not feed.done:
            # the next tick's time, but not sooner than a slice from now: a fast feed goes out
            # a slice's ticks at a time; a short sleep, so ``stop`` is seen at a slow rate too
            wake = max(started + feed.sent / rate, time.monotonic() + slice_s)
            await asyncio.sleep(min(wake - time.monotonic(), 0.25))
    return feed.sent


BAND_LEVEL = "80"  # the prediction interval watch shows (STREAMCAST_INTERVAL_LEVELS' default)


def next_band(f: Forecast, level: str = BAND_LEVEL) -> tuple[float, float] | None:
    """The ``level`` % band of the forecast's ``next`` (its ``bands``), or None: an older entry
    has none, and a band that is not two finite numbers is not shown."""
    band = f.bands.get(level) if isinstance(f.bands, Mapping) else None
    return _pair(band.get("next") if isinstance(band, Mapping) else None)


def path_end_band(f: Forecast, level: str = BAND_LEVEL) -> tuple[float, float] | None:
    """The ``level`` % band of the last step of ``f``'s path, or None (none published, one not
    as long as the path, or not two finite numbers)."""
    band = f.bands.get(level) if isinstance(f.bands, Mapping) else None
    steps = band.get("path") if isinstance(band, Mapping) else None
    if not f.path or not isinstance(steps, list | tuple) or len(steps) != len(f.path):
        return None
    return _pair(steps[-1])


def _pair(pair: Any) -> tuple[float, float] | None:
    if not isinstance(pair, list | tuple) or len(pair) != 2:
        return None
    if not all(_is_number(v) and math.isfinite(v) for v in pair):
        return None
    return float(pair[0]), float(pair[1])


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _band_text(band: tuple[float, float] | None) -> str:
    return "-" if band is None else f"[{band[0]:.4f}, {band[1]:.4f}]"


def format_forecast(f: Forecast, now_ms: int) -> str:
    """One forecast as a line, with its next value's 80 % band when it has one
    (``next 101.2000 [100.9000, 101.5000]``); the latency is from the tick's arrival in Redis
    (its id). A path entry's line has no ``next``: ``path end 104.1000 (+50)`` and its last
    step's 80 % band follow the price of the tick the path starts from."""
    end = f"{f.path[-1]:.4f} (+{len(f.path)})" if f.path else "-"
    if isinstance(f, PathForecast):
        band = path_end_band(f)
        end = end if band is None else f"{end} {_band_text(band)}"
        return (
            f"{f.tick.symbol:<12} {f.tick.id:<18} price {f.tick.price:<12.4f} path end {end:<50} "
            f"model {f.model}  latency {now_ms - id_key(f.tick.id)[0]} ms"
        )
    nxt = f"{f.next:.4f}" if f.next is not None else "-"
    band = next_band(f)
    if band is not None:
        nxt = f"{nxt} {_band_text(band)}"
    return (
        f"{f.tick.symbol:<12} {f.tick.id:<18} price {f.tick.price:<12.4f} next {nxt:<33} "
        f"path end {end:<22} model {f.model}  latency {now_ms - id_key(f.tick.id)[0]} ms"
    )


def forecast_json(f: Forecast) -> str:
    """One forecast as a line of JSON: ``kind`` (``"forecast"``, or ``"path"`` for an entry of
    the paths stream) and its entry's fields (:meth:`Forecast.as_dict`, its ``bands`` too); a
    non-finite number, which JSON has not, is null."""

    def finite(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: finite(v) for k, v in value.items()}
        return [finite(v) for v in value] if isinstance(value, list) else value

    kind = "path" if isinstance(f, PathForecast) else "forecast"
    return json.dumps(finite({"kind": kind, **f.as_dict()}), allow_nan=False)


# -- the live table: one row per symbol, redrawn in place on a terminal -------------------------


@dataclass(frozen=True)
class Row:
    """One symbol's row in the live table: its newest forecast, and how its previous one did."""

    symbol: str
    price: float
    next: float | None
    error: float | None  # this price less the symbol's previous 1-step forecast
    path_end: float | None  # the newest path's last step (paths come apart, not every tick)
    path_steps: int
    latency_ms: int  # from the tick's arrival in Redis (its id) to the forecast's being read
    model: str
    band: tuple[float, float] | None = None  # the 80 % band of ``next`` (None: not published)


_HEADER = (
    f"{'symbol':<12} {'price':>12} {'next':>12} {BAND_LEVEL + ' % band':>22} {'last error':>11} "
    f"{'path end':>20} {'latency':>10}  model"
)


def render_table(
    rows: Iterable[Row],
    *,
    forecasts: int,
    per_s: float | None,
    lag: int | None,
    title: Sequence[str] = (),
    notes: Sequence[str] = (),
) -> str:
    """The live table's text: ``title``, a line of totals, a row per symbol (sorted), ``notes``.

    Args:
        forecasts: forecasts read so far.
        per_s: forecasts a second over the last few seconds (None: not known yet).
        lag: ticks not forecast yet (None: not known).
    """
    rate = "-" if per_s is None else f"{per_s:.1f} forecasts/s"
    behind = "-" if lag is None else f"{lag} ticks"
    lines = [*title, f"forecasts {forecasts}  throughput {rate}  lag {behind}", "", _HEADER]
    for row in sorted(rows, key=lambda r: r.symbol):
        path = "-" if row.path_end is None else f"{row.path_end:.4f} (+{row.path_steps})"
        lines.append(
            f"{row.symbol:<12} {row.price:>12.4f} {_number(row.next):>12} "
            f"{_band_text(row.band):>22} {_number(row.error, '+'):>11} {path:>20} "
            f"{row.latency_ms:>7} ms  {row.model}"
        )
    if notes:
        lines += ["", *notes]
    return "\n".join(lines) + "\n"


def _number(value: float | None, sign: str = "") -> str:
    return "-" if value is None else f"{value:{sign}.4f}"


class Board:
    """The live table's state: the newest row of each symbol, and the forecasts' recent rate.

    A forecast makes the symbol's row (price, next, error, latency); a path entry sets the row's
    path only (one that comes before its symbol's first forecast waits for it), and is not
    counted as a forecast. A withheld path leaves the last one shown."""

    def __init__(self, window_s: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.rows: dict[str, Row] = {}
        self.paths: dict[str, tuple[float, int]] = {}  # symbol -> the newest path's end, steps
        self.forecasts = 0
        self.window_s = window_s
        self._clock = clock
        self._started = clock()
        self._arrivals: deque[float] = deque()

    def add(self, f: Forecast, now_ms: int) -> None:
        symbol = f.tick.symbol
        before = self.rows.get(symbol)
        if f.path:  # a path entry's, or an older forecast entry's (the path rode on it then)
            self.paths[symbol] = (f.path[-1], len(f.path))
        if isinstance(f, PathForecast):
            if before is not None and symbol in self.paths:
                end, steps = self.paths[symbol]
                self.rows[symbol] = replace(before, path_end=end, path_steps=steps)
            return
        error = None
        if before is not None and before.next is not None:
            error = f.tick.price - before.next
        path_end, steps = self.paths.get(symbol, (None, 0))
        self.rows[symbol] = Row(
            symbol,
            f.tick.price,
            f.next,
            error,
            path_end,
            steps,
            now_ms - id_key(f.tick.id)[0],
            f.model,
            next_band(f),
        )
        self.forecasts += 1
        self._arrivals.append(self._clock())

    def per_s(self) -> float | None:
        """Forecasts a second over the last ``window_s`` (None in the first second)."""
        now = self._clock()
        while self._arrivals and self._arrivals[0] < now - self.window_s:
            self._arrivals.popleft()
        span = min(self.window_s, now - self._started)
        return len(self._arrivals) / span if span >= 1.0 else None


async def ticks_behind(redis: Redis, keys: Keys, group: str | None = None) -> int | None:
    """Ticks the daemon's consumer group (``keys.group`` unless named) has not forecast yet,
    summed over every partition stream: those not delivered to it (XINFO GROUPS lag, else
    entries added less entries read) and those delivered but not yet acknowledged; None when
    the group exists on no partition stream yet or Redis cannot say."""
    group = keys.group if group is None else group
    streams = keys.all_ticks()
    pipe = redis.pipeline(transaction=False)  # one command a stream: fine on a cluster
    for stream in streams:
        pipe.xinfo_groups(stream)
    replies = await pipe.execute(raise_on_error=False)
    behind: list[int] = []
    for stream, infos in zip(streams, replies, strict=True):
        if isinstance(infos, Exception):
            continue  # no such stream yet
        for info in infos:
            if text(info["name"]) != group:
                continue
            lag = info.get("lag")
            if lag is None:
                read = info.get("entries-read")
                if read is None:
                    continue
                lag = int((await redis.xinfo_stream(stream))["entries-added"]) - int(read)
            behind.append(int(lag) + int(info["pending"]))
    return sum(behind) if behind else None


class Screen:
    """Redraws text in place on a terminal (ANSI: cursor home, each line cleared to its end, the
    rest of the screen cleared), cut to the terminal's size so that nothing wraps or scrolls."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self._cleared = False

    def draw(self, body: str) -> None:
        columns, rows = shutil.get_terminal_size()
        lines = [line[: columns - 1] for line in body.splitlines()[: rows - 1]]
        start = "\x1b[H" if self._cleared else "\x1b[H\x1b[2J"
        self._cleared = True
        self.out.write(start + "".join(f"{line}\x1b[K\n" for line in lines) + "\x1b[J")
        self.out.flush()


class LogTail(logging.Handler):
    """Keeps the newest log lines for the live table's foot: on a screen redrawn in place, lines
    logged below it would be wiped at the next redraw. Errors are kept whole (with their
    tracebacks) to be shown once the table is done."""

    def __init__(self, size: int = 4) -> None:
        super().__init__()
        self.lines: deque[str] = deque(maxlen=size)
        self.errors: deque[str] = deque(maxlen=10)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self.lines.append(message.splitlines()[0] if message else "")
        if record.levelno >= logging.ERROR:
            self.errors.append(message)


# -- watch: each forecast as it arrives --------------------------------------------------------

WATCH_READ_MS = 500  # a read waits this long at most: ``stop`` is seen within it


def _done(stop: asyncio.Event | None, seen: int, limit: int | None) -> bool:
    return (stop is not None and stop.is_set()) or (limit is not None and seen >= limit)


async def watch(
    redis: Redis,
    keys: Keys,
    symbols: Sequence[str],
    *,
    out: TextIO | None = None,
    stop: asyncio.Event | None = None,
    limit: int | None = None,
    start: str = "$",
    table: bool | None = None,
    as_json: bool = False,
    group: str | None = None,
    title: Sequence[str] = (),
    notes: Callable[[], Sequence[str]] = tuple,
) -> int:
    """Show each forecast and each path of ``symbols`` on ``out`` (stdout) as it arrives; return
    how many forecasts (``limit``: stop after that many; the paths shown are not counted).

    A line each (``as_json``: a JSON object each), or (``table``; by default when ``out`` is a
    terminal) a live table redrawn in place at most every half second, with ``title`` above
    it, the throughput and the lag of the consumer ``group`` (summed over the partitions; None:
    no lag shown) in its header, and the lines ``notes()`` returns below it.
    """
    out = sys.stdout if out is None else out  # at the call: a test may have replaced it
    subscription = Client(redis, keys).subscribe(symbols, start=start, paths=True)
    if as_json or not (out.isatty() if table is None else table):
        return await _print_lines(subscription, out, stop, limit, as_json)
    board, screen = Board(), Screen(out)

    async def draw() -> None:
        lag = None if group is None else await ticks_behind(redis, keys, group)
        body = render_table(
            board.rows.values(),
            forecasts=board.forecasts,
            per_s=board.per_s(),
            lag=lag,
            title=title,
            notes=notes(),
        )
        screen.draw(body)

    drawn = time.monotonic()
    await draw()
    while not _done(stop, board.forecasts, limit):
        forecasts = await subscription.read(WATCH_READ_MS)
        now_ms = int(time.time() * 1000)
        for forecast in forecasts:
            if _done(None, board.forecasts, limit):
                break
            board.add(forecast, now_ms)
        if time.monotonic() - drawn >= 0.5:
            drawn = time.monotonic()
            await draw()
    await draw()
    return board.forecasts


async def _print_lines(
    subscription: Subscription,
    out: TextIO,
    stop: asyncio.Event | None,
    limit: int | None,
    as_json: bool,
) -> int:
    printed = 0  # forecasts: the paths between them are shown, not counted
    while not _done(stop, printed, limit):
        forecasts = await subscription.read(WATCH_READ_MS)
        now_ms = int(time.time() * 1000)
        for forecast in forecasts:
            if _done(None, printed, limit):
                break
            line = forecast_json(forecast) if as_json else format_forecast(forecast, now_ms)
            out.write(line + "\n")
            printed += not isinstance(forecast, PathForecast)
            if as_json:
                out.flush()  # a line at a time to whatever reads the pipe
        out.flush()
    return printed
