"""The tutorial's commands: ``train``, ``evaluate`` and ``experiment``."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from streamcast.cli.common import (
    UserError,
    _fraction,
    _layers,
    _positive_int,
    _quiet_tensorflow,
)

if TYPE_CHECKING:
    import numpy as np

    from streamcast.model import ModelConfig

# -- train ---------------------------------------------------------------------------------


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a model on a CSV file or the project's synthetic series and save it",
        description="Window, split 90/10, train the LSTM, score it on the held-out 10%% and save "
        "model.keras + model.json to --out.",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", type=Path, help="CSV file: a bare column or a headed CSV")
    source.add_argument(
        "--sine",
        action="store_true",
        help="the tutorial's sine (5001 points), made by the project itself",
    )
    source.add_argument(
        "--synthetic",
        type=_positive_int,
        metavar="SYMBOLS",
        help="train on this many of the project's own synthetic price series",
    )
    p.add_argument("--column", help="column of a headed CSV (default: Close)")
    p.add_argument("--points", type=_positive_int, default=3000, help="points per synthetic series")
    p.add_argument("--epochs", type=_positive_int, default=8)
    p.add_argument("--batch-size", type=_positive_int, default=32)
    p.add_argument("--learning-rate", type=float, help="initial rate (default: the optimiser's)")
    p.add_argument(
        "--cosine-decay",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="decay the learning rate to zero over the run (default: on)",
    )
    p.add_argument("--validation-split", type=_fraction, default=0.05)
    p.add_argument(
        "--early-stopping",
        type=_positive_int,
        metavar="PATIENCE",
        help="stop after PATIENCE epochs without improvement",
    )
    p.add_argument(
        "--normalise",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="normalise each window to its first value (default: when every value is > 0)",
    )
    p.add_argument(
        "--residual",
        action="store_true",
        help="the network predicts the change from the last value (an untrained one = naive)",
    )
    p.add_argument("--layers", type=_layers, default=[1, 50, 100, 1], help="default 1,50,100,1")
    p.add_argument("--dropout", type=_fraction, default=0.2)
    p.add_argument(
        "--config", type=Path, help="JSON model config with a 'layers' list (overrides --layers)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True, help="directory for model.keras + model.json")
    p.set_defaults(func=_train)


def _train(args: argparse.Namespace) -> int:
    from streamcast.training import TrainOptions

    series, data_info = _training_series(args)
    options = TrainOptions(
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        cosine_decay=args.cosine_decay,
        validation_split=args.validation_split,
        early_stopping_patience=args.early_stopping,
        seed=args.seed,
        normalise=args.normalise,
        residual=args.residual,
        config=_model_config(args),
    )
    _quiet_tensorflow()
    from streamcast.training import NormaliseError, train_and_save

    try:
        info = train_and_save(series, options, args.out, data_info)
    except NormaliseError as exc:
        raise UserError(f"{exc}; train with --no-normalise for series that cross zero") from None
    print(
        f"saved model {info.version} to {args.out}: test MSE {info.metrics['mse']:.4g}, "
        f"naive {info.metrics['naive_mse']:.4g}, skill {info.metrics['skill']:+.3f}"
    )
    return 0


def _training_series(args: argparse.Namespace) -> tuple[list[np.ndarray], dict[str, Any]]:
    """The series ``train`` learns from (--data, --sine or --synthetic) and where they came from."""
    from streamcast.data import load_series, sine_series, synthetic_prices

    if args.data is not None:
        series = load_series(args.data, args.column)
        return [series], {
            "source": str(args.data),
            "column": args.column,
            "points": len(series),
            "range": f"values 1..{len(series)} of the file, oldest first",
        }
    if args.sine:
        series = sine_series()
        return [series], {"source": "sine:5001", "points": len(series)}
    if args.column:
        raise UserError("--column applies to --data files only")
    prices = synthetic_prices(args.synthetic, args.points, seed=args.seed)
    return list(prices), {
        "source": f"synthetic:{args.synthetic}x{args.points}:seed={args.seed}",
        "points": int(prices.size),
        "range": f"{args.synthetic} symbols x steps 0..{args.points - 1}",
    }


def _model_config(args: argparse.Namespace) -> ModelConfig:
    """The network from --config (a JSON layer list) or else --layers and --dropout."""
    from streamcast.model import ModelConfig, ModelError

    try:
        if args.config is None:
            return ModelConfig.from_sizes(args.layers, dropout=args.dropout)
        try:
            raw = json.loads(args.config.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise UserError(f"{args.config}: cannot read the model config ({exc})") from None
        return ModelConfig.from_dict(raw.get("model", raw) if isinstance(raw, dict) else raw)
    except ModelError as exc:
        raise UserError(str(exc)) from None


# -- evaluate ------------------------------------------------------------------------------


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="the tutorial's point / full / multiple predictions on the test split, with figures",
        description="Forecast the last 10%% of a series' windows in price space, write a PNG per "
        "mode and metrics.json (model vs the naive forecast, skill, error by horizon, and the "
        "coverage and width of 80%% and 95%% bands calibrated online through the test span).",
    )
    p.add_argument("--model", type=Path, help="model directory (default: the shipped model)")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--column")
    p.add_argument("--mode", choices=["point", "full", "multiple", "all"], default="all")
    p.add_argument("--horizon", type=_positive_int, default=50, help="steps per multiple-mode path")
    p.add_argument(
        "--train-fraction", type=_fraction, default=0.9, help="windows before the test split"
    )
    p.add_argument(
        "--out", type=Path, required=True, help="directory for the PNGs and metrics.json"
    )
    p.set_defaults(func=_evaluate)


def _evaluate(args: argparse.Namespace) -> int:
    from streamcast.data import load_series
    from streamcast.model import DEFAULT_MODEL_DIR

    series = load_series(args.data, args.column)
    modes = ("point", "full", "multiple") if args.mode == "all" else (args.mode,)
    run_evaluation(
        args.model or DEFAULT_MODEL_DIR,
        series,
        name=args.data.name,
        out=args.out,
        modes=modes,
        horizon=args.horizon,
        train_fraction=args.train_fraction,
    )
    return 0


def run_evaluation(
    model_dir: Path,
    series: np.ndarray,
    *,
    name: str,
    out: Path,
    modes: Sequence[str] = ("point", "full", "multiple"),
    horizon: int = 50,
    train_fraction: float = 0.9,
) -> dict[str, Any]:
    """Evaluate ``modes`` on the test split of ``series``; write PNGs and metrics.json to ``out``."""
    from streamcast.data import held_out_windows, make_windows

    test = held_out_windows(make_windows(series), train_fraction)
    n_test = len(test)
    if n_test < 1:
        raise UserError(f"{name}: no test windows with a train fraction of {train_fraction}")
    _quiet_tensorflow()
    from streamcast.evaluate import evaluate
    from streamcast.forecaster import Forecaster

    try:
        from streamcast.plots import plot_evaluation
    except ModuleNotFoundError as exc:  # the `plots` extra, which the image leaves out
        if exc.name != "matplotlib":
            raise
        raise UserError("the figures need matplotlib: pip install 'streamcast[plots]'") from None

    with Forecaster.load(model_dir) as forecaster:
        if forecaster.normalise and (series <= 0).any():
            raise UserError(f"{name}: has values <= 0 but model {forecaster.version} is normalised")
        report: dict[str, Any] = {
            "model": forecaster.version,
            "model_dir": str(model_dir),
            "data": name,
            "test_windows": int(n_test),
            "modes": {},
            "intervals": {},  # per mode: coverage and width of the online-calibrated bands
        }
        out.mkdir(parents=True, exist_ok=True)
        for mode in modes:
            result = evaluate(forecaster, test, mode, horizon=horizon)
            figure = plot_evaluation(result, out / f"{mode}.png", title=name)
            report["modes"][mode] = result.metrics
            if result.intervals:
                report["intervals"][mode] = result.intervals
            m = result.metrics
            print(
                f"{mode:>8}: MSE {m['model']['mse']:.4g}  naive {m['naive']['mse']:.4g}  "
                f"skill {m['skill']:+.3f}  MAE {m['model']['mae']:.4g}  "
                f"direction {m['model']['direction_accuracy']:.1%}  -> {figure}"
            )
    (out / "metrics.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"metrics: {out / 'metrics.json'}")
    return report


# -- experiment ----------------------------------------------------------------------------


def _add_experiment(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "experiment",
        help="the tutorial end to end: train on the sine (or --data) and evaluate all three modes",
        description="Train with the default settings, then write the point, full and multiple "
        "figures and metrics.json to --out. Needs no data file: the sine is built in.",
    )
    p.add_argument("--data", type=Path, help="CSV file (default: the built-in sine)")
    p.add_argument("--column")
    p.add_argument("--epochs", type=_positive_int, default=8)
    p.add_argument("--out", type=Path, default=Path("runs/sine"))
    p.set_defaults(func=_experiment)


def _experiment(args: argparse.Namespace) -> int:
    from streamcast.data import load_series, sine_series
    from streamcast.training import TrainOptions

    if args.data is not None:
        series = load_series(args.data, args.column)
        name, data_info = args.data.name, {"source": str(args.data), "column": args.column}
    else:
        series = sine_series()
        name, data_info = "sine", {"source": "sine:5001"}
    data_info["points"] = len(series)
    _quiet_tensorflow()
    from streamcast.training import train_and_save

    model_dir = args.out / "model"
    info = train_and_save([series], TrainOptions(epochs=args.epochs), model_dir, data_info)
    print(f"trained {info.version} in {info.training['seconds']:.0f} s -> {model_dir}")
    run_evaluation(model_dir, series, name=name, out=args.out)
    return 0
