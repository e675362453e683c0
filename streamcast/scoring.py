"""Forecasts scored against their truth and against the naive forecast, from plain numbers.

The naive forecast is "no change": the next value is the last observed one, and every step of a
path is the path's origin. The skill ``1 - MSE_model / MSE_naive`` compares the two on the same
points: above 0 the model beats "no change", at or below 0 it does not.

One module for both uses: ``streamcast evaluate``, ``train`` and the retrain child score arrays
offline (:func:`scores`, :func:`model_and_naive_mse`), and the daemon's skill tracker scores each
forecast when its tick arrives (:func:`relative_errors`, :class:`RollingErrors`). Nothing here
knows where the numbers came from.
"""

from __future__ import annotations

from collections import deque
from typing import Any, NamedTuple, overload

import numpy as np


def skill(model_mse: float, naive_mse: float) -> float:
    """``1 - model_mse / naive_mse``; NaN when the naive forecast is exact (no variation)."""
    return float(1.0 - model_mse / naive_mse) if naive_mse > 0 else float("nan")


def scores(true: np.ndarray, forecast: np.ndarray, last: np.ndarray) -> dict[str, float]:
    """MSE, MAE, MAPE (%) and direction accuracy of ``forecast`` for ``true``.

    ``last`` is the last observed value each forecast was made from; direction accuracy is the
    share of points where ``sign(forecast - last) == sign(true - last)``. MAPE skips true values
    of zero (it is undefined there) and is meaningless for series that cross zero.
    """
    true, forecast, last = (np.asarray(a, dtype=np.float64).ravel() for a in (true, forecast, last))
    err = forecast - true
    nonzero = true != 0
    mape = (
        float(np.mean(np.abs(err[nonzero] / true[nonzero])) * 100)
        if nonzero.any()
        else float("nan")
    )
    return {
        "mse": float(np.mean(err**2)),
        "mae": float(np.mean(np.abs(err))),
        "mape": mape,
        "direction_accuracy": float(np.mean(np.sign(forecast - last) == np.sign(true - last))),
        "n": int(true.size),
    }


def mse_by_step(true_paths: np.ndarray, paths: np.ndarray) -> np.ndarray:
    """The MSE at each step of forecast paths (n_paths, steps) against the true paths."""
    return np.asarray(np.mean((paths - true_paths) ** 2, axis=0), dtype=np.float64)


@overload
def relative_errors(forecast: float, truth: float, origin: float) -> tuple[float, float]: ...


@overload
def relative_errors(
    forecast: np.ndarray, truth: np.ndarray, origin: np.ndarray
) -> tuple[np.ndarray, np.ndarray]: ...


def relative_errors(forecast: Any, truth: Any, origin: Any) -> tuple[Any, Any]:
    """(model error, naive error) as fractions of the origin price (numbers or arrays).

    The forecast was made from ``origin`` (the last price seen); the naive forecast is
    ``origin`` itself. Dividing by the origin makes symbols at different price levels weigh
    alike; an origin of exactly 0 (a model that is not normalised) leaves the errors in price
    units rather than dividing by zero.
    """
    scale = abs(origin) + (origin == 0)
    return (forecast - truth) / scale, (origin - truth) / scale


def model_and_naive_mse(
    forecast: np.ndarray, truth: np.ndarray, last: np.ndarray, *, relative: bool
) -> tuple[float, float]:
    """(model, naive) 1-step MSE of ``forecast`` for ``truth``, each made from ``last``.

    ``relative`` scores errors relative to the last price (:func:`relative_errors`), so that
    symbols at different price levels weigh alike; otherwise errors are in price units.
    """
    forecast, truth, last = (np.asarray(a, dtype=np.float64) for a in (forecast, truth, last))
    if relative:
        model_err, naive_err = relative_errors(forecast, truth, last)
    else:
        model_err, naive_err = forecast - truth, last - truth
    return float(np.mean(model_err**2)), float(np.mean(naive_err**2))


class RollingScores(NamedTuple):
    """Scores of the forecasts in a :class:`RollingErrors` and of the naive ones on their ticks."""

    mse: float
    naive_mse: float
    mae: float
    naive_mae: float
    n: int

    @property
    def skill(self) -> float:
        return skill(self.mse, self.naive_mse)


class RollingErrors:
    """The errors of the newest ``size`` scored forecasts, each with the naive forecast's error."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._errors: deque[tuple[float, float]] = deque(maxlen=size)

    def __len__(self) -> int:
        return len(self._errors)

    def add(self, model_err: float, naive_err: float) -> None:
        self._errors.append((model_err, naive_err))

    def scores(self) -> RollingScores | None:
        """MSE and MAE of the model and of the naive forecast over the errors; None when empty."""
        if not self._errors:
            return None
        errs = np.asarray(self._errors)
        mse = np.mean(errs**2, axis=0)
        mae = np.mean(np.abs(errs), axis=0)
        return RollingScores(
            float(mse[0]), float(mse[1]), float(mae[0]), float(mae[1]), len(self._errors)
        )
