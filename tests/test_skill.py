"""Online skill: forecasts scored as their truth arrives, by horizon and version."""

from __future__ import annotations

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from streamcast.metrics import Metrics
from streamcast.skill import SkillTracker

from .helpers import sample


def test_one_step_forecast_is_scored_against_the_next_tick_with_the_naive_one():
    metrics = Metrics(CollectorRegistry())
    tracker = SkillTracker(metrics, horizons=(1,))
    tracker.forecast("A", 100.0, 101.0, None, "v1")
    tracker.observe("A", 102.0)  # model off by 1 %, naive (100) by 2 %
    tracker.observe("A", 103.0)  # nothing pending: not scored
    tracker.publish()
    assert sample(metrics, "streamcast_forecast_scored_total", horizon="1", version="v1") == 1
    assert sample(
        metrics, "streamcast_forecast_rolling_mse", horizon="1", version="v1", forecaster="model"
    ) == pytest.approx(1e-4)
    assert sample(
        metrics, "streamcast_forecast_rolling_mse", horizon="1", version="v1", forecaster="naive"
    ) == pytest.approx(4e-4)
    assert sample(metrics, "streamcast_skill", horizon="1", version="v1") == pytest.approx(0.75)
    assert tracker.skill("v1", 1) == pytest.approx(0.75)


def test_path_horizons_are_scored_when_their_tick_arrives():
    metrics = Metrics(CollectorRegistry())
    tracker = SkillTracker(metrics, horizons=(1, 10, 50))
    path = 100.0 + np.arange(1, 51)  # forecast: +1 per step
    tracker.forecast("A", 100.0, 101.0, path, "v1")
    truth = 100.0 + 2 * np.arange(1, 51)  # truth: +2 per step
    for k, price in enumerate(truth, start=1):
        tracker.observe("A", float(price))
        scored_10 = sample(
            metrics, "streamcast_forecast_scored_total", horizon="10", version="v1", absent=0.0
        )
        assert scored_10 == (1 if k >= 10 else 0)
    snap = tracker.snapshot()["v1"]
    # at step 10: model 110 vs truth 120, naive 100: errors -0.1 and -0.2 of the origin
    assert snap[10]["mse"] == pytest.approx(0.01) and snap[10]["naive_mse"] == pytest.approx(0.04)
    assert snap[50]["mse"] == pytest.approx(0.25) and snap[50]["skill"] == pytest.approx(0.75)
    assert snap[1]["n"] == 1
    assert not tracker._paths["A"], "a path is dropped after its last horizon"


def test_versions_are_kept_apart_and_old_ones_dropped_from_the_metrics():
    metrics = Metrics(CollectorRegistry())
    tracker = SkillTracker(metrics, horizons=(1,), keep_versions=2)
    for n, version in enumerate(("v1", "v2", "v3")):
        tracker.forecast("A", 100.0, 100.0 + n, None, version)
        tracker.observe("A", 100.0 + 2 * n + 1)
        tracker.publish()
    assert sample(metrics, "streamcast_skill", horizon="1", version="v1", absent=-1.0) == -1.0
    assert (
        sample(metrics, "streamcast_forecast_scored_total", horizon="1", version="v1", absent=-1.0)
        == -1.0
    )
    assert sample(metrics, "streamcast_skill", horizon="1", version="v3", absent=-1.0) != -1.0
    assert set(tracker.snapshot()) == {"v2", "v3"}


def test_only_listed_symbols_get_a_labelled_series():
    metrics = Metrics(CollectorRegistry())
    tracker = SkillTracker(metrics, horizons=(1,), symbols=["A"])
    for symbol in ("A", "B"):
        tracker.forecast(symbol, 100.0, 101.0, None, "v1")
        tracker.observe(symbol, 102.0)
    tracker.publish()
    assert sample(metrics, "streamcast_symbol_skill", symbol="A", horizon="1") == pytest.approx(
        0.75
    )
    assert sample(metrics, "streamcast_symbol_skill", symbol="B", horizon="1", absent=-1.0) == -1.0


def test_the_rolling_window_keeps_the_newest_scores():
    metrics = Metrics(CollectorRegistry())
    tracker = SkillTracker(metrics, horizons=(1,), window=10)
    for _ in range(50):  # a bad stretch...
        tracker.forecast("A", 100.0, 110.0, None, "v")
        tracker.observe("A", 101.0)
    for _ in range(10):  # ...then a perfect one
        tracker.forecast("A", 100.0, 101.0, None, "v")
        tracker.observe("A", 101.0)
    assert tracker.skill("v", 1) == pytest.approx(1.0)


def test_ticks_of_two_partitions_with_one_id_are_each_scored():
    """Partition streams hand out ids independently: one batch may hold two ticks with the same
    id (of symbols in different partitions); each forecast is its own tick's."""
    from prometheus_client import CollectorRegistry

    from streamcast.metrics import Metrics
    from streamcast.wire import Forecast, Tick

    metrics = Metrics(CollectorRegistry())
    tracker = SkillTracker(metrics, horizons=(1,))
    a, b = Tick("7-0", "A", 100.0, None), Tick("7-0", "B", 10.0, None)
    tracker.record([a, b], [Forecast.of(a, "v", 101.0), Forecast.of(b, "v", 11.0)])
    tracker.record([Tick("8-0", "A", 102.0, None), Tick("8-0", "B", 12.0, None)], [])
    scored = metrics.prometheus.get_sample_value(
        "streamcast_forecast_scored_total", {"horizon": "1", "version": "v"}
    )
    assert scored == 2
    # A's forecast (101, from 100) met 102: relative error 0.01; B's (11, from 10) met 12: 0.1
    assert tracker.snapshot()["v"][1]["mae"] == pytest.approx((0.01 + 0.1) / 2)
