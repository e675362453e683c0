"""The wire contract: tick decoding and validation, forecast encoding, stream reply parsing.

Pure functions over bytes and strings: no Redis, no TensorFlow. Every way a producer can get a
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
    id: str  # the stream entry id, "ms-seq"
    symbol: str
    price: float
    ts: int | None  # event time, epoch milliseconds


def _text(fields: Mapping[Any, Any], name: str) -> str | None:
    raw = fields.get(name.encode(), fields.get(name))
    if raw is None:
        return None
    if isinstance(raw, bytes):
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise TickError("bad_encoding", f"{name} is not UTF-8") from None
    return str(raw)


def decode_tick(
    entry_id: str,
    fields: Mapping[Any, Any],
    *,
    positive: bool | None = None,
    limits: TickLimits = DEFAULT_LIMITS,
) -> Tick:
    """Validate one stream entry's fields (bytes or str keys) into a :class:`Tick`.

    ``positive`` (default: ``limits.positive``) refuses prices <= 0 (a normalised model divides
    by the window's first price). Unknown fields are ignored, as the contract says, unless the
    entry is oversized.
    """
    if len(fields) > MAX_FIELDS:
        raise TickError("oversized", f"{len(fields)} fields, at most {MAX_FIELDS}")
    for key, value in fields.items():
        size = len(key) + (len(value) if isinstance(value, bytes | str) else 0)
        if size > MAX_FIELD_BYTES:
            raise TickError("oversized", f"a field of {size} bytes, at most {MAX_FIELD_BYTES}")
    symbol = _text(fields, "symbol")
    if symbol is None or symbol == "":
        raise TickError("missing_symbol", "no symbol field")
    if not SYMBOL_RE.fullmatch(symbol):
        raise TickError("bad_symbol", f"{symbol[:80]!r} is not 1-64 of A-Z a-z 0-9 . _ : -")
    price_text = _text(fields, "price")
    if price_text is None or price_text == "":
        raise TickError("missing_price", "no price field")
    price = parse_price(
        price_text, positive=limits.positive if positive is None else positive, limits=limits
    )
    ts_text = _text(fields, "ts")
    ts: int | None = None
    if ts_text is not None and ts_text != "":
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
    return Tick(id=entry_id, symbol=symbol, price=price, ts=ts)


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


def encode_tick(symbol: str, price: float, ts: int | None = None) -> dict[str, str]:
    """Fields for XADD to the ticks stream (what ``streamcast replay`` sends)."""
    fields = {"symbol": symbol, "price": repr(float(price))}
    if ts is not None:
        fields["ts"] = str(int(ts))
    return fields


def encode_forecast(
    tick: Tick,
    next_price: float | None,
    path: Sequence[float] | None,
    model: str,
    now_ms: int,
    *,
    reason: str | None = None,
) -> dict[str, str]:
    """Fields of one forecast entry (its id is the tick's id, set by the caller).

    ``next_price`` None: the model's output was not finite, so the entry has no ``next`` and a
    ``reason`` saying why (likewise a path that is not finite is left out); a forecast never
    carries NaN or infinity.
    """
    fields = {
        "tick_id": tick.id,
        "symbol": tick.symbol,
        "price": repr(tick.price),
        "model": model,
        "ts": str(now_ms),
    }
    if next_price is not None and math.isfinite(next_price):
        fields["next"] = repr(float(next_price))
    if tick.ts is not None:
        fields["tick_ts"] = str(tick.ts)
    if path is not None:
        fields["path"] = json.dumps([round(float(v), 10) for v in path], allow_nan=False)
    if reason:
        fields["reason"] = reason
    return fields


def encode_dead_letter(
    entry_id: str, reason: str, detail: str, original: Mapping[Any, Any]
) -> dict[Any, Any]:
    """Fields of one dead letter: the reason, the detail, the tick's id and the original fields,
    each cut to ``DEAD_FIELD_BYTES`` (its full size in ``size:{name}``), at most ``DEAD_FIELDS`` of
    them (``fields`` then says how many there were): a hostile entry cannot grow the dead
    stream by more than a few kilobytes."""
    letter: dict[Any, Any] = {
        b"reason": reason.encode(),
        b"detail": detail.encode("utf-8", "replace")[:512],
        b"tick_id": entry_id.encode(),
    }
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


def decode_forecast(fields: Mapping[Any, Any]) -> dict[str, Any]:
    """A forecast entry's fields as Python values (``path`` parsed, numbers as floats)."""
    text = {
        (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
        for k, v in fields.items()
    }
    out: dict[str, Any] = dict(text)
    for key in ("price", "next"):
        if key in out:
            out[key] = float(out[key])
    for key in ("ts", "tick_ts"):
        if key in out:
            out[key] = int(out[key])
    if "path" in out:
        out["path"] = json.loads(out["path"])
    return out


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
        name = stream.decode() if isinstance(stream, bytes) else str(stream)
        if (
            entries
            and isinstance(entries[0], list | tuple)
            and len(entries) == 1
            and _nested(entries)
        ):
            entries = entries[0]
        for entry_id, fields in entries:
            eid = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
            out.append((name, eid, dict(fields) if fields else {}))
    return out


def _nested(entries: Any) -> bool:
    # RESP3 in some client versions wraps the entry list once more: [[(id, fields), ...]]
    first = entries[0]
    return bool(first) and isinstance(first[0], list | tuple)


def id_key(entry_id: str) -> tuple[int, int]:
    """A stream id as a sortable (ms, seq) pair."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)
