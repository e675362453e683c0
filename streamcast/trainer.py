"""The trainer child process of a retrain: ``python -m streamcast.trainer JOB_DIR``.

The parent (:class:`streamcast.retrain.Retrainer`) writes ``job.json`` (a
:class:`~streamcast.retrain.TrainerJob`) and runs this at a lower CPU priority; it exits when
the parent dies. With a Redis client of its own it reads the histories (``read.json`` says what
it read), skips when too little is usable, scores the current model on the held-out windows,
trains the candidate on the rest, scores it, saves it, and reports in ``result.json``: a
candidate, or a ``skipped``/``failed`` outcome and its reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from redis import exceptions as redis_errors

from streamcast import history
from streamcast.connect import REDIS_DOWN
from streamcast.history import TrainingHistories
from streamcast.model import ModelConfig, ModelError, ModelInfo, load_model
from streamcast.retrain import RetrainConfig, TrainerJob
from streamcast.training import Parent, TrainOptions, train_and_save

log = logging.getLogger(__name__)


def _exit_with_parent() -> None:
    """Exit when the parent dies (a killed daemon must not leave a trainer running)."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(70)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


async def read_histories(task: TrainerJob) -> TrainingHistories:
    """The job's histories, read with a client of the child's own, closed when done."""
    cfg, source = task.config, task.source
    redis = source.connect()
    try:
        names = list(cfg.symbols) or await history.symbols(redis, source.keys)
        return await history.read_for_training(
            redis,
            source.keys,
            names,
            max_points=cfg.max_points,
            min_points=task.min_points,
            limits=cfg.limits,
        )
    finally:
        await redis.aclose()


def read_step(job: Path, task: TrainerJob) -> TrainingHistories | dict[str, Any]:
    """The trainer's first step: read the histories and say what was read (``read.json``).

    Returns them when there is enough to train on, else the outcome to hand back (``skipped``,
    or ``failed`` when Redis cannot be read) with its reason, as the parent would have said it.
    """
    cfg = task.config
    try:
        read = asyncio.run(read_histories(task))
    except REDIS_DOWN as exc:
        why = f"redis unavailable mid-retrain ({type(exc).__name__}): the history was not read"
        return {"outcome": "failed", "reason": why}
    except history.HistoryError as exc:
        return {"outcome": "failed", "reason": str(exc)}
    except redis_errors.RedisError as exc:  # a wrong type at a history key, ...
        return {"outcome": "failed", "reason": f"{type(exc).__name__}: {exc}"}
    windows = sum(len(s) - task.seq_len for s in read.series)
    _write_json(
        job / "read.json",
        {"symbols": read.symbols, "windows": windows, "skipped": read.skipped, "notes": read.notes},
    )
    train_windows = int(windows * (1 - cfg.holdout_fraction))
    if train_windows < cfg.min_windows:
        reason = (
            f"not enough history: {train_windows} training windows from {len(read.symbols)} "
            f"symbol(s), at least {cfg.min_windows} needed"
        )
        return {"outcome": "skipped", "reason": reason}
    log.info(
        "retraining on %d windows of %d symbol(s), %d epochs",
        windows,
        len(read.symbols),
        cfg.epochs,
    )
    return read


def train_candidate(job: Path, task: TrainerJob, read: TrainingHistories) -> dict[str, Any]:
    """The trainer's work in ``job``: score the current model, train, score, save; the result."""
    series = read.series
    current, info = load_model(task.current_dir)
    saved = train_and_save(
        series,
        _candidate_options(task.config, info),
        job / "candidate",
        {
            "source": "history",
            "symbols": read.symbols,
            "points": int(sum(len(s) for s in series)),
            "parent": info.version,
        },
        parent=Parent(current, info, warm_start=task.config.warm_start),
        relative=info.normalise,
        workers=max(1, task.config.threads),
    )
    scores = saved.metrics
    if not math.isfinite(scores["mse"]):
        raise ModelError(
            f"training diverged: held-out MSE {scores['mse']} (final loss {scores['final_loss']})"
        )
    return {
        "candidate_dir": str(job / "candidate"),
        "version": saved.version,
        "candidate_mse": scores["mse"],
        "current_mse": scores["parent_mse"],
        "naive_mse": scores["naive_mse"],
    }


def _write_json(path: Path, value: dict[str, Any]) -> None:
    """Write whole or not at all: the parent may read it after a kill."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value), encoding="utf-8")
    os.replace(tmp, path)


def _candidate_options(config: RetrainConfig, current: ModelInfo) -> TrainOptions:
    """Train as the current model was built (its layers, normalisation, by default its target);
    the newest ``holdout_fraction`` of each symbol's windows is held out, none for validation."""
    residual = current.residual if config.residual is None else bool(config.residual)
    return TrainOptions(
        epochs=config.epochs,
        batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        cosine_decay=True,
        validation_split=0.0,
        seed=config.seed,
        train_fraction=1.0 - config.holdout_fraction,
        normalise=current.normalise,
        residual=residual,
        config=ModelConfig.from_dict(current.config)
        if current.config
        else ModelConfig.from_sizes(),
        verbose=2,
        stop_on_nan=True,
    )


def worker_main(argv: Sequence[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m streamcast.trainer JOB_DIR", file=sys.stderr)
        return 2
    job = Path(argv[0])
    _exit_with_parent()
    task = TrainerJob.read(job)
    config = task.config
    with contextlib.suppress(OSError):
        os.nice(config.nice)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    read = read_step(job, task)  # before TensorFlow is imported: a skip costs no import
    if isinstance(read, dict):
        _write_json(job / "result.json", read)
        print(f"trainer: {read['outcome']}: {read['reason']}", file=sys.stderr)
        return 0
    import tensorflow as tf

    if config.threads > 0:
        tf.config.threading.set_intra_op_parallelism_threads(config.threads)
        tf.config.threading.set_inter_op_parallelism_threads(config.threads)
    try:
        result = train_candidate(job, task, read)
    except (ModelError, ValueError) as exc:
        print(f"trainer: {exc}", file=sys.stderr)
        return 3
    _write_json(job / "result.json", result)
    print(f"trainer: candidate {result['version']} saved", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
