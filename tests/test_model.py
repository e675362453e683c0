from __future__ import annotations

import json

import numpy as np
import pytest

from streamcast.model import (
    DEFAULT_MODEL_DIR,
    ModelConfig,
    ModelError,
    ModelInfo,
    build_model,
    count_lstm_macs,
    load_model,
    save_model,
    train_model,
)


def test_default_config_is_the_tutorials_network():
    config = ModelConfig.from_sizes()
    kinds = [
        (layer.kind, layer.units, layer.rate, layer.return_sequences) for layer in config.layers
    ]
    assert kinds == [
        ("lstm", 50, 0.0, True),
        ("dropout", 0, 0.2, False),
        ("lstm", 100, 0.0, False),
        ("dropout", 0, 0.2, False),
        ("dense", 1, 0.0, False),
    ]
    assert (config.loss, config.optimizer) == ("mse", "rmsprop")


def test_config_from_the_tutorials_json_layer_list():
    config = ModelConfig.from_dict(
        {
            "loss": "mse",
            "optimizer": "adam",
            "layers": [
                {"type": "lstm", "neurons": 100, "return_seq": True},
                {"type": "dropout", "rate": 0.2},
                {"type": "lstm", "neurons": 100, "return_seq": True},
                {"type": "lstm", "neurons": 100, "return_seq": False},
                {"type": "dropout", "rate": 0.2},
                {"type": "dense", "neurons": 1, "activation": "linear"},
            ],
        }
    )
    model = build_model(config)
    assert [type(layer).__name__ for layer in model.layers] == [
        "LSTM",
        "Dropout",
        "LSTM",
        "LSTM",
        "Dropout",
        "Dense",
    ]
    assert model.output_shape == (None, 1)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"layers": [{"type": "gru", "units": 3}]}, "unknown type 'gru'"),
        ({"layers": [{"type": "dense", "units": 1}]}, "at least one lstm"),
        ({"layers": [{"type": "lstm", "units": 4}]}, "last layer must be dense"),
        (
            {"layers": [{"type": "lstm", "units": 4, "return_seq": True}, {"type": "dense"}]},
            "must not return",
        ),
        ({"layers": "x"}, "'layers' list"),
    ],
)
def test_bad_configs_are_refused_with_the_reason(spec, message):
    with pytest.raises(ModelError, match=message):
        ModelConfig.from_dict(spec)


def test_count_macs_of_the_default_network(default_model):
    # per timestep: LSTM(50) 4*50*(1+50) + LSTM(100) 4*100*(50+100); plus Dense 100
    assert count_lstm_macs(default_model) == 50 * (4 * 50 * 51 + 4 * 100 * 150) + 100


def test_training_reduces_loss_and_is_seeded():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 50, 1)).astype(np.float32)
    y = x[:, -1, :] * 0.5
    losses = []
    for _ in range(2):
        model = build_model(ModelConfig.from_sizes([1, 4, 4, 1]), seed=5)
        result = train_model(model, x, y, epochs=3, batch_size=16, seed=5, verbose=0)
        losses.append(result.history["loss"])
    assert losses[0] == pytest.approx(losses[1])
    assert losses[0][-1] < losses[0][0]
    assert result.epochs_run == 3


def test_save_writes_sidecar_and_load_round_trips(tmp_path, tiny_model):
    info = save_model(
        tiny_model, tmp_path / "m", normalise=True, data={"source": "unit"}, metrics={"mse": 1.5}
    )
    sidecar = json.loads((tmp_path / "m" / "model.json").read_text())
    assert sidecar["sha256"] == info.sha256 and len(info.sha256) == 64
    assert sidecar["seq_len"] == 50 and sidecar["normalise"] is True
    assert sidecar["data"] == {"source": "unit"} and sidecar["metrics"] == {"mse": 1.5}
    assert sidecar["version"].endswith(info.sha256[:8])
    assert sidecar["residual"] is False
    model, loaded = load_model(tmp_path / "m")
    assert loaded.version == info.version and loaded.residual is False
    save_model(tiny_model, tmp_path / "r", normalise=True, residual=True)
    assert load_model(tmp_path / "r")[1].residual is True
    x = np.linspace(0, 1, 50, dtype=np.float32)[None, :, None]
    np.testing.assert_allclose(model(x).numpy(), tiny_model(x).numpy(), rtol=1e-6)


def test_test_skill_reads_the_sidecar_metrics_and_older_retrain_sidecars():
    def info(metrics: dict) -> ModelInfo:
        return ModelInfo("v", "2026-01-01", 50, True, "0" * 64, metrics=metrics)

    assert info({"mse": 1.0, "naive_mse": 4.0, "skill": 0.75}).test_skill() == 0.75
    # a retrained model saved before the schema was shared: its own MSE was "candidate_mse"
    old = {"candidate_mse": 1.0, "current_mse": 2.0, "naive_mse": 4.0, "relative": True}
    assert info(old).test_skill() == 0.75
    assert info({}).test_skill() is None
    assert info({"mse": "?", "naive_mse": 4.0}).test_skill() is None
    assert info({"mse": 1.0, "naive_mse": 0.0}).test_skill() is None
    assert ModelInfo.read(DEFAULT_MODEL_DIR / "model.json").test_skill() == pytest.approx(
        0.8086243240985996
    )


def test_load_refuses_a_tampered_model_file(tmp_path, tiny_model):
    save_model(tiny_model, tmp_path / "m", normalise=False)
    path = tmp_path / "m" / "model.keras"
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="does not match the sidecar"):
        load_model(tmp_path / "m")


def test_load_refuses_truncated_file_with_matching_hash(tmp_path, tiny_model):
    from streamcast.model import ModelInfo, sha256_file, write_sidecar

    save_model(tiny_model, tmp_path / "m", normalise=False)
    path = tmp_path / "m" / "model.keras"
    path.write_bytes(path.read_bytes()[:200])
    info = ModelInfo.read(tmp_path / "m" / "model.json")
    info.sha256 = sha256_file(path)
    write_sidecar(tmp_path / "m", info)
    with pytest.raises(ModelError, match="cannot load"):
        load_model(tmp_path / "m")


@pytest.mark.parametrize(
    ("sidecar", "message"),
    [
        (None, "sidecar missing"),
        ("{not json", "not valid JSON"),
        ("[" * 100_000 + "]" * 100_000, "not valid JSON"),  # past the recursion limit
        ('{"version": "x"}', "sidecar lacks"),
        (
            '{"version": 12345678901234567890, "created": "c", "seq_len": 50, "normalise": true, '
            '"sha256": "0"}',
            "version must be a non-empty string",
        ),
        (
            '{"version": null, "created": "c", "seq_len": 50, "normalise": true, "sha256": "0"}',
            "version must be a non-empty string",
        ),
        (
            # a lone surrogate: Redis's cjson refused the publish script's argument, every time
            '{"version": "v\\udc80", "created": "c", "seq_len": 50, "normalise": true, '
            '"sha256": "0"}',
            "version must be a non-empty string of printable UTF-8",
        ),
        (
            '{"version": "v\\n1", "created": "c", "seq_len": 50, "normalise": true, "sha256": "0"}',
            "version must be a non-empty string of printable UTF-8",
        ),
        (
            '{"version": "x", "created": "c", "seq_len": "fifty", "normalise": true, "sha256": "0"}',
            "seq_len must be a positive integer",
        ),
        (
            '{"version": "x", "created": "c", "seq_len": 50, "normalise": "yes", "sha256": "0"}',
            "normalise must be true or false",
        ),
        (
            '{"version": "x", "created": "c", "seq_len": 50, "normalise": true, "sha256": "0", '
            '"residual": 1}',
            "residual must be true or false",
        ),
    ],
)
def test_load_refuses_bad_sidecars(tmp_path, tiny_model, sidecar, message):
    save_model(tiny_model, tmp_path / "m", normalise=False)
    path = tmp_path / "m" / "model.json"
    if sidecar is None:
        path.unlink()
    else:
        path.write_text(sidecar)
    with pytest.raises(ModelError, match=message):
        load_model(tmp_path / "m")


def test_load_refuses_a_missing_directory(tmp_path):
    with pytest.raises(ModelError, match="not a model directory"):
        load_model(tmp_path / "none")


def test_shipped_default_model_loads_and_is_documented():
    model, info = load_model(DEFAULT_MODEL_DIR)
    assert info.normalise is True and info.seq_len == 50
    assert info.data["source"].startswith("synthetic:")
    assert info.metrics["skill"] > 0, (
        "the shipped model must beat the naive forecast on its test split"
    )
    assert model.input_shape == (None, 50, 1)


def test_shipped_default_model_beats_naive_on_the_demos_feed_as_on_its_test_windows(shipped_engine):
    """The README's claim: the default model, trained on seed 0, is scored on the demo's feed
    (the same generator, another seed), which it never saw, and keeps its stored skill."""
    from streamcast.data import make_windows
    from streamcast.demo import FEED_SEED, demo_feed
    from streamcast.evaluate import evaluate

    info = ModelInfo.read(DEFAULT_MODEL_DIR / "model.json")
    assert f"seed={FEED_SEED}" not in info.data["source"], "the demo's feed is the training data"
    feed = demo_feed(8)  # the demo's default of 8 symbols
    windows = np.concatenate([make_windows(series)[::10] for series in feed])  # every 10th
    point = evaluate(shipped_engine, windows, "point").metrics
    assert point["model"]["n"] == len(windows) > 3000
    stored = info.metrics["skill"]
    assert point["skill"] > 0, "no better than the naive forecast on the demo's feed"
    assert point["skill"] == pytest.approx(stored, abs=0.1), (point["skill"], stored)
