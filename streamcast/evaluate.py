"""The tutorial's three ways to predict, scored in price space against the naive forecast.

* ``point``: every test window predicts its next value from true data (1 step ahead).
* ``full``: one rollout from the first test window for the whole test span.
* ``multiple``: a rollout of ``horizon`` steps from every ``horizon``-th test window.

Every score comes with the naive forecast's (next = last observed value) over the same points and
the skill ``1 - MSE_model / MSE_naive`` (:mod:`streamcast.scoring`): above 0 the model beats "no
change", at or below 0 it does not, however good a plot looks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from streamcast.engine import Engine
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
    return Evaluation(mode=mode, truth=truth, starts=starts, paths=paths, metrics=metrics)


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
