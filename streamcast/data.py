"""Series files, windows, normalisation and the project's own synthetic series.

Everything here is numpy only: importing it never loads TensorFlow.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SEQ_LEN = 50
"""Input length of every window (the tutorial's sequence length); a window is SEQ_LEN + 1 long."""


class DataError(ValueError):
    """A series file or array that cannot be used, with the reason (and file and line) in the text."""


Rows = list[tuple[int, list[str]]]
"""The non-blank rows of a CSV file: (line number, cells)."""


def read_rows(path: Path) -> Rows:
    """The non-blank rows of a CSV file with their line numbers; DataError naming the file if it
    cannot be read as text or holds nothing."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, not a CSV file") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not a text file ({exc.reason} at byte {exc.start})") from None
    rows = [
        (n, row)
        for n, row in enumerate(csv.reader(text.splitlines()), start=1)
        if any(cell.strip() for cell in row)
    ]
    if not rows:
        raise DataError(f"{path}: the file is empty")
    return rows


def load_series(path: str | Path, column: str | None = None) -> np.ndarray:
    """Read one price series from a CSV file as float64.

    Two kinds of file are accepted: a bare single column of numbers (optionally under a one-word
    header line), as in the tutorial's data sets, or a headed CSV with several columns, where
    ``column`` picks the series (default ``Close`` when the file has one).
    """
    path = Path(path)
    rows = read_rows(path)
    body, index = _series_column(path, rows, column)
    values = _column_values(path, body, index)
    if len(values) < SEQ_LEN + 1:
        raise DataError(
            f"{path}: {len(values)} values, fewer than one window of {SEQ_LEN + 1} "
            f"({SEQ_LEN} inputs and a target)"
        )
    return values


def _series_column(path: Path, rows: Rows, column: str | None) -> tuple[Rows, int]:
    """The data rows (without any header line) and the index of the series' column in them."""
    first_line, header = rows[0]
    if all(is_number(cell) for cell in header):  # no header line: a bare column of numbers
        if column is not None:
            raise DataError(f"{path}: asked for column {column!r} but the file has no header line")
        if len(header) != 1:
            raise DataError(
                f"{path}, line {first_line}: {len(header)} values and no header line; "
                "a headerless file must have one value per line"
            )
        return rows, 0
    names = [cell.strip() for cell in header]
    if len(names) == 1:
        if column is not None and column != names[0]:
            raise DataError(f"{path}: no column {column!r}; the file has one column: {names[0]!r}")
        return rows[1:], 0
    wanted = column if column is not None else ("Close" if "Close" in names else None)
    if wanted is None:
        raise DataError(
            f"{path}: several columns and no 'Close'; choose one with --column "
            f"(columns: {', '.join(names)})"
        )
    if wanted not in names:
        raise DataError(f"{path}: no column {wanted!r} (columns: {', '.join(names)})")
    return rows[1:], names.index(wanted)


def _column_values(path: Path, body: Rows, index: int) -> np.ndarray:
    """Column ``index`` of every row as float64; DataError naming the line of a bad value."""
    values = np.empty(len(body), dtype=np.float64)
    for i, (line, row) in enumerate(body):
        if index >= len(row):
            raise DataError(f"{path}, line {line}: {len(row)} fields, column {index + 1} missing")
        cell = row[index].strip()
        try:
            value = float(cell)
        except ValueError:
            raise DataError(f"{path}, line {line}: not a number: {cell[:40]!r}") from None
        if not math.isfinite(value):
            raise DataError(f"{path}, line {line}: {cell!r} is not a finite number")
        values[i] = value
    return values


def is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def make_windows(series: np.ndarray, seq_len: int = SEQ_LEN) -> np.ndarray:
    """All windows of length ``seq_len + 1`` shifted by one: shape (len - seq_len, seq_len + 1).

    The windows are a read-only view of ``series``: no copy is made.
    """
    series = np.asarray(series, dtype=np.float64)
    if series.ndim != 1:
        raise DataError(f"expected a 1-D series, got shape {series.shape}")
    if len(series) < seq_len + 1:
        raise DataError(f"{len(series)} values, fewer than one window of {seq_len + 1}")
    return np.lib.stride_tricks.sliding_window_view(series, seq_len + 1)


def normalise_windows(windows: np.ndarray) -> np.ndarray:
    """Each window divided by its own first value, minus one: ``n_i = p_i / p_0 - 1``."""
    windows = np.asarray(windows, dtype=np.float64)
    first = windows[..., :1]
    if np.any(first <= 0):
        bad = int(np.argmax(first.reshape(-1) <= 0))
        raise DataError(
            f"window {bad} starts at {first.reshape(-1)[bad]!r}: normalisation divides by the "
            "first value of each window, which must be > 0"
        )
    return windows / first - 1.0


def denormalise(normalised: np.ndarray, first: np.ndarray) -> np.ndarray:
    """Inverse of :func:`normalise_windows`: ``p_i = p_0 (n_i + 1)``; ``first`` broadcasts."""
    return np.asarray(first, dtype=np.float64) * (np.asarray(normalised, dtype=np.float64) + 1.0)


@dataclass(frozen=True)
class Split:
    """Windows split as in the tutorial: the first part for training, shuffled; the rest in order."""

    train: np.ndarray
    test: np.ndarray


def train_count(n_windows: int, train_fraction: float) -> int:
    """How many of ``n_windows`` ordered windows come before the test split (rounded down)."""
    return int(n_windows * train_fraction)


def held_out_windows(windows: np.ndarray, train_fraction: float) -> np.ndarray:
    """The windows after the first ``train_fraction`` (those :func:`split_windows` tests on), in
    order; empty when there are none. Unlike ``split_windows``, neither copies nor shuffles."""
    return windows[train_count(len(windows), train_fraction) :]


def split_windows(windows: np.ndarray, train_fraction: float = 0.9, seed: int = 0) -> Split:
    """The first ``train_fraction`` of the windows, shuffled with ``seed``; the rest kept in order."""
    if not 0.0 < train_fraction < 1.0:
        raise DataError(f"train_fraction must be between 0 and 1, got {train_fraction}")
    n_train = train_count(len(windows), train_fraction)
    if n_train == 0 or n_train == len(windows):
        raise DataError(f"{len(windows)} windows are too few to split {train_fraction:.0%} / rest")
    train = np.array(windows[:n_train])
    np.random.default_rng(seed).shuffle(train)
    return Split(train=train, test=np.array(windows[n_train:]))


def xy(
    windows: np.ndarray, normalise: bool, residual: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Model inputs (N, seq_len, 1) float32 and targets (N, 1) float32 from windows.

    With ``residual`` the target is the change from the window's last input value, so a model
    that outputs zero is exactly the naive forecast (next = last).
    """
    w = normalise_windows(windows) if normalise else np.asarray(windows, dtype=np.float64)
    target = w[:, -1:] - w[:, -2:-1] if residual else w[:, -1:]
    return w[:, :-1, None].astype(np.float32), target.astype(np.float32)


def sine_series(n: int = 5001, step: float = 0.01, start: float = 1.0) -> np.ndarray:
    """The tutorial's sine: amplitude 1, angular frequency 2*pi, ``sin(start + 2*pi*step*t)``."""
    t = np.arange(n, dtype=np.float64)
    return np.sin(start + 2.0 * np.pi * step * t)


def synthetic_prices(
    n_symbols: int,
    n_points: int,
    seed: int = 0,
    *,
    volatility: float = 0.002,
    cycle_amplitude: float = 0.2,
) -> np.ndarray:
    """Deterministic price paths, shape (n_symbols, n_points), all > 0.

    A geometric random walk (log-return sd ``volatility`` per step) times a cycle of relative
    amplitude ``cycle_amplitude`` whose period (30-90 steps) and phase differ per symbol. The walk
    is unpredictable by construction; the cycle is what a model can learn. The cycle dominates
    the walk so that the shipped model, trained on this series, beats the naive forecast on it:
    an LSTM's forecast carries an error of a few tenths of a percent of the price, more than the
    step-to-step change of a calm random walk, so on real prices it need not (see the README).
    """
    if n_symbols < 1 or n_points < 1:
        raise DataError(f"need at least one symbol and one point, got {n_symbols}, {n_points}")
    rng = np.random.default_rng(seed)
    start = rng.uniform(20.0, 500.0, size=(n_symbols, 1))
    steps = rng.normal(0.0, volatility, size=(n_symbols, n_points))
    steps[:, 0] = 0.0
    walk = np.exp(np.cumsum(steps, axis=1))
    period = rng.uniform(30.0, 90.0, size=(n_symbols, 1))
    phase = rng.uniform(0.0, 2.0 * np.pi, size=(n_symbols, 1))
    t = np.arange(n_points, dtype=np.float64)
    cycle = 1.0 + cycle_amplitude * np.sin(2.0 * np.pi * t / period + phase)
    return start * walk * cycle
