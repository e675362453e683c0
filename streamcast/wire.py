"""The wire contract: its types (Tick, Forecast, DeadLetter, HistoryEntry), each owning its
encoding, tick validation, and stream reply parsing.

Pure code over bytes and strings: no Redis, no TensorFlow. Every way a producer can get a
tick wrong maps to one short, stable reason code that goes to the dead-letter stream.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

SYMBOL_RE = re.compile(r"[A-Za-z0-9._:-]{1,64}")
MAX_PRICE_CHARS = 64
MAX_TS_CHARS = 20
MAX_FIELD_BYTES = 4096  # any field, known or not: larger entries are refused whole
MAX_FIELDS = 64
# a price is plain ASCII decimal text: optional minus, digits with an optional fraction, optional
# exponent. No spaces, no "+", no "_" separators, no other scripts' digits (float() takes them all)
PRICE_RE = re.compile(r"-?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?")

REASONS = (
    "missing_symbol",
    "bad_symbol",
    "missing_price",
    "bad_price",
    "non_finite_price",
    "non_positive_price",
    "price_out_of_range",
    "bad_ts",
    "oversized",
    "bad_encoding",
    "out_of_order",
    "wrong_partition",  # written to another partition's stream than its symbol's
    "unforecastable",  # the engine failed on the tick's window (the detail says how)
    "publish_failed",  # Redis refused to store the tick's forecast (the detail says why)
)
DEAD_FIELD_BYTES = 256  # an original field's value kept in a dead letter (its size is noted)
DEAD_NAME_BYTES = 64
DEAD_FIELDS = 16


class TickError(ValueError):
    """A tick that breaks the contract; ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class TickLimits:
    """What the edge accepts beyond the syntax: a sane price range and event times near arrival.

    ``price_min`` applies to normalised models (which divide by a window's first price: a price
    of 1e-320 overflows the division); other models accept prices down to ``-price_max``.
    ``ts_max_ahead_ms``: how far an event time may be ahead of the entry id's time (the tick's
    arrival in Redis). Further ahead is a clock or unit error (seconds, microseconds), which
    would otherwise make every later tick of the symbol look out of order.
    """

    price_min: float = 1e-6
    price_max: float = 1e9
    ts_max_ahead_ms: int = 300_000
    positive: bool = True  # a normalised model: prices must be > 0


DEFAULT_LIMITS = TickLimits()


@dataclass(frozen=True, slots=True)
class Tick:
    """One price of one symbol, as read from the ticks stream."""

    id: str  # the stream entry id, "ms-seq"
    symbol: str
    price: float
    ts: int | None  # event time, epoch milliseconds

    @staticmethod
    def encode(symbol: str, price: float, ts: int | None = None) -> dict[str, str]:
        """Fields a producer XADDs to the ticks stream (what ``streamcast replay`` sends)."""
        fields = {"symbol": symbol, "price": repr(float(price))}
        if ts is not None:
            fields["ts"] = str(int(ts))
        return fields

    @classmethod
    def decode(
        cls,
        entry_id: str,
        fields: Mapping[Any, Any],
        *,
        positive: bool | None = None,
        limits: TickLimits = DEFAULT_LIMITS,
    ) -> Tick:
        """Validate one stream entry's fields (bytes or str keys); raise :class:`TickError`.

        ``positive`` (default: ``limits.positive``) refuses prices <= 0 (a normalised model
        divides by the window's first price). Unknown fields are ignored, as the contract says,
        unless the entry is oversized.
        """
        _check_size(fields)
        symbol = _field(fields, "symbol")
        if symbol is None or symbol == "":
            raise TickError("missing_symbol", "no symbol field")
        if not SYMBOL_RE.fullmatch(symbol):
            raise TickError("bad_symbol", f"{symbol[:80]!r} is not 1-64 of A-Z a-z 0-9 . _ : -")
        price_text = _field(fields, "price")
        if price_text is None or price_text == "":
            raise TickError("missing_price", "no price field")
        price = parse_price(
            price_text, positive=limits.positive if positive is None else positive, limits=limits
        )
        ts = _event_time(entry_id, _field(fields, "ts"), limits)
        return cls(id=entry_id, symbol=symbol, price=price, ts=ts)


def _field(fields: Mapping[Any, Any], name: str) -> str | None:
    raw = fields.get(name.encode(), fields.get(name))
    if raw is None:
        return None
    if isinstance(raw, bytes):
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise TickError("bad_encoding", f"{name} is not UTF-8") from None
    return str(raw)


def _check_size(fields: Mapping[Any, Any]) -> None:
    if len(fields) > MAX_FIELDS:
        raise TickError("oversized", f"{len(fields)} fields, at most {MAX_FIELDS}")
    for key, value in fields.items():
        size = len(key) + (len(value) if isinstance(value, bytes | str) else 0)
        if size > MAX_FIELD_BYTES:
            raise TickError("oversized", f"a field of {size} bytes, at most {MAX_FIELD_BYTES}")


def _event_time(entry_id: str, ts_text: str | None, limits: TickLimits) -> int | None:
    """A tick's ``ts``: epoch milliseconds, not too far ahead of its arrival (the entry id)."""
    if ts_text is None or ts_text == "":
        return None
    if len(ts_text) > MAX_TS_CHARS or not ts_text.isascii() or not ts_text.isdigit():
        raise TickError("bad_ts", f"{ts_text[:40]!r} is not epoch milliseconds")
    ts = int(ts_text)
    arrived_ms = id_key(entry_id)[0]
    if ts - arrived_ms > limits.ts_max_ahead_ms:
        raise TickError(
            "bad_ts",
            f"ts {ts} is {(ts - arrived_ms) / 1000:.0f} s ahead of its arrival "
            f"(at most {limits.ts_max_ahead_ms / 1000:.0f} s): not epoch milliseconds?",
        )
    return ts


def parse_price(
    text: str, *, positive: bool | None = None, limits: TickLimits = DEFAULT_LIMITS
) -> float:
    """A price from its text, by the wire contract's rules; raise :class:`TickError` if it breaks them.

    The one check for every way a price comes in: live ticks and history imports alike.
    """
    if len(text) > MAX_PRICE_CHARS:
        raise TickError("oversized", f"price of {len(text)} characters")
    if not PRICE_RE.fullmatch(text):
        if text.strip().lower().lstrip("+-") in ("inf", "infinity", "nan"):
            raise TickError("non_finite_price", f"{text!r} is not finite")
        raise TickError("bad_price", f"{text[:40]!r} is not a decimal number")
    price = float(text)
    if not math.isfinite(price):
        raise TickError("non_finite_price", f"{text!r} is not finite")
    return check_price(price, text, positive=positive, limits=limits)


def check_price(
    price: float,
    shown: str | None = None,
    *,
    positive: bool | None = None,
    limits: TickLimits = DEFAULT_LIMITS,
) -> float:
    """Refuse a price outside the configured range (and <= 0 for a normalised model)."""
    shown = repr(price) if shown is None else repr(shown)
    if positive is None:
        positive = limits.positive
    if not math.isfinite(price):
        raise TickError("non_finite_price", f"{shown} is not finite")
    if positive and price <= 0:
        raise TickError("non_positive_price", f"{shown} <= 0 for a normalised model")
    low = limits.price_min if positive else -limits.price_max
    if not low <= price <= limits.price_max:
        raise TickError(
            "price_out_of_range",
            f"{shown} is outside [{low:g}, {limits.price_max:g}] (STREAMCAST_PRICE_MIN/_MAX)",
        )
    return price


@dataclass(frozen=True, slots=True)
class Forecast:
    """What the daemon publishes for one tick: an entry of the symbol's forecasts stream with the
    next price, or an entry of its paths stream with a multi-step path (:meth:`path_of`).

    ``next`` and ``path`` are None when not computed or withheld: a forecast never carries NaN or
    infinity, and ``reason`` then says why. Its entry id in either stream is the tick's id: a path
    starts from the tick whose id it bears, and the tick's own forecast entry holds its ``next``.
    """

    tick: Tick
    model: str  # the version that computed it
    next: float | None = None
    path: tuple[float, ...] | None = None
    reason: str | None = None
    published_ms: int | None = None  # set when read back (the entry's ``ts`` field)
    # prediction intervals: {"80": {"next": [lo, hi], "path": [[lo, hi], ...]}, "95": ...}
    # ("path" only with a path); streamcast.intervals makes them
    bands: Mapping[str, Any] | None = None

    @classmethod
    def of(
        cls,
        tick: Tick,
        model: str,
        next_price: float,
        path: Sequence[float] | None = None,
        bands: Mapping[str, Any] | None = None,
    ) -> Forecast:
        """A forecast from the engine's raw output, withholding what is not finite (a band of
        a withheld value goes with it)."""
        reasons = []
        nxt: float | None = float(next_price)
        if not math.isfinite(next_price):
            nxt = None
            reasons.append("next is not finite")
        values = None if path is None else tuple(path)  # floats (an array's tolist())
        if values is not None and not all(math.isfinite(v) for v in values):
            values = None
            reasons.append("path is not finite")
        path_gone = path is not None and values is None
        if bands is not None and (nxt is None or path_gone):
            bands = _bands_without(bands, nxt is None, path_gone)
        return cls(tick, model, nxt, values, "; ".join(reasons) or None, None, bands)

    @classmethod
    def path_of(
        cls,
        tick: Tick,
        model: str,
        path: Sequence[float],
        bands: Mapping[str, Any] | None = None,
    ) -> Forecast:
        """A path entry (the paths stream's): the multi-step path from ``tick``'s window, without
        ``next`` (that is in the tick's forecast entry); withheld, with a reason, if not finite."""
        values: tuple[float, ...] | None = tuple(path)
        reason = None
        if not all(math.isfinite(v) for v in values or ()):
            values, reason = None, "path is not finite"
            bands = None
        return cls(tick, model, None, values, reason, None, bands or None)

    @property
    def path_withheld(self) -> bool:
        return self.reason is not None and "path" in self.reason

    def encode(self, now_ms: int) -> dict[str, str]:
        """Fields of the forecast's entry (the caller sets its id: the tick's)."""
        tick = self.tick
        fields = {
            "tick_id": tick.id,
            "symbol": tick.symbol,
            "price": repr(tick.price),
            "model": self.model,
            "ts": str(now_ms),
        }
        if self.next is not None:
            fields["next"] = repr(self.next)
        if tick.ts is not None:
            fields["tick_ts"] = str(tick.ts)
        if self.path is not None:
            fields["path"] = json.dumps([round(v, 10) for v in self.path], allow_nan=False)
        if self.reason:
            fields["reason"] = self.reason
        if self.bands:
            fields["bands"] = json.dumps(self.bands, separators=(",", ":"), allow_nan=False)
        return fields

    @classmethod
    def decode(cls, fields: Mapping[Any, Any]) -> Forecast:
        """A forecast entry read back (bytes or str keys)."""
        f = {text(k): text(v) for k, v in fields.items()}
        tick_ts = f.get("tick_ts")
        tick = Tick(f["tick_id"], f["symbol"], float(f["price"]), int(tick_ts) if tick_ts else None)
        path = f.get("path")
        bands = loads(f["bands"]) if f.get("bands") else None
        if bands is not None and not isinstance(bands, dict):
            raise ValueError(f"bands must be a JSON object, not {type(bands).__name__}")
        return cls(
            tick,
            f.get("model", ""),
            float(f["next"]) if "next" in f else None,
            tuple(loads(path)) if path else None,
            f.get("reason"),
            int(f["ts"]) if "ts" in f else None,
            bands,
        )

    def as_dict(self) -> dict[str, Any]:
        """The entry's fields as JSON-ready values (what the live page and ``watch`` show)."""
        out: dict[str, Any] = {
            "tick_id": self.tick.id,
            "symbol": self.tick.symbol,
            "price": self.tick.price,
            "model": self.model,
        }
        optional = {
            "ts": self.published_ms,
            "next": self.next,
            "tick_ts": self.tick.ts,
            "path": None if self.path is None else list(self.path),
            "reason": self.reason,
            "bands": None if self.bands is None else dict(self.bands),
        }
        out.update((k, v) for k, v in optional.items() if v is not None)
        return out


def _bands_without(bands: Mapping[str, Any], next_gone: bool, path_gone: bool) -> dict[str, Any]:
    """The bands of what is published: none for a withheld ``next`` or path."""
    out = {}
    for level, band in bands.items():
        kept = {
            k: v
            for k, v in band.items()
            if not (k == "next" and next_gone) and not (k == "path" and path_gone)
        }
        if kept:
            out[level] = kept
    return out


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """An entry that was not forecast, with one of :data:`REASONS` and the detail of why."""

    tick_id: str
    reason: str
    detail: str
    original: Mapping[Any, Any]  # the entry's fields as read

    def encode(self) -> dict[Any, Any]:
        """Fields of the dead letter: the reason, the detail, the tick's id and the original
        fields, each cut to ``DEAD_FIELD_BYTES`` (its full size in ``size:{name}``), at most
        ``DEAD_FIELDS`` of them (``fields`` then says how many there were): a hostile entry
        cannot grow the dead stream by more than a few kilobytes."""
        letter: dict[Any, Any] = {
            b"reason": self.reason.encode(),
            b"detail": self.detail.encode("utf-8", "replace")[:512],
            b"tick_id": self.tick_id.encode(),
        }
        original = self.original
        for n, (key, value) in enumerate(original.items()):
            if n == DEAD_FIELDS:
                letter[b"fields"] = str(len(original)).encode()
                break
            name = (key if isinstance(key, bytes) else str(key).encode())[:DEAD_NAME_BYTES]
            data = value if isinstance(value, bytes) else str(value).encode()
            letter[b"field:" + name] = data[:DEAD_FIELD_BYTES]
            if len(data) > DEAD_FIELD_BYTES:
                letter[b"size:" + name] = str(len(data)).encode()
        return letter


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    """An accepted tick as kept in its symbol's history stream (the id is the tick's)."""

    id: str
    price: float
    ts: int | None

    @classmethod
    def of(cls, tick: Tick) -> HistoryEntry:
        return cls(tick.id, tick.price, tick.ts)

    def encode(self) -> dict[str, str]:
        fields = {"price": repr(self.price)}
        if self.ts is not None:
            fields["ts"] = str(self.ts)
        return fields

    @classmethod
    def decode(
        cls, entry_id: Any, fields: Mapping[Any, Any], limits: TickLimits, now_ms: int
    ) -> HistoryEntry:
        """An entry read back, by the edge's rules (raise ValueError): an imported or
        hand-written bad price must never reach a window. A bad event time is dropped."""
        entry_id = text(entry_id)
        arrived_ms = id_key(entry_id)[0]
        if arrived_ms > now_ms + limits.ts_max_ahead_ms:
            raise ValueError("an id in the future")  # would make every live tick 'seen'
        price = parse_price(text(fields.get(b"price", fields.get("price", b""))), limits=limits)
        raw = fields.get(b"ts", fields.get("ts"))
        ts = int(raw) if raw and len(raw) <= MAX_TS_CHARS and raw.isdigit() else None
        if ts is not None and ts - arrived_ms > limits.ts_max_ahead_ms:
            ts = None  # a bad event time is not the symbol's clock
        return cls(entry_id, price, ts)


def loads(raw: str | bytes) -> Any:
    """``json.loads`` for JSON from outside (Redis entries and keys, files): nesting too deep to
    parse (``[[[[...`` past the recursion limit) is a ``ValueError`` like any other malformed
    JSON, not a ``RecursionError`` that its callers would not expect."""
    try:
        return json.loads(raw)
    except RecursionError:
        raise ValueError("JSON nested too deeply to parse") from None


def text(value: Any) -> str:
    """A Redis reply value as text (replies are bytes; a client may decode them already)."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def parse_stream_reply(reply: Any) -> list[tuple[str, str, dict[Any, Any]]]:
    """Flatten an XREAD/XREADGROUP reply into (stream, entry id, fields) triples.

    Handles RESP2 (a list of [stream, entries]) and RESP3 (a mapping of stream to entries) and
    entries whose fields are None (deleted while pending).
    """
    if not reply:
        return []
    pairs = reply.items() if isinstance(reply, Mapping) else reply
    out = []
    for stream, entries in pairs:
        name = text(stream)
        if (
            entries
            and isinstance(entries[0], list | tuple)
            and len(entries) == 1
            and _nested(entries)
        ):
            entries = entries[0]
        for entry_id, fields in entries:
            out.append((name, text(entry_id), dict(fields) if fields else {}))
    return out


def _nested(entries: Any) -> bool:
    # RESP3 in some client versions wraps the entry list once more: [[(id, fields), ...]]
    first = entries[0]
    return bool(first) and isinstance(first[0], list | tuple)


def id_key(entry_id: str) -> tuple[int, int]:
    """A stream id as a sortable (ms, seq) pair."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)
