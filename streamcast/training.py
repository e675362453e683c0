"""From series to a saved, scored model: windows, split, fit, evaluate on held-out data, save."""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from streamcast.data import DataError, make_windows, split_windows, xy
from streamcast.model import (
    ModelConfig,
    ModelInfo,
    TrainResult,
    build_model,
    save_model,
    train_model,
)
from streamcast.scoring import skill

if TYPE_CHECKING:
    import keras

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
    stop_on_nan: bool = False  # end the fit at the first NaN loss (a diverged run)


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


@dataclass
class Parent:
    """The model a retrain starts from; it is scored on the same held-out windows first."""

    model: keras.Model
    info: ModelInfo
    warm_start: bool = True  # fine-tune its weights (in place) when its target is the same


def train_and_save(
    series: list[np.ndarray],
    options: TrainOptions,
    out: str | Path,
    data_info: dict[str, Any],
    *,
    parent: Parent | None = None,
    relative: bool = False,
    workers: int | None = None,
) -> ModelInfo:
    """Train a model on ``series``, score it on the held-out windows, save it to ``out``.

    The one training path, for ``streamcast train`` and for the retrain child. With a
    ``parent`` the parent is scored on the same windows before training (``parent_mse``) and,
    with ``warm_start``, fine-tuned rather than a new model built. ``relative`` scores errors
    as fractions of the last price (:func:`streamcast.scoring.relative_errors`); ``workers``
    are the scoring engine's threads (default: its own choice).
    """
    prepared = prepare(series, options)
    test = np.concatenate(prepared.test)
    log.info(
        "training on %d windows (%s), %d epochs",
        len(prepared.x),
        "normalised" if prepared.normalise else "raw values",
        options.epochs,
    )
    parent_mse = None
    if parent is not None:
        parent_mse, _ = _held_out_mse(
            parent.model, test, prepared.normalise, parent.info.residual, relative, workers
        )
    model, warm_start = _starting_model(options, parent)
    result = fit(model, prepared, options)
    mse, naive_mse = _held_out_mse(
        model, test, prepared.normalise, options.residual, relative, workers
    )
    info = save_model(
        model,
        out,
        normalise=prepared.normalise,
        residual=options.residual,
        data={**data_info, "train_windows": len(prepared.x), "test_windows": len(test)},
        metrics=sidecar_metrics(
            len(test), mse, naive_mse, relative, result.history, parent_mse=parent_mse
        ),
        config=options.config,
        training=_training_info(options, result, warm_start),
    )
    log.info(
        "saved %s to %s: test MSE %.4g vs naive %.4g (skill %+.3f) after %.1f s",
        info.version,
        out,
        mse,
        naive_mse,
        skill(mse, naive_mse),
        result.seconds,
    )
    return info


def fit(model: keras.Model, prepared: Prepared, options: TrainOptions) -> TrainResult:
    """Fit ``model`` in place on the prepared training windows, as ``options`` say."""
    callbacks = []
    if options.stop_on_nan:
        import keras

        callbacks.append(keras.callbacks.TerminateOnNaN())
    return train_model(
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
        callbacks=callbacks,
    )


def sidecar_metrics(
    test_windows: int,
    mse: float,
    naive_mse: float,
    relative: bool,
    history: dict[str, list[float]],
    *,
    parent_mse: float | None = None,
) -> dict[str, Any]:
    """A saved model's ``metrics``: its 1-step scores on the held-out test windows.

    ``mse`` and ``naive_mse`` (the naive forecast's) are in price units, or fractions of the
    last price when ``relative``; ``skill`` is ``1 - mse / naive_mse``; ``final_loss`` the last
    epoch's training loss; ``parent_mse`` (a retrained model only) is its parent's MSE on the
    same windows. :meth:`streamcast.model.ModelInfo.test_skill` reads it back.
    """
    metrics: dict[str, Any] = {
        "test_windows": test_windows,
        "mse": mse,
        "naive_mse": naive_mse,
        "skill": skill(mse, naive_mse),
        "relative": relative,
        "final_loss": history.get("loss", [float("nan")])[-1],
    }
    if parent_mse is not None:
        metrics["parent_mse"] = parent_mse
    return metrics


def _starting_model(options: TrainOptions, parent: Parent | None) -> tuple[keras.Model, bool]:
    """The parent's model to fine-tune (and True), or a new one built from the options."""
    if parent is not None and parent.warm_start and options.residual == parent.info.residual:
        model = parent.model  # fine-tune the serving weights on the newer data
        model.compile(loss=options.config.loss, optimizer=options.config.optimizer)
        return model, True
    return build_model(options.config, seed=options.seed), False


def _held_out_mse(
    model: keras.Model,
    test: np.ndarray,
    normalise: bool,
    residual: bool,
    relative: bool,
    workers: int | None,
) -> tuple[float, float]:
    """(model, naive) 1-step MSE on the ordered test windows."""
    from streamcast.evaluate import holdout_mse
    from streamcast.forecaster import Forecaster

    with Forecaster(model, normalise=normalise, residual=residual, workers=workers) as engine:
        return holdout_mse(engine, test, relative=relative)


def _training_info(options: TrainOptions, result: TrainResult, warm_start: bool) -> dict[str, Any]:
    return {
        "epochs": options.epochs,
        "epochs_run": result.epochs_run,
        "batch_size": options.batch_size,
        "learning_rate": options.learning_rate,
        "cosine_decay": options.cosine_decay,
        "validation_split": options.validation_split,
        "seed": options.seed,
        "warm_start": warm_start,
        "seconds": round(result.seconds, 2),
    }
