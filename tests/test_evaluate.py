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


class Naive:
    """ "No change": next = last, every step of a path the last price."""

    seq_len = 50

    def predict_next(self, prices: np.ndarray) -> np.ndarray:
        return prices[:, -1].copy()

    def rollout(self, prices: np.ndarray, steps: int = 50) -> np.ndarray:
        return np.repeat(prices[:, -1:], steps, axis=1)


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


def test_point_and_multiple_modes_get_bands_calibrated_online_and_full_gets_none():
    result = evaluate(LinearOracle(), LINE, "point")
    assert set(result.bands) == {0.8, 0.95}
    for key in ("80", "95"):
        summary = result.intervals[key]
        # exact forecasts: every band covers, the tracked ones (after 50 warm-up scores) tiny
        assert summary["horizon"] == [1] and summary["n"] == 250
        assert summary["coverage"] == [1.0] and summary["mean_width"][0] > 0
    lo, hi = result.bands[0.8]
    assert lo.shape == result.paths.shape and np.all(hi - lo > 0)
    assert np.all((hi - lo)[60:] < 1e-3 * (hi - lo)[:50].min())  # past the warm-up
    multiple = evaluate(LinearOracle(), LINE, "multiple", horizon=50)
    assert multiple.bands[0.95][0].shape == (5, 50)
    assert len(multiple.intervals["95"]["coverage"]) == 50 and multiple.intervals["95"]["n"] == 5
    full = evaluate(LinearOracle(), LINE, "full")
    assert full.bands == {} and full.intervals == {}


def test_online_bands_cover_a_random_walk_at_their_levels():
    rng = np.random.default_rng(0)
    walk = make_windows(100 * np.exp(np.cumsum(rng.normal(0, 0.01, 3050))))  # 3000 windows
    intervals = evaluate(Naive(), walk, "point").intervals
    assert intervals["80"]["coverage"][0] == pytest.approx(0.80, abs=0.02)
    assert intervals["95"]["coverage"][0] == pytest.approx(0.95, abs=0.015)
    # the 95% band of a 1% random walk: about 2 x 1.96 x 1% of the price
    assert intervals["95"]["mean_relative_width"][0] == pytest.approx(0.039, rel=0.15)
    multiple = evaluate(Naive(), walk, "multiple", horizon=10).intervals  # 300 paths
    assert np.mean(multiple["80"]["coverage"]) == pytest.approx(0.8, abs=0.04)
    widths = multiple["80"]["mean_width"]
    assert widths[9] / widths[0] == pytest.approx(np.sqrt(10), rel=0.25)


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
