"""The scoring arithmetic shared by evaluate, train, the retrain child and the online tracker."""

from __future__ import annotations

import math

import numpy as np
import pytest

from streamcast.scoring import (
    RollingErrors,
    model_and_naive_mse,
    mse_by_step,
    relative_errors,
    scores,
    skill,
)


def test_skill_is_one_minus_the_mse_ratio_and_nan_when_the_naive_forecast_is_exact():
    assert skill(1.0, 4.0) == 0.75
    assert skill(4.0, 4.0) == 0.0
    assert skill(8.0, 4.0) == -1.0
    assert math.isnan(skill(1.0, 0.0)) and math.isnan(skill(0.0, 0.0))


def test_scores_values():
    s = scores(np.array([2.0, 4.0]), np.array([3.0, 3.0]), np.array([1.0, 5.0]))
    assert s["mse"] == 1.0 and s["mae"] == 1.0 and s["n"] == 2
    assert s["mape"] == pytest.approx((0.5 + 0.25) / 2 * 100)
    assert s["direction_accuracy"] == 1.0


def test_mape_skips_zero_truths_and_is_nan_without_any():
    s = scores(np.array([0.0, 2.0]), np.array([1.0, 3.0]), np.array([0.0, 2.0]))
    assert s["mape"] == pytest.approx(50.0)
    assert math.isnan(scores(np.zeros(2), np.ones(2), np.zeros(2))["mape"])


def test_relative_errors_divide_by_the_origin_price_for_model_and_naive():
    # forecast 110 from 100, truth 120: the model is 10 % off, the naive forecast (100) 20 %
    assert relative_errors(110.0, 120.0, 100.0) == pytest.approx((-0.1, -0.2))
    # the origin's sign does not flip the errors
    assert relative_errors(-110.0, -120.0, -100.0) == pytest.approx((0.1, 0.2))
    # an origin of 0 leaves the errors in price units instead of dividing by zero
    assert relative_errors(1.0, 3.0, 0.0) == (-2.0, -3.0)


def test_relative_errors_of_arrays_are_those_of_each_element():
    model, naive = relative_errors(
        np.array([110.0, 1.0]), np.array([120.0, 3.0]), np.array([100.0, 0.0])
    )
    np.testing.assert_allclose(model, [-0.1, -2.0])
    np.testing.assert_allclose(naive, [-0.2, -3.0])


def test_model_and_naive_mse_in_price_units_and_relative():
    forecast, truth, last = np.array([11.0, 19.0]), np.array([12.0, 22.0]), np.array([10.0, 20.0])
    assert model_and_naive_mse(forecast, truth, last, relative=False) == pytest.approx(
        ((1 + 9) / 2, (4 + 4) / 2)
    )
    assert model_and_naive_mse(forecast, truth, last, relative=True) == pytest.approx(
        ((0.1**2 + 0.15**2) / 2, (0.2**2 + 0.1**2) / 2)
    )


def test_mse_by_step_averages_over_paths():
    true_paths = np.array([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    paths = np.array([[1.0, 3.0, 5.0], [1.0, 1.0, 3.0]])
    np.testing.assert_array_equal(mse_by_step(true_paths, paths), [0.0, 1.0, 2.0])


def test_rolling_errors_keep_the_newest_and_score_model_and_naive():
    errors = RollingErrors(3)
    assert errors.scores() is None and len(errors) == 0
    errors.add(10.0, 10.0)  # pushed out by the three below
    for model_err, naive_err in ((0.1, -0.2), (-0.1, 0.2), (0.1, 0.2)):
        errors.add(model_err, naive_err)
    scored = errors.scores()
    assert scored is not None and scored.n == len(errors) == 3
    assert scored.mse == pytest.approx(0.01) and scored.naive_mse == pytest.approx(0.04)
    assert scored.mae == pytest.approx(0.1) and scored.naive_mae == pytest.approx(0.2)
    assert scored.skill == pytest.approx(0.75)


def test_rolling_skill_is_nan_when_the_naive_forecast_was_exact():
    errors = RollingErrors(10)
    errors.add(0.5, 0.0)
    scored = errors.scores()
    assert scored is not None and math.isnan(scored.skill)
