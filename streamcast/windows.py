"""Per-symbol rolling windows of the last ``seq_len`` prices, with the id and time of the last tick."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

import numpy as np

from streamcast.schema import id_key


class SymbolWindow:
    __slots__ = ("last_id", "last_ts", "prices")

    def __init__(self, seq_len: int) -> None:
        self.prices: deque[float] = deque(maxlen=seq_len)
        self.last_id: tuple[int, int] = (0, 0)
        self.last_ts: int | None = None


class Windows:
    """Windows of every symbol this replica owns; memory is O(symbols x seq_len)."""

    def __init__(self, seq_len: int = 50) -> None:
        self.seq_len = seq_len
        self._windows: dict[str, SymbolWindow] = {}

    def __len__(self) -> int:
        return len(self._windows)

    def get(self, symbol: str) -> SymbolWindow:
        window = self._windows.get(symbol)
        if window is None:
            window = self._windows[symbol] = SymbolWindow(self.seq_len)
        return window

    def seen(self, symbol: str, entry_id: str) -> bool:
        """Whether this tick (or a later one) of the symbol is already in its window."""
        window = self._windows.get(symbol)
        return window is not None and id_key(entry_id) <= window.last_id

    def push(self, symbol: str, entry_id: str, price: float, ts: int | None) -> np.ndarray | None:
        """Append a price; return a copy of the full window (seq_len,) or None while filling."""
        window = self.get(symbol)
        window.prices.append(price)
        window.last_id = id_key(entry_id)
        if ts is not None:
            window.last_ts = ts
        if len(window.prices) < self.seq_len:
            return None
        return np.fromiter(window.prices, dtype=np.float64, count=self.seq_len)

    def restore(self, symbol: str, entries: Iterable[tuple[str, float, int | None]]) -> None:
        """Refill a symbol's window from history entries (id, price, ts), oldest first."""
        for entry_id, price, ts in entries:
            self.push(symbol, entry_id, price, ts)

    def symbols(self) -> list[str]:
        return list(self._windows)
