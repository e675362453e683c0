from __future__ import annotations

import threading

import numpy as np
import pytest

from streamcast import Forecaster


def reference_rollout(model, prices: np.ndarray, steps: int, normalise: bool) -> np.ndarray:
    """The tutorial's way: call the Keras model on one window at a time, one step at a time."""
    out = np.empty((len(prices), steps))
    for row, window in enumerate(np.asarray(prices, dtype=np.float64)):
        window = window.copy()
        for k in range(steps):
            first = window[0]
            x = window / first - 1.0 if normalise else window
            y = float(model(x[None, :, None].astype(np.float32), training=False).numpy()[0, 0])
            forecast = first * (y + 1.0) if normalise else y
            out[row, k] = forecast
            window = np.append(window[1:], forecast)
    return out


def random_prices(rows: int, seed: int = 0, seq_len: int = 50) -> np.ndarray:
    rng = np.random.default_rng(seed)
    start = rng.uniform(10, 1000, size=(rows, 1))
    return start * np.exp(np.cumsum(rng.normal(0, 0.02, size=(rows, seq_len)), axis=1))


@pytest.mark.parametrize("normalise", [True, False])
def test_rollout_equals_the_per_window_loop(default_model, normalise):
    prices = random_prices(5, seed=1)
    if not normalise:
        prices = prices / prices.mean(axis=1, keepdims=True) - 1.0  # sine-like scale, crosses 0
    with Forecaster(default_model, normalise=normalise) as forecaster:
        assert forecaster.fast_path
        got = forecaster.rollout(prices, steps=12)
    want = reference_rollout(default_model, prices, 12, normalise)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_deeper_stack_uses_the_fast_path_and_matches(tiny_model):
    from streamcast.model import ModelConfig, build_model

    model = build_model(ModelConfig.from_sizes([1, 6, 7, 5, 1]), seed=3)
    prices = random_prices(3, seed=2)
    with Forecaster(model, normalise=True) as forecaster:
        assert forecaster.fast_path
        got = forecaster.rollout(prices, steps=4)
    np.testing.assert_allclose(got, reference_rollout(model, prices, 4, True), rtol=1e-4)


def test_other_architectures_fall_back_to_keras_and_match():
    import keras

    keras.utils.set_random_seed(4)
    model = keras.Sequential([keras.Input((50, 1)), keras.layers.GRU(6), keras.layers.Dense(1)])
    prices = random_prices(3, seed=3)
    with Forecaster(model, normalise=True) as forecaster:
        assert not forecaster.fast_path
        got = forecaster.rollout(prices, steps=3)
    np.testing.assert_allclose(got, reference_rollout(model, prices, 3, True), rtol=1e-4)


def test_predict_next_is_the_first_rollout_step(tiny_model):
    prices = random_prices(7, seed=5)
    with Forecaster(tiny_model, normalise=True) as forecaster:
        nxt = forecaster.predict_next(prices)
        path = forecaster.rollout(prices, steps=3)
    assert nxt.shape == (7,)
    np.testing.assert_allclose(nxt, path[:, 0], rtol=1e-12)
    np.testing.assert_allclose(nxt, reference_rollout(tiny_model, prices, 1, True)[:, 0], rtol=1e-4)


def test_chunked_batches_equal_one_window_at_a_time(tiny_model):
    prices = random_prices(21, seed=6)
    with Forecaster(tiny_model, normalise=True, chunk_size=8, workers=2) as forecaster:
        batched = forecaster.rollout(prices, steps=5)
        single = np.concatenate([forecaster.rollout(prices[i : i + 1], steps=5) for i in range(21)])
    assert batched.shape == (21, 5)
    np.testing.assert_allclose(batched, single, rtol=1e-5)


def test_varying_batch_sizes_reuse_bucketed_programs(tiny_model):
    with Forecaster(tiny_model, normalise=True, chunk_size=16, workers=2) as forecaster:
        for rows in (1, 3, 4, 5, 7, 8, 9, 15, 16, 17, 33, 40):
            assert forecaster.predict_next(random_prices(rows)).shape == (rows,)
        # up to 8 rows one call padded to a power of two (3 -> 4); more split over the 2
        # workers in power-of-two chunks of 8 to 16 rows (9 -> 8 + 1, 40 -> 16 + 16 + 8):
        # four programs serve every size
        assert forecaster.compiled_shapes == [(1, 1), (4, 1), (8, 1), (16, 1)]


def test_bad_inputs_are_refused_with_the_reason(tiny_model):
    with Forecaster(tiny_model, normalise=True) as forecaster:
        with pytest.raises(ValueError, match=r"shape \(batch, 50\)"):
            forecaster.predict_next(np.ones((2, 49)))
        with pytest.raises(ValueError, match="NaN or infinity"):
            forecaster.predict_next(np.full((1, 50), np.nan))
        with pytest.raises(ValueError, match="first price > 0"):
            forecaster.predict_next(np.zeros((1, 50)))
        with pytest.raises(ValueError, match="positive integer"):
            forecaster.rollout(np.ones((1, 50)), steps=0)
        assert forecaster.rollout(np.ones((0, 50)), steps=4).shape == (0, 4)


def test_one_caller_thread_at_a_time_is_safe_from_many_threads(tiny_model):
    prices = random_prices(10, seed=8)
    with Forecaster(tiny_model, normalise=True, chunk_size=4) as forecaster:
        want = forecaster.rollout(prices, steps=3)
        results: list[np.ndarray] = []

        def call() -> None:
            results.append(forecaster.rollout(prices, steps=3))

        threads = [threading.Thread(target=call) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(results) == 4
    for got in results:
        np.testing.assert_allclose(got, want, rtol=1e-6)


def test_load_the_shipped_model_and_forecast_finite_prices(shipped_engine):
    assert shipped_engine.normalise and shipped_engine.seq_len == 50
    assert shipped_engine.version == shipped_engine.info.version
    path = shipped_engine.rollout(random_prices(2), steps=50)
    assert path.shape == (2, 50) and np.isfinite(path).all() and (path > 0).all()


def test_bucket_sizes_warm_every_chunk_program(tiny_model):
    with Forecaster(tiny_model, normalise=True, chunk_size=8, workers=2) as forecaster:
        assert forecaster.bucket_sizes(512) == (1, 2, 4, 8, 16)
        assert forecaster.bucket_sizes(5) == (1, 2, 4, 8, 16)
        forecaster.warmup(forecaster.bucket_sizes(512), steps=(1,))
        assert forecaster.compiled_shapes == [(1, 1), (2, 1), (4, 1), (8, 1)]
        for rows in (1, 3, 6, 11, 17, 100):
            forecaster.predict_next(random_prices(rows))
        assert forecaster.compiled_shapes == [(1, 1), (2, 1), (4, 1), (8, 1)], (
            "no compile after warm-up"
        )


def test_a_small_batch_is_one_call_and_a_bigger_one_is_spread_over_the_workers(tiny_model):
    with Forecaster(tiny_model, normalise=True, chunk_size=64, workers=2) as forecaster:
        sizes = {
            n: [len(c) for c in forecaster._chunks(random_prices(n))]
            for n in (1, 3, 8, 9, 16, 100, 300)
        }
        assert sizes == {
            1: [1],
            3: [4],  # padded to its bucket
            8: [8],
            9: [8, 1],
            16: [8, 8],
            100: [64, 64],
            300: [64] * 5,
        }
        one = random_prices(5, seed=3)
        np.testing.assert_allclose(
            forecaster.predict_next(one)[:2], forecaster.predict_next(one[:2]), rtol=1e-7
        )


def test_residual_model_that_outputs_zero_is_the_naive_forecast(tiny_model):
    """A residual network predicts the change from the last value: zero output -> next = last."""
    import keras

    from streamcast.model import ModelConfig, build_model

    model = build_model(ModelConfig.from_sizes([1, 4, 1], dropout=0.0), seed=5)
    dense = model.layers[-1]
    dense.set_weights([np.zeros_like(w) for w in dense.get_weights()])
    assert isinstance(dense, keras.layers.Dense)
    prices = random_prices(4, seed=6)
    for normalise in (True, False):
        with Forecaster(model, normalise=normalise, residual=True) as forecaster:
            path = forecaster.rollout(prices, steps=5)
        np.testing.assert_allclose(path, np.repeat(prices[:, -1:], 5, axis=1), rtol=1e-12)
    # the same network without the residual flag forecasts the window's first value (normalised)
    with Forecaster(model, normalise=True) as forecaster:
        np.testing.assert_allclose(forecaster.predict_next(prices), prices[:, 0], rtol=1e-12)


def test_residual_rollout_equals_the_per_window_loop(tiny_model):
    prices = random_prices(3, seed=7)
    with Forecaster(tiny_model, normalise=True, residual=True) as forecaster:
        got = forecaster.rollout(prices, steps=6)
    want = np.empty_like(got)
    for row, window in enumerate(prices):
        window = window.copy()
        for k in range(6):
            x = window / window[0] - 1.0
            y = float(tiny_model(x[None, :, None].astype(np.float32), training=False)[0, 0])
            want[row, k] = window[0] * (x[-1] + y + 1.0)
            window = np.append(window[1:], want[row, k])
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_a_same_architecture_version_is_swapped_in_by_weights_without_a_compile(tmp_path):
    from streamcast.model import ModelConfig, build_model, save_model

    config = ModelConfig.from_sizes([1, 6, 5, 1])
    old, new = build_model(config, seed=10), build_model(config, seed=11)
    info = save_model(new, tmp_path / "new", normalise=True)
    save_model(
        build_model(ModelConfig.from_sizes([1, 7, 5, 1]), seed=1),
        tmp_path / "wider",
        normalise=True,
    )
    save_model(new, tmp_path / "residual", normalise=True, residual=True)
    prices = random_prices(3, seed=12)
    with (
        Forecaster(old, normalise=True, version="old") as engine,
        Forecaster(new, normalise=True) as reference,
    ):
        before = engine.rollout(prices, steps=3)
        programs = engine.compiled_shapes
        assert engine.stage(tmp_path / "wider") is None
        assert engine.stage(tmp_path / "residual") is None
        staged = engine.stage(tmp_path / "new")
        assert staged is not None and staged.version == info.version
        np.testing.assert_array_equal(engine.rollout(prices, steps=3), before)  # not applied yet
        staged.apply()
        assert engine.version == info.version
        after = engine.rollout(prices, steps=3)
        assert engine.compiled_shapes == programs, "no new program was compiled"
        np.testing.assert_allclose(after, reference.rollout(prices, steps=3), rtol=1e-6)
        assert not np.allclose(after, before)


def test_the_one_call_branch_forecasts_as_the_chunked_branch_does(shipped_engine):
    """A GPU runs a batch as one compiled call; forced on the CPU, that branch gives the chunked
    branch's forecasts (to 1e-6 relative), so the branch a GPU takes is tested without one."""
    forced = "one_call" if shipped_engine.batching == "chunked" else "chunked"
    engines = {shipped_engine.batching: shipped_engine}
    prices = random_prices(200, seed=21)
    with Forecaster(
        shipped_engine.model,
        normalise=shipped_engine.normalise,
        residual=shipped_engine.residual,
        version=shipped_engine.version,
        batching=forced,
    ) as other:
        engines[forced] = other
        one_call, chunked = engines["one_call"], engines["chunked"]
        assert (one_call.chunk_size, one_call.workers) == (4096, 1)
        assert chunked.chunk_size == 64
        nexts = {name: engine.predict_next(prices) for name, engine in engines.items()}
        paths = {name: engine.rollout(prices, steps=50) for name, engine in engines.items()}
        # 200 rows: one call of 256 (padded) rows, against chunks of at most 64 rows
        assert {(256, 1), (256, 50)} <= set(one_call.compiled_shapes)
        assert max(rows for rows, _ in chunked.compiled_shapes) <= 64
    # measured on the 2-core machine: 1.2e-8 apart at step 1, 8.3e-7 at step 50 (float32 sums in
    # another order, grown over the rollout)
    np.testing.assert_allclose(nexts["one_call"], nexts["chunked"], rtol=1e-6)
    np.testing.assert_allclose(paths["one_call"], paths["chunked"], rtol=1e-6)
    np.testing.assert_allclose(paths["one_call"][:, 0], nexts["chunked"], rtol=1e-6)
    # forecasts that differ by row and step, not a constant both branches would agree on
    assert np.ptp(nexts["one_call"]) > 1.0 and np.ptp(paths["one_call"][0]) > 0


def test_an_unknown_batching_is_refused_naming_the_choices(tiny_model):
    with pytest.raises(ValueError, match="batching must be one of auto, one_call, chunked"):
        Forecaster(tiny_model, normalise=True, batching="gpu")  # type: ignore[arg-type]


def test_the_warm_up_covers_a_conflating_read_and_the_path_lanes_groups(tiny_model):
    """A conflating read may hold 8 batches' worth of symbols in one engine call, the path lane
    up to paths_per_batch_max: neither may compile while serving (one call per batch, as on a
    GPU, is where a bigger call needs a bigger program)."""
    from streamcast.service import most_rows
    from streamcast.settings import Settings

    settings = Settings(_env_file=None, batch_max_size=8, conflate=True, partitions=3)  # type: ignore[call-arg]
    assert most_rows(settings) == 8 * 8 + 3, "a read of 3 partitions rounds COUNT up per stream"
    lanes = Settings(_env_file=None, batch_max_size=8, paths_per_batch_max=100)  # type: ignore[call-arg]
    assert most_rows(lanes) == 100
    with Forecaster(tiny_model, normalise=True, chunk_size=4096, workers=1) as forecaster:
        forecaster.warmup(forecaster.bucket_sizes(most_rows(settings)), steps=(1,))
        compiled = forecaster.compiled_shapes
        forecaster.predict_next(random_prices(67))
        assert forecaster.compiled_shapes == compiled, "no compile while serving"
