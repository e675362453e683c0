from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from streamcast.cli import main
from streamcast.data import sine_series


def test_help_does_not_import_tensorflow():
    code = (
        "import sys\nfrom streamcast.cli import main\n"
        "try:\n    main(['train', '--help'])\nexcept SystemExit:\n    pass\n"
        "print('TF' if 'tensorflow' in sys.modules else 'NO-TF')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().endswith("NO-TF")
    assert "--epochs" in out.stdout


def test_user_errors_are_one_line_without_traceback(tmp_path, capsys):
    assert main(["train", "--data", str(tmp_path / "none.csv"), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "streamcast train: error:" in err and "no such file" in err and "Traceback" not in err


def test_bad_layers_are_a_user_error(tmp_path, capsys):
    path = tmp_path / "s.csv"
    path.write_text("\n".join(str(v) for v in sine_series(200)))
    assert (
        main(["train", "--data", str(path), "--layers", "2,5,1", "--out", str(tmp_path / "m")]) == 2
    )
    assert "layer sizes must look like" in capsys.readouterr().err


def test_train_then_evaluate_writes_model_figures_and_metrics(tmp_path, capsys):
    data = tmp_path / "sine.csv"
    data.write_text("\n".join(f"{v:.9f}" for v in sine_series(1100)) + "\n")
    model_dir = tmp_path / "model"
    args = [
        "train",
        "--data",
        str(data),
        "--layers",
        "1,4,4,1",
        "--epochs",
        "1",
        "--out",
        str(model_dir),
    ]
    assert main(args) == 0
    sidecar = json.loads((model_dir / "model.json").read_text())
    assert sidecar["normalise"] is False  # the sine crosses zero
    assert sidecar["data"]["points"] == 1100 and sidecar["training"]["epochs_run"] == 1

    out = tmp_path / "eval"
    assert (
        main(["evaluate", "--model", str(model_dir), "--data", str(data), "--out", str(out)]) == 0
    )
    report = json.loads((out / "metrics.json").read_text())
    assert report["model"] == sidecar["version"] and report["test_windows"] == 105
    for mode in ("point", "full", "multiple"):
        png = (out / f"{mode}.png").read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 10_000
        m = report["modes"][mode]
        assert m["skill"] == pytest.approx(1 - m["model"]["mse"] / m["naive"]["mse"])
    # the naive 1-step error is known from the data alone
    series = sine_series(1100)
    naive = np.mean((series[-105:] - series[-106:-1]) ** 2)
    assert report["modes"]["point"]["naive"]["mse"] == pytest.approx(naive)
    assert report["modes"]["multiple"]["paths"] == 2  # test windows 0 and 50 of 105
    assert len(report["modes"]["multiple"]["by_horizon"]["model_mse"]) == 50
    assert len(report["modes"]["full"]["by_horizon"]["model_mse"]) == 50
    # bands calibrated online through the test span: point and multiple (full has none)
    assert set(report["intervals"]) == {"point", "multiple"}
    for mode, horizons in (("point", 1), ("multiple", 50)):
        for level in ("80", "95"):
            summary = report["intervals"][mode][level]
            assert summary["horizon"] == list(range(1, horizons + 1))
            assert all(0.0 <= c <= 1.0 for c in summary["coverage"])
            assert all(w > 0 for w in summary["mean_width"] + summary["mean_relative_width"])
        assert all(
            w80 < w95
            for w80, w95 in zip(
                report["intervals"][mode]["80"]["mean_width"],
                report["intervals"][mode]["95"]["mean_width"],
                strict=True,
            )
        )


@pytest.mark.slow
def test_default_training_meets_the_sine_accuracy_targets(tmp_path, shared_data):
    """The default command: 1-step MSE <= 0.1 x naive; 50-step paths mean MSE <= 0.01."""
    data = shared_data / "sinwave.csv"
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "m")]) == 0
    out = tmp_path / "eval"
    assert (
        main(["evaluate", "--model", str(tmp_path / "m"), "--data", str(data), "--out", str(out)])
        == 0
    )
    report = json.loads((out / "metrics.json").read_text())["modes"]
    assert report["point"]["model"]["mse"] <= 0.1 * report["point"]["naive"]["mse"]
    assert report["multiple"]["model"]["mse"] <= 0.01


def test_experiment_trains_and_evaluates_in_one_command(tmp_path, capsys):
    data = tmp_path / "walk.csv"
    prices = 100 * np.exp(np.cumsum(np.random.default_rng(0).normal(0, 0.01, 700)))
    data.write_text("Date,Close\n" + "\n".join(f"d{i},{p:.4f}" for i, p in enumerate(prices)))
    out = tmp_path / "exp"
    assert main(["experiment", "--data", str(data), "--epochs", "1", "--out", str(out)]) == 0
    sidecar = json.loads((out / "model" / "model.json").read_text())
    assert sidecar["normalise"] is True  # every price is positive
    report = json.loads((out / "metrics.json").read_text())
    assert set(report["modes"]) == {"point", "full", "multiple"}
    assert (out / "multiple.png").is_file()
    assert "trained" in capsys.readouterr().out


@pytest.mark.slow
def test_history_retrain_and_models_from_the_command_line(redis_server, tmp_path, shared_data):
    import os
    import subprocess
    import sys

    env = {**os.environ, "STREAMCAST_REDIS_URL": redis_server.url, "STREAMCAST_KEY_PREFIX": "ops"}

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "streamcast.cli", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            cwd=tmp_path,
        )

    sp500 = str(shared_data / "sp500.csv")
    out = cli("history", "import", sp500, "--symbol", "SPX")
    assert out.returncode == 0 and "imported 4171 prices" in out.stdout, out.stderr
    again = cli("history", "import", sp500, "--symbol", "SPX")
    assert again.returncode == 2 and "already holds 4171 entries" in again.stderr
    assert "Traceback" not in again.stderr
    assert "no versions registered" in cli("models", "list").stdout

    out = cli("retrain", "--epochs", "1", "--max-points", "800", "--min-windows", "100")
    assert out.returncode == 0 and out.stdout.startswith("promoted: held-out MSE"), out.stderr
    candidate = out.stdout.strip().split("-> ")[-1]
    listing = cli("models", "list").stdout.splitlines()
    assert len(listing) == 2 and listing[1].startswith(f"* {candidate}"), listing
    assert "test skill" in listing[0] and "test skill" in listing[1], listing
    assert "rolled back to" in cli("models", "rollback").stdout
    assert cli("models", "list").stdout.splitlines()[0].startswith("* ")
    out = cli("models", "promote", candidate)
    assert out.returncode == 0 and f"promoted {candidate}" in out.stdout, out.stderr
    log = cli("models", "log").stdout.splitlines()
    assert [line.split("event=")[1].split()[0] for line in log if "event=" in line][:3] == [
        "promoted",
        "rollback",
        "retrain",
    ]
    shown = cli("models", "show", candidate)
    assert '"parent"' in shown.stdout and '"test_windows"' in shown.stdout
    assert '"parent_mse"' in shown.stdout  # a retrained model: its parent's score too
    missing = cli("models", "promote", "no-such-version")
    assert missing.returncode == 2 and "no model version 'no-such-version'" in missing.stderr


def test_normalise_on_a_series_that_crosses_zero_names_the_value_and_the_flag(tmp_path, capsys):
    from streamcast.training import NormaliseError, TrainOptions, prepare

    path = tmp_path / "s.csv"
    path.write_text("\n".join(str(v) for v in sine_series(200)))
    args = ["train", "--data", str(path), "--normalise", "--out", str(tmp_path / "m")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "series 1 has values <= 0 (value 36 is " in err
    assert err.rstrip().endswith("train with --no-normalise for series that cross zero")
    # the trainer's own message names no flag: retrain, which runs it too, has none
    with pytest.raises(NormaliseError) as caught:
        prepare([sine_series(200)], TrainOptions(normalise=True))
    assert "--" not in str(caught.value)


# -- bad files on the command line: exit 2, one line naming the file ----------------------------


def run_cli(capsys, *args: str) -> tuple[int, list[str]]:
    """main(args); its exit status and the lines it wrote to stderr."""
    code = main(list(args))
    return code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


HEADED = "a,b\n" + "\n".join(f"{i},{i}" for i in range(60))


@pytest.mark.parametrize(
    ("content", "extra", "message"),
    [
        (None, (), "no such file"),
        ("", (), "the file is empty"),
        (b"\xff\xfe\x00garbage\x80", (), "not a text file"),
        ("1.0\n2.0\nabc\n", (), "line 3: not a number: 'abc'"),
        ("1.0\nnan\n", (), "line 2: 'nan' is not a finite number"),
        ("1.0\n2.0\n", (), "2 values, fewer than one window of 51"),
        (HEADED, (), "no 'Close'"),
        (HEADED, ("--column", "c"), "no column 'c' (columns: a, b)"),
    ],
    ids=["missing", "empty", "binary", "non-numeric", "non-finite", "too-short", "no-close",
         "no-column"],
)  # fmt: skip
def test_a_bad_csv_is_exit_2_and_one_line_naming_the_file(
    tmp_path, capsys, content, extra, message
):
    path = tmp_path / "prices.csv"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    out = tmp_path / "model"
    code, lines = run_cli(capsys, "train", "--data", str(path), *extra, "--out", str(out))
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"streamcast train: error: {path}") and message in lines[0]
    assert not out.exists()


def _tamper(directory):
    path = directory / "model.keras"
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(directory):
    from streamcast.model import ModelInfo, sha256_file, write_sidecar

    path = directory / "model.keras"
    path.write_bytes(path.read_bytes()[:200])
    info = ModelInfo.read(directory / "model.json")
    info.sha256 = sha256_file(path)  # the hash matches: only loading finds it broken
    write_sidecar(directory, info)


def _sidecar(text):
    def write(directory):
        if text is None:
            (directory / "model.json").unlink()
        else:
            (directory / "model.json").write_text(text)

    return write


WRONG_TYPE = (
    '{"version": "x", "created": "c", "seq_len": "fifty", "normalise": true, "sha256": "0"}'
)


@pytest.mark.parametrize(
    ("damage", "named", "message"),
    [
        (_tamper, "model.keras", "does not match the sidecar"),
        (_truncate, "model.keras", "cannot load"),
        (_sidecar(None), "model.json", "sidecar missing"),
        (_sidecar("{not json"), "model.json", "not valid JSON"),
        (_sidecar('{"version": "x"}'), "model.json", "sidecar lacks"),
        (_sidecar(WRONG_TYPE), "model.json", "seq_len must be a positive integer"),
        (lambda d: shutil.rmtree(d), "", "not a model directory"),
    ],
    ids=["tampered", "truncated", "no-sidecar", "sidecar-not-json", "sidecar-incomplete",
         "sidecar-wrong-type", "no-directory"],
)  # fmt: skip
def test_a_bad_model_is_exit_2_and_one_line_naming_the_file(
    tmp_path, capsys, tiny_model, damage, named, message
):
    from streamcast.model import save_model

    model = tmp_path / "model"
    save_model(tiny_model, model, normalise=False)
    damage(model)
    data = tmp_path / "sine.csv"
    data.write_text("\n".join(str(v) for v in sine_series(200)))
    out = tmp_path / "eval"
    code, lines = run_cli(
        capsys, "evaluate", "--model", str(model), "--data", str(data), "--out", str(out)
    )
    assert code == 2 and len(lines) == 1, lines
    assert f"{model / named}".rstrip("/") in lines[0] and message in lines[0], lines[0]
    assert lines[0].startswith("streamcast evaluate: error: ")
    assert not out.exists()


@pytest.mark.slow
def test_a_registry_version_whose_bytes_changed_is_exit_2_and_one_line_naming_it(
    redis_server, tmp_path, capsys, monkeypatch, tiny_model
):
    import redis as redis_sync

    from streamcast.keys import Keys
    from streamcast.model import save_model

    monkeypatch.setenv("STREAMCAST_REDIS_URL", redis_server.url)
    monkeypatch.setenv("STREAMCAST_KEY_PREFIX", "bytes")
    monkeypatch.setenv("STREAMCAST_MODEL_CACHE_DIR", str(tmp_path / "cache"))
    info = save_model(tiny_model, tmp_path / "model", normalise=False)
    code, lines = run_cli(capsys, "models", "add", str(tmp_path / "model"))
    assert code == 0 and lines == [], lines
    client = redis_sync.Redis(port=redis_server.port)
    try:
        key = Keys("bytes").model(info.version)
        blob = bytearray(client.hget(key, "keras"))
        blob[-10] ^= 0xFF
        client.hset(key, "keras", bytes(blob))
    finally:
        client.close()
    code, lines = run_cli(capsys, "models", "promote", info.version)
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"streamcast models: error: model {info.version} ")
    assert "corrupt" in lines[0]
    assert not (tmp_path / "cache" / info.version).exists()
