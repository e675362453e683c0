"""What one small engine call costs at a light replica's pace: by the time since the call before.

    python bench/engine_pace.py [--rows 1,2] [--gaps-ms 0,0.5,1,2,4,8] [--seconds 2] [--rounds 3]
                                [--record]

A replica serving a quiet stream makes one small call (a batch of a tick or two) every few
milliseconds; a busy one makes them back to back, or big. For each batch size in --rows and each
gap in --gaps-ms, it calls ``Forecaster.predict_next`` on the shipped model for --seconds, sleeping
the gap between calls, and reports the median wall time of a call and the process's CPU per call
(utime + stime, all threads, over the same span). Gaps are taken in rounds (every gap once per
round, --rounds rounds), so drifts of a noisy machine fall on every gap alike; each figure is the
median over the rounds. The ratio is a call's cost at the longest gap to its cost back to back.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
from results import Report


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def paced(call, gap_s: float, seconds: float) -> tuple[float, float]:
    """(median wall seconds of a call, CPU seconds per call) over ``seconds`` of calls, each
    ``gap_s`` after the one before ended."""
    walls = []
    started, cpu = time.monotonic(), cpu_seconds()
    while time.monotonic() - started < seconds:
        began = time.perf_counter()
        call()
        walls.append(time.perf_counter() - began)
        if gap_s:
            time.sleep(gap_s)
    return statistics.median(walls), (cpu_seconds() - cpu) / len(walls)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", default="1,2")
    parser.add_argument("--gaps-ms", default="0,0.5,1,2,4,8")
    parser.add_argument("--seconds", type=float, default=2.0, help="of calls per gap and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--record", action="store_true", help="write docs/results/engine-pace.md")
    args = parser.parse_args()
    rows = [int(r) for r in args.rows.split(",")]
    gaps = [float(g) / 1000 for g in args.gaps_ms.split(",")]

    import tensorflow as tf

    from streamcast import Forecaster
    from streamcast.model import DEFAULT_MODEL_DIR

    forecaster = Forecaster.load(DEFAULT_MODEL_DIR)
    windows = {
        n: 100 + np.cumsum(np.random.default_rng(n).normal(0, 1, (n, forecaster.seq_len)), axis=1)
        for n in rows
    }
    for batch in windows.values():
        for _ in range(50):  # compiled and warm
            forecaster.predict_next(batch)
    seen: dict[tuple[int, float], list[tuple[float, float]]] = {}
    for _ in range(args.rounds):
        for n, batch in windows.items():
            for gap in gaps:
                call = lambda batch=batch: forecaster.predict_next(batch)  # noqa: E731
                seen.setdefault((n, gap), []).append(paced(call, gap, args.seconds))
    forecaster.close()

    out = Report("engine-pace")
    out(f"# bench/engine_pace.py on {platform.node()}, {os.cpu_count()} CPUs")
    out(
        f"# TensorFlow {tf.__version__}, device {forecaster.device}, model {forecaster.version}; "
        f"predict_next on 1-row and 2-row batches, {args.seconds:.0f} s of calls per gap and "
        f"round, {args.rounds} rounds (every gap once a round); medians over the rounds"
    )
    out()
    out(
        "| rows | gap since the call before (ms) | calls a second | wall per call (ms) | CPU per call (ms) |"
    )
    out("|---:|---:|---:|---:|---:|")
    cost: dict[tuple[int, float], float] = {}
    for (n, gap), runs in seen.items():
        wall = statistics.median(r[0] for r in runs)
        cpu = statistics.median(r[1] for r in runs)
        cost[(n, gap)] = cpu
        out(
            f"| {n} | {gap * 1000:g} | {1 / (wall + gap):,.0f} | {wall * 1000:.2f} | "
            f"{cpu * 1000:.2f} |"
        )
    out()
    first, last = gaps[0], gaps[-1]
    for n in rows:
        out(
            f"{n} row(s): CPU per call at a {last * 1000:g} ms gap / at {first * 1000:g} ms = "
            f"{cost[(n, last)] * 1000:.2f} / {cost[(n, first)] * 1000:.2f} ms = "
            f"{cost[(n, last)] / cost[(n, first)]:.1f}x"
        )
    out.save(args.record)


if __name__ == "__main__":
    main()
