"""Simulated feeds: replay a CSV (or the synthetic series) as ticks, evenly paced; and watch
forecasts, as lines or as a live table redrawn in place on a terminal."""

from __future__ import annotations

import asyncio
import logging
import shutil
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

import numpy as np
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from streamcast.data import synthetic_prices
from streamcast.keys import Keys
from streamcast.wire import Forecast, Tick, parse_stream_reply, text

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
    """XADD paths[:, t] for every t (symbols interleaved) at ``rate`` ticks/s (None: no pacing).

    Paced, the ticks go out evenly, as a feed does, not in bursts: every ``slice_s`` (or at each
    tick's own time, when ticks are further apart) the ticks due by then are sent, counted from a
    monotonic start so that rounding never drifts. Unpaced, they go in pipelines of ``chunk``.
    Returns the ticks sent. With ``loop`` it starts over at the end, scaling each pass to continue
    from the last price so the feed has no jumps; ``stop`` ends it within a slice.
    """
    feed = _Feed(paths, loop)
    started = time.monotonic()
    while not feed.done and (stop is None or not stop.is_set()):
        # tick n is due at n / rate; unpaced, a chunk at a time
        due = int((time.monotonic() - started) * rate) + 1 if rate else feed.sent + chunk
        while feed.sent < due and not feed.done:
            ticks = feed.take(min(due - feed.sent, chunk))
            now_ms = int(clock() * 1000)
            pipe = redis.pipeline(transaction=False)
            for s, price in ticks:
                fields: dict[Any, Any] = Tick.encode(names[s], price, ts=now_ms)
                pipe.xadd(keys.ticks, fields)
            await pipe.execute()
        if progress is not None:
            progress.update(feed.sent)
        if rate and not feed.done:
            # the next tick's time, but not sooner than a slice from now: a fast feed goes out
            # a slice's ticks at a time; a short sleep, so ``stop`` is seen at a slow rate too
            wake = max(started + feed.sent / rate, time.monotonic() + slice_s)
            await asyncio.sleep(min(wake - time.monotonic(), 0.25))
    return feed.sent


def format_forecast(entry_id: str, fields: dict[Any, Any], now_ms: int) -> str:
    f = Forecast.decode(fields)
    tick_ms = int(entry_id.split("-")[0])
    end = f"{f.path[-1]:.4f} (+{len(f.path)})" if f.path else "-"
    nxt = f"{f.next:<12.4f}" if f.next is not None else f"{'-':<12}"
    return (
        f"{f.tick.symbol:<12} {entry_id:<18} price {f.tick.price:<12.4f} next {nxt} "
        f"path end {end:<22} model {f.model}  latency {now_ms - tick_ms} ms"
    )


# -- the live table: one row per symbol, redrawn in place on a terminal -------------------------


@dataclass(frozen=True)
class Row:
    """One symbol's row in the live table: its newest forecast, and how its previous one did."""

    symbol: str
    price: float
    next: float | None
    error: float | None  # this price less the symbol's previous 1-step forecast
    path_end: float | None  # the newest path's last step (not every forecast carries a path)
    path_steps: int
    latency_ms: int  # from the tick's arrival in Redis (its id) to the forecast's being read
    model: str


_HEADER = (
    f"{'symbol':<12} {'price':>12} {'next':>12} {'last error':>11} {'path end':>20} "
    f"{'latency':>10}  model"
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
            f"{_number(row.error, '+'):>11} {path:>20} {row.latency_ms:>7} ms  {row.model}"
        )
    if notes:
        lines += ["", *notes]
    return "\n".join(lines) + "\n"


def _number(value: float | None, sign: str = "") -> str:
    return "-" if value is None else f"{value:{sign}.4f}"


class Board:
    """The live table's state: the newest row of each symbol, and the forecasts' recent rate."""

    def __init__(self, window_s: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.rows: dict[str, Row] = {}
        self.forecasts = 0
        self.window_s = window_s
        self._clock = clock
        self._started = clock()
        self._arrivals: deque[float] = deque()

    def add(self, entry_id: str, fields: dict[Any, Any], now_ms: int) -> None:
        f = Forecast.decode(fields)
        before = self.rows.get(f.tick.symbol)
        error = None
        if before is not None and before.next is not None:
            error = f.tick.price - before.next
        path_end, steps = (f.path[-1], len(f.path)) if f.path else (None, 0)
        if path_end is None and before is not None:
            path_end, steps = before.path_end, before.path_steps
        self.rows[f.tick.symbol] = Row(
            f.tick.symbol,
            f.tick.price,
            f.next,
            error,
            path_end,
            steps,
            now_ms - int(entry_id.split("-")[0]),
            f.model,
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


async def ticks_behind(redis: Redis, keys: Keys, groups: Sequence[str]) -> int | None:
    """Ticks not forecast yet by the one of ``groups`` furthest behind: those not delivered to
    it (XINFO GROUPS lag, else entries added less entries read) and those delivered but not yet
    acknowledged; None when no group exists yet or Redis cannot say."""
    if not groups:
        return None
    try:
        infos = await redis.xinfo_groups(keys.ticks)
    except ResponseError:
        return None  # no ticks stream yet
    added: int | None = None
    behind = []
    for info in infos:
        if text(info["name"]) not in groups:
            continue
        lag = info.get("lag")
        if lag is None:
            read = info.get("entries-read")
            if read is None:
                continue
            if added is None:
                added = int((await redis.xinfo_stream(keys.ticks))["entries-added"])
            lag = added - int(read)
        behind.append(int(lag) + int(info["pending"]))
    return max(behind) if behind else None


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


class _Tail:
    """Reads the forecast streams of ``symbols``, each read going on from where the last ended."""

    def __init__(self, redis: Redis, keys: Keys, symbols: Sequence[str], start: str) -> None:
        self.redis = redis
        self.cursors: dict[Any, Any] = {keys.forecasts(s): start for s in symbols}

    async def read(self) -> list[tuple[str, dict[Any, Any]]]:
        reply = await self.redis.xread(self.cursors, block=500, count=100)
        entries = []
        for stream, entry_id, fields in parse_stream_reply(reply):
            self.cursors[stream] = entry_id
            entries.append((entry_id, fields))
        return entries


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
    groups: Sequence[str] = (),
    title: Sequence[str] = (),
    notes: Callable[[], Sequence[str]] = tuple,
) -> int:
    """Show each forecast of ``symbols`` on ``out`` (stdout) as it arrives; return how many.

    A line each, or (``table``; by default when ``out`` is a terminal) a live table redrawn in
    place at most every half second, with ``title`` above it, the throughput and the lag of the
    daemon's ``groups`` in its header, and the lines ``notes()`` returns below it.
    """
    out = sys.stdout if out is None else out  # at the call: a test may have replaced it
    tail = _Tail(redis, keys, symbols, start)
    if not (out.isatty() if table is None else table):
        return await _print_lines(tail, out, stop, limit)
    board, screen = Board(), Screen(out)

    async def draw() -> None:
        lag = await ticks_behind(redis, keys, groups)
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
        entries = await tail.read()
        now_ms = int(time.time() * 1000)
        for entry_id, fields in entries[: None if limit is None else limit - board.forecasts]:
            board.add(entry_id, fields, now_ms)
        if time.monotonic() - drawn >= 0.5:
            drawn = time.monotonic()
            await draw()
    await draw()
    return board.forecasts


async def _print_lines(
    tail: _Tail, out: TextIO, stop: asyncio.Event | None, limit: int | None
) -> int:
    printed = 0
    while not _done(stop, printed, limit):
        entries = await tail.read()
        now_ms = int(time.time() * 1000)
        for entry_id, fields in entries[: None if limit is None else limit - printed]:
            out.write(format_forecast(entry_id, fields, now_ms) + "\n")
            printed += 1
        out.flush()
    return printed
