"""Simulated feeds: replay a CSV (or the synthetic series) as ticks, evenly paced; and tail
forecasts."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO

import numpy as np
from redis.asyncio import Redis

from streamcast.data import synthetic_prices
from streamcast.keys import Keys
from streamcast.wire import Forecast, Tick, parse_stream_reply

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


async def watch(
    redis: Redis,
    keys: Keys,
    symbols: Sequence[str],
    *,
    out: TextIO = sys.stdout,
    stop: asyncio.Event | None = None,
    limit: int | None = None,
    start: str = "$",
) -> int:
    """Print each forecast of ``symbols`` as it arrives; return how many were printed."""
    cursors: dict[Any, Any] = {keys.forecasts(s): start for s in symbols}
    printed = 0
    while stop is None or not stop.is_set():
        reply = await redis.xread(cursors, block=500, count=100)
        now_ms = int(time.time() * 1000)
        for stream, entry_id, fields in parse_stream_reply(reply):
            cursors[stream] = entry_id
            out.write(format_forecast(entry_id, fields, now_ms) + "\n")
            printed += 1
            if limit is not None and printed >= limit:
                out.flush()
                return printed
        out.flush()
    return printed
