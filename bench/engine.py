"""Engine speed: the tutorial's way against Forecaster, measured side by side in one run.

    python bench/engine.py [--model DIR] [--reps 5] [--batches 1,64,512] [--record]

For each batch size B (symbols) it times a 50-step rollout done the tutorial's way (one
``model.predict`` per step per window; enough calls are timed to extrapolate) against
``Forecaster.rollout``, and one step by ``model.predict`` on the whole batch against
``Forecaster.predict_next``. It counts the LSTM's multiply-adds to give achieved GFLOP/s, next to
this machine's float32 numpy matmul rate measured in the same run. Medians throughout. The
tutorial's rollout time is extrapolated from the timed calls (B x 50 calls would take hours).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
from results import Report

STEPS = 50


def median_seconds(fn: Callable[[], object], reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_gflops(n: int = 2048, reps: int = 5) -> float:
    a = np.random.default_rng(0).random((n, n), dtype=np.float32)
    a @ a
    return 2 * n**3 / median_seconds(lambda: a @ a, reps) / 1e9


def tutorial_rollout(model, window: np.ndarray, steps: int) -> np.ndarray:
    """The tutorial's predict_sequences_multiple for one window: a model.predict per step."""
    window = window.copy()
    out = []
    for _ in range(steps):
        first = window[0]
        x = (window / first - 1.0)[None, :, None]
        y = float(model.predict(x, verbose=0)[0, 0])
        forecast = first * (y + 1.0)
        out.append(forecast)
        window = np.append(window[1:], forecast)
    return np.array(out)


def prices(rows: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    start = rng.uniform(20, 500, size=(rows, 1))
    return start * np.exp(np.cumsum(rng.normal(0, 0.01, size=(rows, 50)), axis=1))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, help="model directory (default: the shipped model)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--batches", default="1,64,512")
    parser.add_argument("--tutorial-calls", type=int, default=40, help="model.predict calls timed")
    parser.add_argument("--record", action="store_true", help="write docs/results/engine.md")
    args = parser.parse_args()
    out = Report("engine")
    batches = [int(b) for b in args.batches.split(",")]

    import keras
    import tensorflow as tf

    from streamcast import Forecaster
    from streamcast.model import DEFAULT_MODEL_DIR, count_lstm_macs

    forecaster = Forecaster.load(args.model or DEFAULT_MODEL_DIR)
    model = forecaster.model
    macs = count_lstm_macs(model)
    peak = matmul_gflops()

    # The tutorial's way: time enough single-window model.predict calls to extrapolate.
    warm = prices(1)[0]
    tutorial_rollout(model, warm, 2)
    per_call = median_seconds(lambda: tutorial_rollout(model, warm, 1), args.tutorial_calls)

    out(
        f"# streamcast engine benchmark: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs"
    )
    out(
        f"# TensorFlow {tf.__version__}, Keras {keras.__version__}, device {forecaster.device}, "
        f"chunk {forecaster.chunk_size} x {forecaster.workers} workers, model {forecaster.version}"
    )
    out(
        f"# {macs:,} multiply-adds per window pass; numpy float32 matmul (2048^2): {peak:.1f} GFLOP/s"
    )
    out(
        f"# tutorial model.predict on one window: {per_call * 1e3:.1f} ms per call (median of {args.tutorial_calls})"
    )
    out()
    out(
        "| B | tutorial rollout (s, extrapolated) | Forecaster.rollout (s) | ratio | GFLOP/s | % of matmul "
        "| model.predict 1 step (ms) | predict_next (ms) | ratio |"
    )
    out("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    results = {}
    for b in batches:
        batch = prices(b, seed=b)
        forecaster.rollout(batch, STEPS)  # compile this bucket before timing
        forecaster.predict_next(batch)
        ours = median_seconds(lambda batch=batch: forecaster.rollout(batch, STEPS), args.reps)
        tutorial = per_call * b * STEPS
        gflops = 2 * macs * b * STEPS / ours / 1e9
        x = (batch / batch[:, :1] - 1.0)[:, :, None]
        model.predict(x, verbose=0)
        keras_step = median_seconds(lambda x=x: model.predict(x, verbose=0), args.reps)
        our_step = median_seconds(lambda batch=batch: forecaster.predict_next(batch), args.reps)
        results[b] = (tutorial / ours, gflops / peak)
        out(
            f"| {b} | {tutorial:.1f} | {ours:.3f} | {tutorial / ours:,.0f}x | {gflops:.1f} | "
            f"{gflops / peak:.0%} | {keras_step * 1e3:.1f} | {our_step * 1e3:.1f} | "
            f"{keras_step / our_step:.1f}x |"
        )
    if 512 in results:
        ratio, share = results[512]
        out()
        out(
            f"target rollout >= 500x the tutorial's way at B=512: {ratio:,.0f}x {'met' if ratio >= 500 else 'NOT met'}"
        )
        out(
            f"target >= 50% of the matmul rate at B=512: {share:.0%} {'met' if share >= 0.5 else 'NOT met'}"
        )
    forecaster.close()
    out.save(args.record)


if __name__ == "__main__":
    main()
