from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from streamcast.schema import (
    REASONS,
    Tick,
    TickError,
    decode_forecast,
    decode_tick,
    encode_forecast,
    encode_tick,
    id_key,
    parse_stream_reply,
)


def test_valid_tick_from_bytes_fields():
    tick = decode_tick(
        "1700000000000-1",
        {b"symbol": b"AAPL", b"price": b"101.25", b"ts": b"1700000000000", b"x": b"y"},
    )
    assert tick == Tick(id="1700000000000-1", symbol="AAPL", price=101.25, ts=1700000000000)


def test_valid_tick_without_ts_from_str_fields():
    assert decode_tick("1-0", {"symbol": "BRK.B:US-x_1", "price": "3"}).ts is None


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
        decode_tick("1-0", fields)
    assert info.value.reason == reason
    assert reason in REASONS


def test_zero_price_is_allowed_for_a_raw_value_model():
    assert decode_tick("1-0", {b"symbol": b"S", b"price": b"-0.5"}, positive=False).price == -0.5


@given(
    st.dictionaries(
        st.one_of(st.binary(max_size=20), st.text(max_size=20)), st.binary(max_size=100), max_size=8
    )
)
def test_decoder_never_fails_other_than_with_a_tick_error(fields):
    try:
        tick = decode_tick("1-0", fields)
    except TickError as exc:
        assert exc.reason in REASONS
    else:
        assert tick.price > 0 and 1 <= len(tick.symbol) <= 64


def test_tick_round_trip_through_encode():
    assert decode_tick("2-0", encode_tick("X", 12.5, ts=99)) == Tick("2-0", "X", 12.5, 99)


def test_forecast_encoding_round_trip():
    tick = Tick(id="7-3", symbol="S", price=10.0, ts=5)
    fields = encode_forecast(tick, 10.5, [10.5, 11.0], model="v1", now_ms=9)
    assert json.loads(fields["path"]) == [10.5, 11.0]
    back = decode_forecast({k.encode(): v.encode() for k, v in fields.items()})
    assert back == {
        "tick_id": "7-3",
        "symbol": "S",
        "price": 10.0,
        "next": 10.5,
        "model": "v1",
        "ts": 9,
        "tick_ts": 5,
        "path": [10.5, 11.0],
    }
    assert "path" not in encode_forecast(tick, 10.5, None, model="v1", now_ms=9)


def test_parse_stream_reply_resp2_and_resp3():
    resp2 = [[b"s", [(b"1-0", {b"a": b"1"}), (b"2-0", None)]]]
    resp3 = {b"s": [[(b"1-0", {b"a": b"1"}), (b"2-0", None)]]}
    want = [("s", "1-0", {b"a": b"1"}), ("s", "2-0", {})]
    assert parse_stream_reply(resp2) == want
    assert parse_stream_reply(resp3) == want
    assert parse_stream_reply(None) == [] and parse_stream_reply([]) == []


def test_id_key_orders_numerically():
    assert sorted(["10-0", "9-5", "9-10"], key=id_key) == ["9-5", "9-10", "10-0"]
