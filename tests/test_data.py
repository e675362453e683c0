from __future__ import annotations

import numpy as np
import pytest

from streamcast.data import (
    DataError,
    denormalise,
    held_out_windows,
    load_series,
    make_windows,
    normalise_windows,
    sine_series,
    split_windows,
    synthetic_prices,
    xy,
)


def test_sine_series_equals_the_tutorials_file(shared_data):
    tutorial = load_series(shared_data / "sinwave.csv")
    ours = sine_series(len(tutorial))
    assert len(tutorial) == 5001
    np.testing.assert_allclose(ours, tutorial, atol=1e-6, rtol=0)


def test_load_bare_column_of_sp500(shared_data):
    series = load_series(shared_data / "sp500.csv")
    assert series.shape == (4171,)
    assert series[0] == pytest.approx(1455.219971)
    assert series.dtype == np.float64


def test_load_bare_column_with_one_word_header(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("price\n" + "\n".join(str(float(i + 1)) for i in range(60)) + "\n")
    series = load_series(path)
    assert series[0] == 1.0 and series[-1] == 60.0 and len(series) == 60


def test_headed_csv_defaults_to_close_and_picks_column(tmp_path):
    path = tmp_path / "ohlc.csv"
    rows = ["Date,Open,High,Low,Close,Volume"]
    rows += [f"2020-01-{i:02d},{i},{i + 2},{i - 1},{i + 1},{1000 + i}" for i in range(1, 61)]
    path.write_text("\n".join(rows) + "\n")
    assert load_series(path)[0] == 2.0
    assert load_series(path, column="Volume")[-1] == 1060.0


def test_headed_csv_without_close_lists_the_columns(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("a,b\n" + "\n".join(f"{i},{i}" for i in range(60)))
    with pytest.raises(DataError, match=r"no 'Close'.*columns: a, b"):
        load_series(path)
    with pytest.raises(DataError, match=r"no column 'c' \(columns: a, b\)"):
        load_series(path, column="c")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "the file is empty"),
        ("\n\n", "the file is empty"),
        ("1.0\n2.0\nabc\n", r"line 3: not a number: 'abc'"),
        ("1.0\nnan\n", r"line 2: 'nan' is not a finite number"),
        ("1.0\ninf\n", r"line 2: 'inf' is not a finite number"),
        ("1.0\n2.0\n", r"2 values, fewer than one window of 51"),
    ],
)
def test_bad_files_name_the_file_and_line(tmp_path, content, message):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(DataError, match=message) as info:
        load_series(path)
    assert str(path) in str(info.value)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_series(tmp_path / "nope.csv")


def test_binary_file_is_a_clear_error(tmp_path):
    path = tmp_path / "b.csv"
    path.write_bytes(b"\xff\xfe\x00garbage\x80")
    with pytest.raises(DataError, match="not a text file"):
        load_series(path)


def test_windows_shift_by_one_and_hold_seq_len_plus_one():
    series = np.arange(100, dtype=float)
    windows = make_windows(series, 50)
    assert windows.shape == (50, 51)
    np.testing.assert_array_equal(windows[0], np.arange(51))
    np.testing.assert_array_equal(windows[-1], np.arange(49, 100))


def test_split_keeps_test_in_order_and_shuffles_train_reproducibly():
    windows = make_windows(np.arange(1, 201, dtype=float), 50)  # 150 windows
    a = split_windows(windows, 0.9, seed=3)
    b = split_windows(windows, 0.9, seed=3)
    assert len(a.train) == 135 and len(a.test) == 15
    np.testing.assert_array_equal(a.train, b.train)
    assert not np.array_equal(a.train, windows[:135])
    np.testing.assert_array_equal(np.sort(a.train[:, 0]), windows[:135, 0])
    np.testing.assert_array_equal(a.test, windows[135:])


def test_held_out_windows_are_the_splits_test_windows_and_may_be_all_or_none():
    windows = make_windows(np.arange(1, 201, dtype=float), 50)  # 150 windows
    for fraction in (0.5, 0.9, 0.95):
        expected = split_windows(windows, fraction).test
        np.testing.assert_array_equal(held_out_windows(windows, fraction), expected)
    assert len(held_out_windows(windows, 0.0)) == 150  # evaluate --train-fraction 0: all of them
    assert len(held_out_windows(windows[:1], 0.9)) == 1
    assert len(held_out_windows(windows, 0.999)) == 1


def test_normalise_and_denormalise_round_trip():
    windows = np.array([[2.0, 3.0, 1.0], [10.0, 10.0, 12.0]])
    n = normalise_windows(windows)
    np.testing.assert_allclose(n, [[0.0, 0.5, -0.5], [0.0, 0.0, 0.2]])
    np.testing.assert_allclose(denormalise(n, windows[:, :1]), windows)


@pytest.mark.parametrize("first", [0.0, -1.0])
def test_normalise_refuses_a_first_value_at_or_below_zero(first):
    with pytest.raises(DataError, match=r"window 1 starts at .*must be > 0"):
        normalise_windows(np.array([[1.0, 2.0], [first, 1.0]]))


def test_xy_shapes_and_targets():
    windows = make_windows(np.arange(1, 61, dtype=float), 50)
    x, y = xy(windows, normalise=True)
    assert x.shape == (10, 50, 1) and y.shape == (10, 1) and x.dtype == np.float32
    assert x[0, 0, 0] == 0.0
    assert y[0, 0] == pytest.approx(51 / 1 - 1)


def test_synthetic_prices_are_deterministic_distinct_and_positive():
    a = synthetic_prices(5, 400, seed=7)
    b = synthetic_prices(5, 400, seed=7)
    c = synthetic_prices(5, 400, seed=8)
    assert a.shape == (5, 400)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    assert (a > 0).all()
    assert len({round(float(row[-1]), 6) for row in a}) == 5


def test_xy_residual_targets_are_the_change_from_the_last_input():
    from streamcast.data import xy

    windows = np.array([[1.0, 2.0, 4.0], [2.0, 3.0, 2.0]])
    x, y = xy(windows, normalise=False, residual=True)
    np.testing.assert_allclose(y[:, 0], [2.0, -1.0])
    np.testing.assert_allclose(x[:, :, 0], [[1.0, 2.0], [2.0, 3.0]])
    _, yn = xy(windows, normalise=True, residual=True)
    np.testing.assert_allclose(yn[:, 0], [2.0, -0.5])  # (4/1 - 1) - (2/1 - 1); (2/2-1) - (3/2-1)
