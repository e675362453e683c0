from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamcast.intervals import (
    Calibrator,
    IntervalConfig,
    level_key,
    window_volatility,
    wire,
)


def one_step(cal: Calibrator, scores: np.ndarray) -> np.ndarray:
    """Feed scores one at a time at horizon 1; (n, levels) whether each was inside the band
    in force before it was learnt."""
    covered = np.empty((len(scores), len(cal.levels)), dtype=bool)
    ones = np.ones(1)
    for i, s in enumerate(scores):
        covered[i] = s <= cal.quantiles()[0]
        cal.update(ones, scores[i : i + 1])
    return covered


def walk(n: int, vol: float, seed: int, start: float = 100.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return start * np.exp(np.cumsum(rng.normal(0.0, vol, n)))


def test_coverage_of_iid_scores_is_the_level():
    cal = Calibrator(IntervalConfig(horizons=1))
    scores = np.abs(np.random.default_rng(0).standard_t(df=4, size=20_000))
    coverage = one_step(cal, scores).mean(axis=0)
    assert coverage == pytest.approx([0.80, 0.95], abs=0.015)
    # and the tracked quantiles sit near the true ones of |t(4)|
    assert np.exp(cal.log_q[0]) == pytest.approx(np.quantile(scores, [0.8, 0.95]), rel=0.15)


def test_coverage_recovers_within_300_steps_of_a_3x_scale_shift():
    cal = Calibrator(IntervalConfig(horizons=1))
    scores = np.abs(np.random.default_rng(1).normal(size=6000))
    scores[3000:] *= 3.0
    covered = one_step(cal, scores)[:, 0]
    assert covered[3000:3050].mean() < 0.6  # the shift is felt at first
    assert covered[1000:3000].mean() == pytest.approx(0.8, abs=0.03)
    assert covered[3300:6000].mean() == pytest.approx(0.8, abs=0.03)
    windows = np.lib.stride_tricks.sliding_window_view(covered[3300:], 200).mean(axis=1)
    assert windows.min() > 0.7 and windows.max() < 0.9


def test_volatility_scaling_carries_coverage_through_a_volatility_jump():
    """A random walk whose volatility triples, forecast by 'no change': the window's volatility
    rescales the scores, so the coverage hardly moves."""
    prices = np.concatenate([walk(3000, 0.01, 2), np.zeros(3000)])
    prices[3000:] = prices[2999] * np.exp(np.cumsum(np.random.default_rng(3).normal(0, 0.03, 3000)))
    cal = Calibrator(IntervalConfig(horizons=1))
    covered = []
    for t in range(50, len(prices) - 1):
        window = prices[t - 49 : t + 1][None, :]
        vol = cal.volatility(window)
        band = cal.bands(window[:, -1], window[:, -1], None, vol)[0.8]
        covered.append(band.next_lo[0] <= prices[t + 1] <= band.next_hi[0])
        cal.update(np.ones(1), cal.score(window[:, -1], prices[t + 1 : t + 2], window[:, -1], vol))
    after = np.asarray(covered[3000 - 50 :])
    assert after[:100].mean() > 0.65
    assert after[100:].mean() == pytest.approx(0.8, abs=0.03)


def test_a_wild_symbol_gets_a_wider_band_than_a_quiet_one():
    quiet, wild = walk(51, 0.005, 4), walk(51, 0.03, 5)
    windows = np.stack([quiet, wild])
    vol = window_volatility(windows)
    assert vol[1] / vol[0] == pytest.approx(6.0, rel=0.4)
    cal = Calibrator(IntervalConfig(horizons=3, warmup_scores=5))
    for warmed in (False, True):
        bands = cal.bands(windows[:, -1], windows[:, -1], np.tile(windows[:, -1:], 3), vol)
        for band in bands.values():
            rel = (band.next_hi - band.next_lo) / windows[:, -1]
            assert rel[1] / rel[0] == pytest.approx(vol[1] / vol[0])
            assert np.all(np.diff(band.path_hi - band.path_lo, axis=1) > 0)  # wider further out
        assert cal.warm().all() == warmed
        cal.update(np.repeat([1, 2, 3], 5), np.outer([1, 2, 3], np.linspace(0.5, 2.5, 5)))


def test_warm_up_band_is_a_widened_random_walk_then_the_conformal_quantile():
    cal = Calibrator(IntervalConfig(horizons=2, levels=(0.8,), warmup_scores=9))
    z80 = 1.2815515655446004
    expected = 1.5 * math.sqrt(math.pi / 2) * z80 * np.sqrt([1.0, 2.0])
    assert cal.quantiles()[:, 0] == pytest.approx(expected)
    band = cal.bands(np.array([200.0]), np.array([201.0]), None, np.array([0.01]))[0.8]
    assert band.next_hi[0] - 201.0 == pytest.approx(expected[0] * 0.01 * 200.0)
    cal.update(np.ones(9), np.arange(1.0, 10.0))  # horizon 1 warm: ceil(10 * 0.8) = 8th smallest
    assert cal.warm().tolist() == [True, False]
    assert cal.quantiles()[:, 0] == pytest.approx([8.0, expected[1]])


def test_a_large_batch_moves_the_band_a_bounded_step():
    config = IntervalConfig(horizons=1, levels=(0.8,), warmup_scores=1, batch_cap=20)
    cal = Calibrator(config)
    cal.update(np.ones(1), np.ones(1))  # warm, q = 1
    cal.update(np.ones(1000), np.full(1000, 50.0))  # every one a miss
    assert cal.log_q[0, 0] == pytest.approx(config.learning_rate * 20 * 0.8)
    cal.update(np.ones(3), np.full(3, 0.1))  # three hits, under the cap: three steps
    assert cal.log_q[0, 0] == pytest.approx(config.learning_rate * (16 - 3 * 0.2))


def test_update_skips_what_it_cannot_use():
    cal = Calibrator(IntervalConfig(horizons=5, warmup_scores=3))
    used = cal.update(
        np.array([1, 0, 6, 2, np.nan, 3]), np.array([1.0, 1.0, 1.0, np.inf, 1.0, -1.0])
    )
    assert used == 1 and cal.seen.tolist() == [1, 0, 0, 0, 0]
    with pytest.raises(ValueError, match="2 horizons for 3 scores"):
        cal.update(np.array([1, 2]), np.ones(3))


def state_after(cal: Calibrator, seed: int) -> Calibrator:
    rng = np.random.default_rng(seed)
    cal.update(rng.integers(1, 51, 700), np.abs(rng.normal(size=700)))
    return cal


def test_to_dict_and_from_dict_round_trip_exactly_through_json():
    cal = Calibrator(IntervalConfig(warmup_scores=20), model_version="v1")
    for _ in range(2):  # part warm (some horizons still collecting), then further on
        cal = state_after(cal, 6)
        state = cal.to_dict()
        back = Calibrator.from_dict(json.loads(json.dumps(state, allow_nan=False)))
        assert back.to_dict() == state and back.model_version == "v1"
        assert np.array_equal(back.log_q, cal.log_q) and np.array_equal(back.seen, cal.seen)
        assert np.array_equal(back.log_q_raw, cal.log_q_raw)
        assert np.array_equal(back.interval_score, cal.interval_score)
        assert np.array_equal(back.quantiles(), cal.quantiles())
        # and they go on learning alike
        assert (
            state_after(back, 7).to_dict() == state_after(Calibrator.from_dict(state), 7).to_dict()
        )


def test_from_dict_refuses_what_is_not_a_state():
    good = state_after(Calibrator(IntervalConfig(warmup_scores=20)), 8).to_dict()
    for broken in (
        {},
        {**good, "format": 99},
        {**good, "log_q": [[0.0, 0.0]]},
        {**good, "seen": [-1] * 50},
        {**good, "warmup": {"0": []}},
        {**good, "config": {**good["config"], "levels": [1.5]}},
    ):
        with pytest.raises(ValueError):
            Calibrator.from_dict(broken)


def test_reset_starts_a_new_version_from_the_warm_up():
    cal = state_after(Calibrator(IntervalConfig(warmup_scores=5), "v1"), 9)
    assert cal.warm().all()
    cal.reset("v2")
    assert cal.model_version == "v2" and not cal.warm().any() and cal.seen.sum() == 0


def test_level_keys_have_no_trailing_zero():
    assert [level_key(v) for v in (0.8, 0.95, 0.995, 0.5)] == ["80", "95", "99.5", "50"]


def test_wire_json_has_a_path_only_where_there_is_one_and_none_without_a_band():
    cal = Calibrator(IntervalConfig(horizons=3, levels=(0.8, 0.95, 0.995)))
    prices = np.array([100.0, 50.0, 10.0])
    paths = np.array([[101.0, 102.0, 103.0], [np.nan] * 3, [11.0, 12.0, 13.0]])
    bands = cal.bands(prices, np.array([101.0, 51.0, np.nan]), paths, np.full(3, 0.01))
    rows = json.loads(json.dumps(wire(bands), allow_nan=False))
    first, second, third = rows
    assert set(first) == {"80", "95", "99.5"}
    assert set(first["80"]) == {"next", "path"} and len(first["80"]["path"]) == 3
    lo, hi = first["95"]["next"]
    assert lo < 101.0 < hi and hi - 101.0 == pytest.approx(101.0 - lo)
    assert all(lo <= v <= hi for (lo, hi), v in zip(first["80"]["path"], paths[0], strict=True))
    assert set(second["95"]) == {"next"}  # no path in this batch for that row
    assert set(third["80"]) == {"path"}  # its next was not finite
    assert wire(cal.bands(prices, prices, None, np.full(3, np.nan))) == [None, None, None]
    assert wire({}) == []


finite_or_not = st.one_of(
    st.floats(min_value=-1e6, max_value=1e6),
    st.sampled_from([np.nan, np.inf, -np.inf, 0.0, 1e308, -1e308]),
)


@settings(max_examples=200, deadline=None)
@given(
    rows=st.lists(
        st.tuples(finite_or_not, finite_or_not, finite_or_not, finite_or_not),
        min_size=1,
        max_size=6,
    ),
    warm=st.booleans(),
)
def test_bands_always_hold_the_forecast_and_are_finite_or_absent(rows, warm):
    cal = Calibrator(IntervalConfig(horizons=2, warmup_scores=1))
    if warm:
        cal.update(np.array([1, 2]), np.array([1e5, 0.0]))
    price, nxt, step2, vol = (np.array(col, dtype=np.float64) for col in zip(*rows, strict=True))
    paths = np.stack([nxt, step2], axis=1)
    for band in cal.bands(price, nxt, paths, vol).values():
        for centre, lo, hi in (
            (nxt, band.next_lo, band.next_hi),
            (paths, band.path_lo, band.path_hi),
        ):
            assert lo is not None and hi is not None
            assert not np.isinf(lo).any() and not np.isinf(hi).any()
            assert np.array_equal(np.isnan(lo), np.isnan(hi))
            has = ~np.isnan(lo)
            assert np.all(lo[has] <= centre[has]) and np.all(centre[has] <= hi[has])
            bad = ~(np.isfinite(price) & np.isfinite(vol))
            assert np.isnan(lo[bad]).all()  # no band without a price and a volatility
    json.dumps(wire(cal.bands(price, nxt, paths, vol)), allow_nan=False)


def test_window_volatility_weighs_the_newest_changes_most_and_refuses_nothing():
    flat = np.full((1, 51), 100.0)
    jump_late = flat.copy()
    jump_late[0, -1] = 101.0
    jump_early = flat.copy()
    jump_early[0, 1:] = 101.0
    vol = window_volatility(np.concatenate([flat, jump_late, jump_early]), halflife_ticks=10)
    assert vol[0] == pytest.approx(1e-9)  # the floor: a finite score even for a flat window
    assert vol[1] > 10 * vol[2] > 0
    bad = np.array([[1.0, np.nan, 2.0], [1.0, 2.0, np.inf]])
    assert np.isnan(window_volatility(bad)).all()
    assert np.isnan(window_volatility(np.ones((2, 1)))).all()


def run_pairs(cal: Calibrator, errors: np.ndarray, vols: np.ndarray) -> np.ndarray:
    """Feed (relative error, volatility) pairs at horizon 1 in batches of 10; (n, L) whether
    each error was inside the band in force before it was learnt."""
    covered = np.empty((len(errors), len(cal.levels)), dtype=bool)
    for i in range(0, len(errors), 10):
        e, v = errors[i : i + 10], vols[i : i + 10]
        half = cal.bands(np.ones(len(e)), np.ones(len(e)), vol=v)
        covered[i : i + 10] = np.stack(
            [e <= half[level].next_hi - 1.0 for level in cal.levels], axis=1
        )
        cal.update(np.ones(len(e)), cal.score(np.ones(len(e)), 1.0 + e, np.ones(len(e)), v))
    return covered


@pytest.mark.parametrize("follows_vol", [True, False])
def test_auto_scaling_bands_with_the_score_that_gives_the_narrower_calibrated_band(follows_vol):
    """Errors proportional to each window's volatility (a quiet and a wild symbol): the scaled
    score is the better band. Errors that ignore it (the volatility is noise): the unscaled.
    Either way coverage holds, and the chosen band is the one with the lower interval score."""
    rng = np.random.default_rng(3)
    n = 6000
    vols = rng.choice([0.5, 2.0], n) * rng.lognormal(0.0, 0.1, n)
    base = np.abs(rng.normal(size=n))
    errors = base * vols if follows_vol else base * rng.lognormal(0.0, 0.05, n)
    if not follows_vol:
        vols = rng.lognormal(0.0, 0.6, n)  # a noisy volatility, unrelated to the errors
    auto = Calibrator(IntervalConfig(horizons=1))
    covered = run_pairs(auto, errors, vols)
    assert bool(auto.scaled()[0, 0]) is follows_vol
    assert covered[-3000:].mean(axis=0) == pytest.approx([0.8, 0.95], abs=0.025)
    widths = {}
    for scaling in ("volatility", "none"):
        forced = Calibrator(IntervalConfig(horizons=1, scaling=scaling))
        run_pairs(forced, errors, vols)
        band = forced.bands(np.ones(n), np.ones(n), vol=vols)[0.95]
        widths[scaling] = float(np.mean(band.next_hi - band.next_lo))
    better = "volatility" if follows_vol else "none"
    assert widths[better] < 0.9 * widths[{"volatility": "none", "none": "volatility"}[better]]


def test_absurd_errors_and_volatilities_leave_the_state_finite_and_saveable():
    """A flat window (volatility at its floor) then a jump gives a scaled score past any float:
    such a pair is skipped, and huge but finite ones bound the interval score, so the state
    always saves as JSON (the daemon stores it without NaN or inf)."""
    cal = Calibrator(IntervalConfig(horizons=2, warmup_scores=2))
    pairs = np.array([[1e300, 1e-9], [1e300, 1e-300], [0.01, 1e-9], [0.02, 0.01]] * 3)
    cal.update(np.tile([1, 2], 6), pairs)
    cal.update(np.ones(4), np.array([[1e200, 1e-9], [1.0, 1e200], [0.0, 0.01], [0.5, 0.01]]))
    state = json.dumps(cal.to_dict(), allow_nan=False)
    assert np.isfinite(cal.interval_score).all() and np.isfinite(cal.log_q_raw).all()
    back = Calibrator.from_dict(json.loads(state))
    assert back.to_dict() == cal.to_dict()


def test_a_stored_state_with_a_count_that_is_not_a_whole_number_is_refused():
    state = Calibrator(IntervalConfig(horizons=2)).to_dict()
    for bad in (float("nan"), 1.5, -1):
        with pytest.raises(ValueError):
            Calibrator.from_dict({**state, "seen": [bad, 0]})


def test_the_step_at_a_horizon_few_forecasts_reach_is_not_divided_by_the_horizon():
    """Every tick's forecast reaches horizon 1, one in 25 reaches horizon 50 (paths refreshed
    now and then): those seldom overlap, so horizon 50 steps as horizon 2 would, not 25x
    slower; where every forecast reaches it, the divisor is the horizon."""
    cal = Calibrator(IntervalConfig(horizons=50, warmup_scores=10))
    cal.update(np.ones(1000), np.full(1000, 0.01))
    cal.update(np.full(40, 50), np.full(40, 0.01))
    assert cal.overlap()[0] == 1.0 and cal.overlap()[49] == pytest.approx(2.0)
    dense = Calibrator(IntervalConfig(horizons=50, warmup_scores=10))
    dense.update(np.repeat(np.arange(1, 51), 100), np.full(5000, 0.01))
    assert dense.overlap() == pytest.approx(np.arange(1, 51))
