"""The history store: one capped Redis stream of accepted prices per symbol.

The daemon appends every accepted tick (entry id = tick id) in the same transaction as its
forecast. ``import_series`` loads a file's worth of older prices into an empty history, and
``read_series`` reads the newest part back for training: pages of ``page`` entries per round trip,
at most ``max_points`` per symbol, so memory is bounded by ``symbols x max_points`` floats.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from redis.asyncio import Redis

from streamcast.keys import Keys
from streamcast.schema import SYMBOL_RE

log = logging.getLogger(__name__)

PAGE = 10_000


class HistoryError(ValueError):
    """A history import or read that cannot go ahead; the text says why."""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def symbols(redis: Redis, keys: Keys) -> list[str]:
    """Every symbol that has history, sorted."""
    return sorted(_text(m) for m in await redis.smembers(keys.symbols))


async def read_series(
    redis: Redis, keys: Keys, symbol: str, max_points: int, page: int = PAGE
) -> np.ndarray:
    """The newest ``max_points`` prices of ``symbol``, oldest first, in pages (XREVRANGE)."""
    if max_points < 1:
        raise HistoryError(f"max_points must be at least 1, got {max_points}")
    key = keys.history(symbol)
    chunks: list[np.ndarray] = []
    got = 0
    upper = "+"
    while got < max_points:
        entries: Any = await redis.xrevrange(
            key, max=upper, min="-", count=min(page, max_points - got)
        )
        if not entries:
            break
        prices = np.fromiter((float(f[b"price"]) for _, f in entries), np.float64, len(entries))
        chunks.append(prices)
        got += len(entries)
        upper = "(" + _text(entries[-1][0])
        if len(entries) < page:
            break
    if not chunks:
        return np.empty(0)
    return np.concatenate(chunks)[::-1].copy()


async def import_series(
    redis: Redis,
    keys: Keys,
    symbol: str,
    prices: np.ndarray,
    *,
    maxlen: int,
    replace: bool = False,
    page: int = PAGE,
) -> int:
    """Load ``prices`` (oldest first) as the history of ``symbol``; return how many are kept.

    Imported entries get ids ``0-1``, ``0-2``, ...: older than any live tick, so the daemon's
    later appends (id = tick id) follow them. A history that is not empty is refused unless
    ``replace``: older prices cannot go in front of newer ones in a stream.
    """
    if not SYMBOL_RE.fullmatch(symbol):
        raise HistoryError(f"symbol {symbol!r} must be 1-64 of A-Z a-z 0-9 . _ : -")
    prices = np.asarray(prices, dtype=np.float64)
    if prices.ndim != 1 or len(prices) == 0:
        raise HistoryError("nothing to import: the series is empty")
    bad = np.flatnonzero(~np.isfinite(prices))
    if len(bad):
        raise HistoryError(f"value {bad[0] + 1} is {prices[bad[0]]!r}: prices must be finite")
    key = keys.history(symbol)
    existing = await redis.xlen(key)
    if existing and not replace:
        raise HistoryError(
            f"the history of {symbol} already holds {existing} entries; imports go into an empty "
            "history (use --replace to drop it first)"
        )
    if existing:
        await redis.delete(key)
    kept = prices[-maxlen:]
    offset = len(prices) - len(kept)
    for start in range(0, len(kept), page):
        pipe = redis.pipeline(transaction=False)
        for i in range(start, min(start + page, len(kept))):
            pipe.xadd(key, {"price": repr(float(kept[i]))}, id=f"0-{offset + i + 1}")
        await pipe.execute()
    await redis.sadd(keys.symbols, symbol)
    return len(kept)
