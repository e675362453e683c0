"""Simulated feeds: replay a CSV (or the synthetic series) as ticks, and tail forecasts."""

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
) -> int:
    """XADD paths[:, t] for every t (symbols interleaved) at ``rate`` ticks/s (None: no pacing).

    Returns the ticks sent. With ``loop`` it starts over at the end, scaling each pass to
    continue from the last price so the feed has no jumps.
    """
    symbols, length = paths.shape
    total = symbols * length
    sent = 0
    started = time.monotonic()
    scale = np.ones(symbols)
    while True:
        for t0 in range(0, length, max(1, chunk // symbols)):
            if stop is not None and stop.is_set():
                return sent
            rows = paths[:, t0 : t0 + max(1, chunk // symbols)] * scale[:, None]
            now_ms = int(clock() * 1000)
            pipe = redis.pipeline(transaction=False)
            for t in range(rows.shape[1]):
                for s in range(symbols):
                    fields: dict[Any, Any] = Tick.encode(names[s], float(rows[s, t]), ts=now_ms)
                    pipe.xadd(keys.ticks, fields)
            await pipe.execute()
            sent += rows.size
            if progress is not None:
                progress.update(sent if loop else min(sent, total))
            if rate:
                ahead = sent / rate - (time.monotonic() - started)
                if ahead > 0:
                    await asyncio.sleep(ahead)
        if not loop:
            return sent
        scale = scale * paths[:, -1] / paths[:, 0]


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
