from __future__ import annotations

import numpy as np
import pytest

from streamcast.data import make_windows
from streamcast.evaluate import evaluate, holdout_mse


class LinearOracle:
    """Knows the series is a straight line of slope 1: next = last + 1."""

    seq_len = 50

    def predict_next(self, prices: np.ndarray) -> np.ndarray:
        return prices[:, -1] + 1.0

    def rollout(self, prices: np.ndarray, steps: int = 50) -> np.ndarray:
        return prices[:, -1:] + np.arange(1, steps + 1)


LINE = make_windows(np.arange(1.0, 301.0))  # 250 windows, each next value = last + 1


def test_point_mode_scores_model_and_naive():
    result = evaluate(LinearOracle(), LINE, "point")
    m = result.metrics
    assert m["model"]["mse"] == 0.0 and m["model"]["direction_accuracy"] == 1.0
    assert m["naive"]["mse"] == 1.0 and m["naive"]["mae"] == 1.0
    assert m["skill"] == 1.0 and m["model"]["n"] == 250
    np.testing.assert_array_equal(result.paths[:, 0], LINE[:, -1])


def test_multiple_mode_paths_start_every_horizon_and_error_grows_for_naive():
    result = evaluate(LinearOracle(), LINE, "multiple", horizon=50)
    assert list(result.starts) == [0, 50, 100, 150, 200]
    assert result.paths.shape == (5, 50)
    by_h = result.metrics["by_horizon"]
    assert by_h["step"][:3] == [1, 2, 3] and len(by_h["step"]) == 50
    # the naive forecast stays flat, so its error at step h is h^2
    assert by_h["naive_mse"][:3] == [1.0, 4.0, 9.0]
    assert by_h["model_mse"] == [0.0] * 50
    assert result.metrics["paths"] == 5


def test_full_mode_is_one_path_over_the_test_span():
    result = evaluate(LinearOracle(), LINE, "full")
    assert result.paths.shape == (1, 250)
    np.testing.assert_array_equal(result.paths[0], LINE[:, -1])
    assert result.metrics["model"]["mse"] == 0.0


def test_holdout_mse_scores_the_predictor_and_the_naive_forecast_on_the_same_windows():
    windows = make_windows(np.arange(1.0, 61.0) * 10.0, seq_len=4)  # next = last + 10
    # the oracle forecasts last + 1: off by 9; the naive forecast by 10
    assert holdout_mse(LinearOracle(), windows, relative=False) == (81.0, 100.0)
    model, naive = holdout_mse(LinearOracle(), windows, relative=True)
    last = windows[:, -2]
    assert model == pytest.approx(np.mean((9.0 / last) ** 2))
    assert naive == pytest.approx(np.mean((10.0 / last) ** 2))


def test_unknown_mode_and_short_tests_are_refused():
    with pytest.raises(ValueError, match="mode must be one of"):
        evaluate(LinearOracle(), LINE, "sideways")
    with pytest.raises(ValueError, match="fewer than one 50-step horizon"):
        evaluate(LinearOracle(), LINE[:10], "multiple")
