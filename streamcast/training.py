"""From series to a saved, scored model: windows, split, fit, evaluate on held-out data, save."""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from streamcast.data import DataError, make_windows, split_windows, xy
from streamcast.model import ModelConfig, ModelInfo, build_model, save_model, train_model

log = logging.getLogger(__name__)


@dataclass
class TrainOptions:
    epochs: int = 8
    batch_size: int = 32
    learning_rate: float | None = None
    cosine_decay: bool = True
    validation_split: float = 0.05
    early_stopping_patience: int | None = None
    seed: int = 0
    train_fraction: float = 0.9
    normalise: bool | None = None  # None: normalise when every value is > 0
    residual: bool = False  # predict the change from the last value (zero output = naive)
    config: ModelConfig = field(default_factory=ModelConfig.from_sizes)
    verbose: int | None = None  # None: a progress bar on a terminal, a line per epoch otherwise


@dataclass
class Prepared:
    x: np.ndarray
    y: np.ndarray
    test: list[np.ndarray]  # ordered test windows of each series, in price space
    normalise: bool


class NormaliseError(DataError):
    """Normalisation asked for on a series with values <= 0.

    The text names no command-line flag: the trainer runs for ``train`` (which has
    ``--no-normalise``) and for ``retrain`` (which follows the current model), so each caller
    adds the advice that fits it.
    """


def choose_normalise(series: list[np.ndarray], normalise: bool | None) -> bool:
    """Resolve ``normalise=None`` to whether every value is positive; refuse an impossible True."""
    positive = all(bool(np.all(s > 0)) for s in series)
    if normalise is None:
        return positive
    if normalise and not positive:
        n = next(i for i, s in enumerate(series) if not np.all(s > 0))
        at = int(np.argmax(~(series[n] > 0)))
        raise NormaliseError(
            "normalisation divides each window by its first value, but series "
            f"{n + 1} has values <= 0 (value {at + 1} is {float(series[n][at])!r})"
        )
    return normalise


def prepare(series: list[np.ndarray], options: TrainOptions) -> Prepared:
    """Windows of every series, split 90/10 per series; training windows pooled and shuffled."""
    normalise = choose_normalise(series, options.normalise)
    seq_len = options.config.seq_len
    train_parts, test = [], []
    for n, values in enumerate(series):
        split = split_windows(
            make_windows(values, seq_len), options.train_fraction, options.seed + n
        )
        train_parts.append(split.train)
        test.append(split.test)
    train = np.concatenate(train_parts)
    np.random.default_rng(options.seed).shuffle(train)
    x, y = xy(train, normalise, options.residual)
    return Prepared(x=x, y=y, test=test, normalise=normalise)


def train_and_save(
    series: list[np.ndarray], options: TrainOptions, out: str | Path, data_info: dict[str, Any]
) -> ModelInfo:
    """Train a model on ``series``, score it on the held-out windows, save it to ``out``."""
    from streamcast.evaluate import evaluate
    from streamcast.forecaster import Forecaster

    prepared = prepare(series, options)
    log.info(
        "training on %d windows (%s), %d epochs",
        len(prepared.x),
        "normalised" if prepared.normalise else "raw values",
        options.epochs,
    )
    model = build_model(options.config, seed=options.seed)
    result = train_model(
        model,
        prepared.x,
        prepared.y,
        epochs=options.epochs,
        batch_size=options.batch_size,
        validation_split=options.validation_split,
        early_stopping_patience=options.early_stopping_patience,
        seed=options.seed,
        learning_rate=options.learning_rate,
        cosine_decay=options.cosine_decay,
        verbose=options.verbose
        if options.verbose is not None
        else (1 if sys.stdout.isatty() else 2),
    )
    with Forecaster(model, normalise=prepared.normalise, residual=options.residual) as forecaster:
        test = np.concatenate(prepared.test)
        point = evaluate(forecaster, test, "point").metrics
    metrics = {
        "test_windows": len(test),
        "mse": point["model"]["mse"],
        "naive_mse": point["naive"]["mse"],
        "skill": point["skill"],
        "final_loss": result.history.get("loss", [float("nan")])[-1],
    }
    info = save_model(
        model,
        out,
        normalise=prepared.normalise,
        residual=options.residual,
        data={**data_info, "train_windows": len(prepared.x), "test_windows": len(test)},
        metrics=metrics,
        config=options.config,
        training={
            "epochs": options.epochs,
            "epochs_run": result.epochs_run,
            "batch_size": options.batch_size,
            "learning_rate": options.learning_rate,
            "cosine_decay": options.cosine_decay,
            "validation_split": options.validation_split,
            "seed": options.seed,
            "seconds": round(result.seconds, 2),
        },
    )
    log.info(
        "saved %s to %s: test MSE %.4g vs naive %.4g (skill %+.3f) after %.1f s",
        info.version,
        out,
        metrics["mse"],
        metrics["naive_mse"],
        metrics["skill"],
        result.seconds,
    )
    return info
