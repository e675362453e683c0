"""The tutorial's three ways to predict, scored in price space against the naive forecast.

* ``point``: every test window predicts its next value from true data (1 step ahead).
* ``full``: one rollout from the first test window for the whole test span.
* ``multiple``: a rollout of ``horizon`` steps from every ``horizon``-th test window.

Every score comes with the naive forecast's (next = last observed value) over the same points and
the skill ``1 - MSE_model / MSE_naive`` (:mod:`streamcast.scoring`): above 0 the model beats "no
change", at or below 0 it does not, however good a plot looks.

``point`` and ``multiple`` forecasts also get prediction intervals (:mod:`streamcast.intervals`),
calibrated online through the test span in time order as the daemon would: each forecast's band
is made before its truth is seen, and its scores are learnt once they are. Their empirical
coverage and width per level and horizon are ``Evaluation.intervals``. ``full`` gets none: its
one path is made before any truth is seen.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from streamcast.engine import Engine
from streamcast.intervals import Calibrator, IntervalConfig, level_key, price_scale
from streamcast.scoring import model_and_naive_mse, mse_by_step, scores, skill

MODES = ("point", "full", "multiple")


@dataclass
class Evaluation:
    """Forecasts of one mode plus their scores; ``starts`` index the test windows used."""

    mode: str
    truth: np.ndarray  # (N,) the true series over the test span, in price space
    starts: np.ndarray  # positions in ``truth`` where each forecast path begins
    paths: np.ndarray  # (n_paths, steps) forecasts in price space
    metrics: dict[str, Any] = field(default_factory=dict)
    # per level: the (lo, hi) bands, each shaped like ``paths``; empty for ``full``
    bands: dict[float, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    intervals: dict[str, Any] = field(default_factory=dict)  # coverage and width of the bands


def evaluate(
    predictor: Engine, test_windows: np.ndarray, mode: str, horizon: int = 50
) -> Evaluation:
    """Run one mode over ordered test windows (N, seq_len + 1) in price space and score it."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    test_windows = np.asarray(test_windows, dtype=np.float64)
    n = len(test_windows)
    if n == 0:
        raise ValueError("no test windows to evaluate")
    inputs = test_windows[:, :-1]
    truth = test_windows[:, -1]  # truth[i] is the value right after window i's inputs
    last = inputs[:, -1]

    if mode == "point":
        forecast = predictor.predict_next(inputs)
        starts = np.arange(n)
        paths = forecast[:, None]
        model = scores(truth, forecast, last)
        naive = scores(truth, last, last)
        metrics: dict[str, Any] = {"model": model, "naive": naive}
    else:
        steps = n if mode == "full" else horizon
        starts = np.array([0]) if mode == "full" else np.arange(0, n - horizon + 1, horizon)
        if len(starts) == 0:
            raise ValueError(f"{n} test windows are fewer than one {horizon}-step horizon")
        paths = predictor.rollout(inputs[starts], steps=steps)
        true_paths = np.stack([truth[s : s + steps] for s in starts])
        origin = last[starts][:, None]
        naive_paths = np.broadcast_to(origin, true_paths.shape)
        model = scores(true_paths, paths, np.broadcast_to(origin, true_paths.shape))
        naive = scores(true_paths, naive_paths, naive_paths)
        metrics = {"model": model, "naive": naive}
        k = min(steps, horizon)
        model_by_h = mse_by_step(true_paths[:, :k], paths[:, :k])
        naive_by_h = mse_by_step(true_paths[:, :k], naive_paths[:, :k])
        metrics["by_horizon"] = {
            "step": list(range(1, k + 1)),
            "model_mse": [float(v) for v in model_by_h],
            "naive_mse": [float(v) for v in naive_by_h],
            "skill": [skill(m, v) for m, v in zip(model_by_h, naive_by_h, strict=True)],
        }
        metrics["paths"] = len(starts)
    metrics["skill"] = skill(model["mse"], naive["mse"])
    metrics["mode"] = mode
    result = Evaluation(mode=mode, truth=truth, starts=starts, paths=paths, metrics=metrics)
    if mode != "full":
        true_paths = np.stack([truth[s : s + paths.shape[1]] for s in starts])
        result.bands, result.intervals = online_intervals(inputs[starts], paths, true_paths)
    return result


def online_intervals(
    windows: np.ndarray, paths: np.ndarray, true_paths: np.ndarray
) -> tuple[dict[float, tuple[np.ndarray, np.ndarray]], dict[str, Any]]:
    """Bands for forecast paths (n, steps) made in this order from ``windows`` (n, seq_len),
    each before the truths of the ones before it are learnt, and the bands' coverage of
    ``true_paths`` and mean width per level (keyed as on the wire) and horizon."""
    n, steps = paths.shape
    calibrator = Calibrator(IntervalConfig(horizons=steps))
    price, vol = windows[:, -1], calibrator.volatility(windows)
    lo = {level: np.full_like(paths, np.nan) for level in calibrator.levels}
    hi = {level: np.full_like(paths, np.nan) for level in calibrator.levels}
    horizons = np.arange(1, steps + 1)
    for i in range(n):
        row = slice(i, i + 1)
        for level, band in calibrator.bands(
            price[row], paths[row, 0], paths[row], vol[row]
        ).items():
            assert band.path_lo is not None and band.path_hi is not None
            lo[level][i], hi[level][i] = band.path_lo[0], band.path_hi[0]
        calibrator.update(horizons, calibrator.score(paths[i], true_paths[i], price[i], vol[i]))
    summary: dict[str, Any] = {
        "method": "log-score quantile tracker, volatility-scaled where that narrows the band"
    }
    for level in calibrator.levels:
        width = hi[level] - lo[level]
        covered = (lo[level] <= true_paths) & (true_paths <= hi[level])
        summary[level_key(level)] = {
            "horizon": horizons.tolist(),
            "coverage": np.mean(covered, axis=0).tolist(),
            "mean_width": np.mean(width, axis=0).tolist(),
            "mean_relative_width": np.mean(width / price_scale(price)[:, None], axis=0).tolist(),
            "n": n,
        }
    return {level: (lo[level], hi[level]) for level in calibrator.levels}, summary


def holdout_mse(predictor: Engine, windows: np.ndarray, relative: bool) -> tuple[float, float]:
    """(model, naive) 1-step MSE over windows (N, seq_len + 1), the last value the truth.

    ``relative`` divides each error by the last observed price (see
    :func:`streamcast.scoring.model_and_naive_mse`); otherwise errors are in price units.
    """
    windows = np.asarray(windows, dtype=np.float64)
    inputs, truth = windows[:, :-1], windows[:, -1]
    return model_and_naive_mse(
        predictor.predict_next(inputs), truth, inputs[:, -1], relative=relative
    )
