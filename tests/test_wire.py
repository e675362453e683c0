from __future__ import annotations

import json

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from streamcast.wire import (
    DEAD_FIELD_BYTES,
    DEFAULT_LIMITS,
    PRICE_RE,
    REASONS,
    SYMBOL_RE,
    DeadLetter,
    Forecast,
    HistoryEntry,
    Tick,
    TickError,
    id_key,
    parse_stream_reply,
)


def test_valid_tick_from_bytes_fields():
    tick = Tick.decode(
        "1700000000000-1",
        {b"symbol": b"AAPL", b"price": b"101.25", b"ts": b"1700000000000", b"x": b"y"},
    )
    assert tick == Tick(id="1700000000000-1", symbol="AAPL", price=101.25, ts=1700000000000)


def test_valid_tick_without_ts_from_str_fields():
    assert Tick.decode("1-0", {"symbol": "BRK.B:US-x_1", "price": "3"}).ts is None


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({b"price": b"1"}, "missing_symbol"),
        ({b"symbol": b"", b"price": b"1"}, "missing_symbol"),
        ({b"symbol": b"A B", b"price": b"1"}, "bad_symbol"),
        ({b"symbol": b"A" * 65, b"price": b"1"}, "bad_symbol"),
        ({b"symbol": b"A"}, "missing_price"),
        ({b"symbol": b"A", b"price": b"abc"}, "bad_price"),
        ({b"symbol": b"A", b"price": b"nan"}, "non_finite_price"),
        ({b"symbol": b"A", b"price": b"-inf"}, "non_finite_price"),
        ({b"symbol": b"A", b"price": b"0"}, "non_positive_price"),
        ({b"symbol": b"A", b"price": b"-2.5"}, "non_positive_price"),
        ({b"symbol": b"A", b"price": b"1", b"ts": b"yesterday"}, "bad_ts"),
        ({b"symbol": b"A", b"price": b"1", b"ts": b"-5"}, "bad_ts"),
        ({b"symbol": b"A", b"price": b"1" * 65}, "oversized"),
        ({b"symbol": b"A", b"price": b"1", b"blob": b"x" * 5000}, "oversized"),
        ({b"symbol": b"\xff\xfe", b"price": b"1"}, "bad_encoding"),
    ],
)
def test_each_contract_breach_has_its_reason(fields, reason):
    with pytest.raises(TickError) as info:
        Tick.decode("1-0", fields)
    assert info.value.reason == reason
    assert reason in REASONS


def test_zero_price_is_allowed_for_a_raw_value_model():
    assert Tick.decode("1-0", {b"symbol": b"S", b"price": b"-0.5"}, positive=False).price == -0.5


CONTRACT_KEYS = ["symbol", "price", "ts", b"symbol", b"price", b"ts"]


@given(
    st.dictionaries(
        st.one_of(st.sampled_from(CONTRACT_KEYS), st.binary(max_size=20), st.text(max_size=20)),
        st.one_of(
            st.binary(max_size=100),
            st.text(max_size=30),
            st.from_regex(SYMBOL_RE, fullmatch=True),
            st.from_regex(PRICE_RE, fullmatch=True),
        ),
        max_size=8,
    )
)
def test_decoder_never_fails_other_than_with_a_tick_error(fields):
    try:
        tick = Tick.decode("1-0", fields)
    except TickError as exc:
        assert exc.reason in REASONS
    else:
        assert DEFAULT_LIMITS.price_min <= tick.price <= DEFAULT_LIMITS.price_max
        assert SYMBOL_RE.fullmatch(tick.symbol)


# -- valid ticks, generated from the contract, and each way of breaking one ---------------------

ENTRY_MS = st.integers(0, 2**46)


@st.composite
def price_texts(
    draw, low: float = DEFAULT_LIMITS.price_min, high: float = DEFAULT_LIMITS.price_max
):
    """A price in [low, high] as decimal text the contract takes, in its various spellings."""
    value = draw(st.floats(low, high, allow_nan=False, allow_infinity=False))
    style = draw(st.sampled_from(["repr", "fixed", "exponent", "upper", "no_lead", "no_frac"]))
    if style == "repr":
        text = repr(value)
    elif style == "fixed":
        text = f"{value:.6f}"
    elif style == "exponent":
        text = f"{value:.{draw(st.integers(0, 17))}e}"
    elif style == "upper":
        text = f"{value:.8E}".replace("E+", "E")
    elif style == "no_lead":  # ".5"
        text = f"{value:.9f}".removeprefix("0")
    else:  # "12." (a trailing point, no fraction)
        text = f"{round(value):d}."
    assume(low <= float(text) <= high)
    return text


@st.composite
def valid_ticks(draw):
    """(entry id, fields, the tick they decode to): symbols from the contract's pattern, prices
    as decimal text in range, an optional ts no further ahead of the id's time than allowed, a
    few unknown fields; keys and values as bytes or text."""
    ms = draw(ENTRY_MS)
    entry_id = f"{ms}-{draw(st.integers(0, 2**32))}"
    symbol = draw(st.from_regex(SYMBOL_RE, fullmatch=True))
    price = draw(price_texts())
    ts = draw(st.none() | st.integers(0, ms + DEFAULT_LIMITS.ts_max_ahead_ms))
    fields = {"symbol": symbol, "price": price}
    if ts is not None:
        fields["ts"] = str(ts)
    extra = draw(
        st.dictionaries(
            st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=10).filter(
                lambda k: k not in ("symbol", "price", "ts")
            ),
            st.text(max_size=50),
            max_size=3,
        )
    )
    fields.update(extra)
    as_bytes = draw(st.booleans())
    if as_bytes:
        fields = {k.encode(): v.encode() for k, v in fields.items()}
    return entry_id, fields, Tick(entry_id, symbol, float(price), ts)


@given(valid_ticks())
def test_valid_ticks_round_trip(case):
    entry_id, fields, tick = case
    assert Tick.decode(entry_id, fields) == tick
    again = Tick.decode(entry_id, Tick.encode(tick.symbol, tick.price, tick.ts))
    assert again == tick


def _key(fields: dict, name: str) -> str | bytes:
    """The key ``name`` has in ``fields``: bytes or text, as the symbol's key is."""
    if name in fields or name.encode() in fields:
        return name if name in fields else name.encode()
    return name.encode() if b"symbol" in fields else name


def _set(fields: dict, name: str, value: str | bytes) -> dict:
    """``fields`` with ``name`` set to ``value`` (text as the fields are; bytes kept as bytes)."""
    key = _key(fields, name)
    out = {k: v for k, v in fields.items() if k not in (name, name.encode())}
    out[key] = value.encode() if isinstance(key, bytes) and isinstance(value, str) else value
    return out


def _drop(fields: dict, name: str) -> dict:
    return {k: v for k, v in fields.items() if k not in (name, name.encode())}


def _text(fields: dict, name: str) -> str:
    value = fields[_key(fields, name)]
    return value.decode() if isinstance(value, bytes) else value


ARABIC_INDIC = str.maketrans("0123456789", "٠١٢٣٤٥٦٧٨٩")


def mutations(draw, entry_id: str, fields: dict) -> list[tuple[str, dict, str]]:
    """(what, broken fields, the reason they must be refused with) for one valid tick."""
    ms = int(entry_id.split("-")[0])
    price = _text(fields, "price")
    symbol = _text(fields, "symbol")
    spot = draw(st.integers(0, len(price)))
    return [
        ("no symbol", _drop(fields, "symbol"), "missing_symbol"),
        ("empty symbol", _set(fields, "symbol", ""), "missing_symbol"),
        (
            "a character outside the symbol's set",
            _set(fields, "symbol", symbol[:10] + draw(st.sampled_from(" /é*\n")) + symbol[10:]),
            "bad_symbol",
        ),
        ("65 characters", _set(fields, "symbol", (symbol * 65)[:65]), "bad_symbol"),
        ("no price", _drop(fields, "price"), "missing_price"),
        ("empty price", _set(fields, "price", ""), "missing_price"),
        (
            "not decimal text",
            _set(
                fields,
                "price",
                price[:spot] + draw(st.sampled_from(["_", " ", "x", ","])) + price[spot:],
            ),
            "bad_price",
        ),
        ("a leading +", _set(fields, "price", "+" + price), "bad_price"),
        ("surrounding spaces", _set(fields, "price", f" {price} "), "bad_price"),
        ("other digits", _set(fields, "price", price.translate(ARABIC_INDIC)), "bad_price"),
        (
            "not finite",
            _set(
                fields, "price", draw(st.sampled_from(["nan", "inf", "-inf", "Infinity", "1e999"]))
            ),
            "non_finite_price",
        ),
        ("negative", _set(fields, "price", "-" + price), "non_positive_price"),
        (
            "zero",
            _set(fields, "price", draw(st.sampled_from(["0", "0.0", "-0", "0e5"]))),
            "non_positive_price",
        ),
        (
            "too large",
            _set(fields, "price", repr(draw(st.floats(2e9, 1e300)))),
            "price_out_of_range",
        ),
        (
            "too small",
            _set(fields, "price", repr(draw(st.floats(5e-324, 5e-7)))),
            "price_out_of_range",
        ),
        ("over 64 characters", _set(fields, "price", "0" * 65 + price), "oversized"),
        ("a field over 4 kB", _set(fields, "note", "x" * 4097), "oversized"),
        ("65 fields", {**fields, **{f"f{i}": "1" for i in range(65)}}, "oversized"),
        ("symbol not UTF-8", _set(fields, "symbol", b"\xff" + symbol.encode()), "bad_encoding"),
        ("price not UTF-8", _set(fields, "price", price.encode() + b"\xfe"), "bad_encoding"),
        (
            "ts not digits",
            _set(fields, "ts", draw(st.sampled_from(["-5", "1.5", "soon", " 12", "1e3", "١٢"]))),
            "bad_ts",
        ),
        ("ts over 20 digits", _set(fields, "ts", "1" * 21), "bad_ts"),
        (
            "ts too far ahead of the entry's time",
            _set(
                fields, "ts", str(ms + DEFAULT_LIMITS.ts_max_ahead_ms + draw(st.integers(1, 10**9)))
            ),
            "bad_ts",
        ),
    ]


@given(valid_ticks(), st.data())
def test_each_mutation_of_a_valid_tick_is_refused_with_its_reason(case, data):
    entry_id, fields, _ = case
    for what, broken, reason in mutations(data.draw, entry_id, fields):
        with pytest.raises(TickError) as refused:
            Tick.decode(entry_id, broken)
        assert refused.value.reason == reason, (what, broken, refused.value)
        assert reason in REASONS


def test_forecast_encoding_round_trip():
    tick = Tick(id="7-3", symbol="S", price=10.0, ts=5)
    forecast = Forecast.of(tick, "v1", 10.5, [10.5, 11.0])
    fields = forecast.encode(now_ms=9)
    assert json.loads(fields["path"]) == [10.5, 11.0]
    back = Forecast.decode({k.encode(): v.encode() for k, v in fields.items()})
    assert back == Forecast(tick, "v1", 10.5, (10.5, 11.0), published_ms=9)
    assert back.as_dict() == {
        "tick_id": "7-3",
        "symbol": "S",
        "price": 10.0,
        "next": 10.5,
        "model": "v1",
        "ts": 9,
        "tick_ts": 5,
        "path": [10.5, 11.0],
    }
    assert "path" not in Forecast.of(tick, "v1", 10.5).encode(now_ms=9)


def test_forecast_withholds_what_is_not_finite_and_says_why():
    tick = Tick(id="7-3", symbol="S", price=10.0, ts=None)
    forecast = Forecast.of(tick, "v1", float("nan"), [1.0, float("inf")])
    assert (forecast.next, forecast.path) == (None, None)
    assert forecast.reason == "next is not finite; path is not finite"
    assert forecast.path_withheld
    fields = forecast.encode(now_ms=1)
    assert "next" not in fields and "path" not in fields and fields["reason"] == forecast.reason


def test_history_entry_round_trip_and_edge_rules():
    tick = Tick(id="1000-0", symbol="S", price=12.5, ts=990)
    entry = HistoryEntry.of(tick)
    fields = {k.encode(): v.encode() for k, v in entry.encode().items()}
    assert HistoryEntry.decode(b"1000-0", fields, DEFAULT_LIMITS, now_ms=2000) == entry
    with pytest.raises(ValueError, match="future"):
        HistoryEntry.decode("9999999-0", fields, DEFAULT_LIMITS, now_ms=2000)
    with pytest.raises(TickError):
        HistoryEntry.decode("1000-0", {b"price": b"nan"}, DEFAULT_LIMITS, now_ms=2000)
    far = {b"price": b"1", b"ts": str(10**12).encode()}
    assert HistoryEntry.decode("1000-0", far, DEFAULT_LIMITS, now_ms=2000).ts is None


def test_dead_letter_encoding_keeps_reason_and_cuts_fields():
    letter = DeadLetter("5-0", "bad_price", "x", {b"price": b"y" * 1000, b"symbol": b"S"})
    fields = letter.encode()
    assert fields[b"reason"] == b"bad_price" and fields[b"tick_id"] == b"5-0"
    assert len(fields[b"field:price"]) == DEAD_FIELD_BYTES and fields[b"size:price"] == b"1000"


def test_parse_stream_reply_resp2_and_resp3():
    resp2 = [[b"s", [(b"1-0", {b"a": b"1"}), (b"2-0", None)]]]
    resp3 = {b"s": [[(b"1-0", {b"a": b"1"}), (b"2-0", None)]]}
    want = [("s", "1-0", {b"a": b"1"}), ("s", "2-0", {})]
    assert parse_stream_reply(resp2) == want
    assert parse_stream_reply(resp3) == want
    assert parse_stream_reply(None) == [] and parse_stream_reply([]) == []


def test_id_key_orders_numerically():
    assert sorted(["10-0", "9-5", "9-10"], key=id_key) == ["9-5", "9-10", "10-0"]


def test_a_forecasts_bands_round_trip_and_are_withheld_with_what_they_bound():
    from streamcast.wire import Forecast, Tick

    tick = Tick("5-0", "B", 100.0, None)
    bands = {"80": {"next": [99.0, 101.0], "path": [[98.0, 102.0]]}, "95": {"next": [98.5, 101.5]}}
    forecast = Forecast.of(tick, "v", 100.5, [100.2], bands)
    back = Forecast.decode(forecast.encode(1))
    assert back.bands == bands and back.as_dict()["bands"] == bands
    no_path = Forecast.of(tick, "v", 100.5, [float("nan")], bands)
    assert no_path.bands == {"80": {"next": [99.0, 101.0]}, "95": {"next": [98.5, 101.5]}}
    no_next = Forecast.of(tick, "v", float("inf"), [100.2], bands)
    assert no_next.bands == {"80": {"path": [[98.0, 102.0]]}}
    assert "bands" not in Forecast.of(tick, "v", 100.5).encode(1)


def test_bands_that_are_not_a_json_object_are_refused_on_decode():
    from streamcast.wire import Forecast

    fields = {"tick_id": "1-0", "symbol": "A", "price": "1", "bands": "[1, 2]"}
    with pytest.raises(ValueError, match="bands must be a JSON object"):
        Forecast.decode(fields)
