"""Per-symbol rolling windows of the last ``seq_len`` prices, with the id and time of the last tick."""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Container, Iterable

import numpy as np

from streamcast.wire import id_key


class SymbolWindow:
    __slots__ = ("last_id", "last_ts", "prices", "touched")

    def __init__(self, seq_len: int) -> None:
        self.prices: deque[float] = deque(maxlen=seq_len)
        self.last_id: tuple[int, int] = (0, 0)
        self.last_ts: int | None = None
        self.touched = 0.0  # clock time of the last tick (or restore)


class Windows:
    """Windows of the symbols this replica owns, least recently ticked first; memory is
    O(symbols x seq_len), bounded by the daemon's eviction (``evict_idle``, ``evict_over``)."""

    def __init__(self, seq_len: int = 50) -> None:
        self.seq_len = seq_len
        self._windows: OrderedDict[str, SymbolWindow] = OrderedDict()

    def __len__(self) -> int:
        return len(self._windows)

    def __contains__(self, symbol: object) -> bool:
        return symbol in self._windows

    def get(self, symbol: str) -> SymbolWindow:
        window = self._windows.get(symbol)
        if window is None:
            window = self._windows[symbol] = SymbolWindow(self.seq_len)
        return window

    def touched(self, symbol: str) -> float:
        window = self._windows.get(symbol)
        return window.touched if window is not None else 0.0

    def forget(self, symbols: Iterable[str]) -> None:
        for symbol in symbols:
            self._windows.pop(symbol, None)

    def evict_idle(self, before: float, protect: Container[str] = ()) -> list[str]:
        """Forget the symbols not touched since ``before`` (except ``protect``); return them."""
        gone: list[str] = []
        for symbol, window in self._windows.items():
            if window.touched >= before:
                break  # least recently touched first: the rest are newer
            if symbol not in protect:
                gone.append(symbol)
        for symbol in gone:
            del self._windows[symbol]
        return gone

    def evict_over(self, cap: int, protect: Container[str] = ()) -> list[str]:
        """Forget the least recently touched symbols beyond ``cap`` (except ``protect``)."""
        excess = len(self._windows) - cap
        if excess <= 0:
            return []
        gone: list[str] = []
        for symbol in self._windows:
            if len(gone) == excess:
                break
            if symbol not in protect:
                gone.append(symbol)
        for symbol in gone:
            del self._windows[symbol]
        return gone

    def seen(self, symbol: str, entry_id: str) -> bool:
        """Whether this tick (or a later one) of the symbol is already in its window."""
        window = self._windows.get(symbol)
        return window is not None and id_key(entry_id) <= window.last_id

    def push(
        self, symbol: str, entry_id: str, price: float, ts: int | None, now: float = 0.0
    ) -> np.ndarray | None:
        """Append a price; return a copy of the full window (seq_len,) or None while filling."""
        window = self.get(symbol)
        if now:
            window.touched = now
            self._windows.move_to_end(symbol)
        window.prices.append(price)
        window.last_id = id_key(entry_id)
        if ts is not None:
            window.last_ts = ts
        if len(window.prices) < self.seq_len:
            return None
        return np.fromiter(window.prices, dtype=np.float64, count=self.seq_len)

    def restore(
        self, symbol: str, entries: Iterable[tuple[str, float, int | None]], now: float = 0.0
    ) -> None:
        """Refill a symbol's window from history entries (id, price, ts), oldest first; the
        symbol is held from now on even when it has no history."""
        window = self.get(symbol)
        window.touched = now
        self._windows.move_to_end(symbol)
        rows = list(entries)
        if not rows:
            return
        window.prices.extend(price for _, price, _ in rows)
        window.last_id = id_key(rows[-1][0])
        stamps = [ts for _, _, ts in rows if ts is not None]
        if stamps:
            window.last_ts = stamps[-1]

    def symbols(self) -> list[str]:
        return list(self._windows)
