"""History imports by the live edge's price rules, on a real redis-server.

One bad price imported into a history made every retrain that reads it fail; the import now
refuses the file, naming the file, the line and the problem, and writes nothing.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from redis import Redis as SyncRedis

from streamcast.cli import main
from streamcast.history import (
    HistoryError,
    clean_series,
    import_series,
    load_prices,
    valid_prices,
)
from streamcast.keys import Keys
from streamcast.wire import TickError, TickLimits, check_price

HOSTILE = {
    "0": "non_positive_price",
    "-5": "non_positive_price",
    "nan": "non_finite_price",
    "inf": "non_finite_price",
    "1e-320": "price_out_of_range",
    "1e300": "price_out_of_range",
    "+5": "bad_price",
    " 5": "bad_price",
    "1_000": "bad_price",
    "5 ": "bad_price",
    "abc": "bad_price",
    "١٢": "bad_price",  # Arabic-Indic digits: float() takes them, the wire contract does not
}


HISTORY_S = Keys("imp").history("S")  # where `history import --symbol S` writes (prefix imp)


@pytest.fixture
def cli_env(redis_server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("STREAMCAST_REDIS_URL", redis_server.url)
    monkeypatch.setenv("STREAMCAST_KEY_PREFIX", "imp")
    with SyncRedis(port=redis_server.port) as raw:
        yield raw


def price_file(path, bad: str | None, *, at: int = 31, header: str | None = None, n: int = 60):
    """``n`` good prices, one per line, with ``bad`` on line ``at`` (counting the header)."""
    lines = [f"{100 + i * 0.25:.2f}" for i in range(n)]
    if header is not None:
        lines = [f"d{i},{p}" for i, p in enumerate(lines)]
        lines.insert(0, header)
    if bad is not None:
        lines[at - 1] = f"d,{bad}" if header is not None else bad
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize(("bad", "reason"), HOSTILE.items(), ids=list(HOSTILE))
def test_history_import_refuses_a_file_with_one_bad_price_and_writes_nothing(
    cli_env, tmp_path, capsys, bad, reason
):
    path = price_file(tmp_path / "prices.csv", bad)
    assert main(["history", "import", str(path), "--symbol", "S"]) == 2
    err = capsys.readouterr().err
    assert f"streamcast history: error: {path}, line 31: {reason}:" in err, err
    assert "Traceback" not in err
    assert cli_env.keys("*") == [], "nothing was written"


def test_history_import_names_the_line_of_a_headed_csv(cli_env, tmp_path, capsys):
    path = price_file(tmp_path / "ohlc.csv", "0", at=12, header="Date,Close")
    assert main(["history", "import", str(path), "--symbol", "S"]) == 2
    err = capsys.readouterr().err
    assert f"{path}, line 12: non_positive_price: '0' <= 0 for a normalised model" in err
    assert cli_env.keys("*") == []


def test_history_import_of_a_clean_file_keeps_every_price(cli_env, tmp_path, capsys):
    path = price_file(tmp_path / "prices.csv", None, n=60)
    assert main(["history", "import", str(path), "--symbol", "S"]) == 0
    assert "imported 60 prices" in capsys.readouterr().out
    entries = cli_env.xrange(HISTORY_S)
    assert [float(f[b"price"]) for _, f in entries] == [100 + i * 0.25 for i in range(60)]


def test_history_import_allows_non_positive_prices_only_when_asked(cli_env, tmp_path, capsys):
    path = price_file(tmp_path / "prices.csv", "-5")
    args = ["history", "import", str(path), "--symbol", "S", "--allow-non-positive"]
    assert main(args) == 0
    assert float(cli_env.xrange(HISTORY_S)[30][1][b"price"]) == -5.0
    # the rest of the rules still hold
    path = price_file(tmp_path / "prices.csv", "1e300")
    assert main([*args, "--replace"]) == 2
    assert (
        "line 31: price_out_of_range: '1e300' is outside [-1e+09, 1e+09]" in capsys.readouterr().err
    )
    assert cli_env.xlen(HISTORY_S) == 60, "the refused file replaced nothing"


async def test_import_series_refuses_a_bad_value_and_writes_nothing(redis_client):
    keys = Keys("imp-api")
    prices = 100 + np.arange(10.0)
    prices[4] = 1e-320
    with pytest.raises(HistoryError, match=r"value 5 of 10: price_out_of_range: 1e-320"):
        await import_series(redis_client, keys, "S", prices, maxlen=100)
    assert await redis_client.keys("*") == []
    prices[4] = -1.0
    with pytest.raises(HistoryError, match="value 5 of 10: non_positive_price"):
        await import_series(redis_client, keys, "S", prices, maxlen=100)
    limits = TickLimits(positive=False)
    assert await import_series(redis_client, keys, "S", prices, maxlen=100, limits=limits) == 10


def test_load_prices_reads_what_the_edge_accepts(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("Close\n1e-3\n100.25\n\n1E+2\n.5\n", encoding="utf-8")
    assert load_prices(path).tolist() == [1e-3, 100.25, 100.0, 0.5]
    path.write_text("Date,Open,Close\nd0,1,2\nd1,3,-0\n", encoding="utf-8")
    assert load_prices(path, "Open").tolist() == [1.0, 3.0]
    with pytest.raises(HistoryError, match=r"p\.csv, line 3: non_positive_price: '-0'"):
        load_prices(path)


@pytest.mark.parametrize("positive", [True, False])
def test_the_vectorised_check_agrees_with_check_price(positive):
    values = [0.0, -0.0, -5.0, 5.0, 1e-320, 1e-7, 1e-6, 1e9, 1e9 * 1.000001, -1e9, -2e9]
    values += [math.nan, math.inf, -math.inf, 1e300, -1e300, 123.456]
    limits = TickLimits(positive=positive)
    accepted = []
    for value in values:
        try:
            check_price(value, limits=limits)
            accepted.append(True)
        except TickError:
            accepted.append(False)
    assert valid_prices(np.array(values), limits=limits).tolist() == accepted
    kept, reasons = clean_series(np.array(values), limits=limits)
    assert kept.tolist() == [v for v, ok in zip(values, accepted, strict=True) if ok]
    assert sum(reasons.values()) == accepted.count(False)
