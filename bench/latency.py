"""Tick-to-forecast latency under several paced loads side by side, with the latency by stage.

    python bench/latency.py [--loads 20x50,100x200,500x800,500x2000] [--seconds 30]
                            [--before REF] [--env STREAMCAST_X=Y] [--record]

One private redis-server; for each load (SYMBOLSxRATE) a fresh `streamcast serve` process on a
fresh key prefix, offered RATE ticks/s round-robin over SYMBOLS symbols for --seconds (paced in
10 ms slices, as bench/daemon.py does), then drained and read back: ticks forecast, p50/p99/max
tick-to-forecast latency (forecast publish time minus the tick's stream id time, ms), the p99 age
of each symbol's newest path (sampled every 100 ms), and the p50/p99 of each stage of
``streamcast_stage_seconds``, estimated from the daemon's /metrics histogram once the load has
drained (interpolated within buckets, as Prometheus' histogram_quantile does).

--before REF runs each load also with the daemon of commit REF (a `git worktree` of it in a temp
dir, same venv), before the current code's run of that load, so the two are compared in one run:
before, after, before, after... Older code may export fewer stages; what it exports is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import platform
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import daemon as bench  # noqa: E402  (bench/daemon.py: redis-server, serve, load, collection)
import numpy as np  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from results import Report  # noqa: E402  (bench/results.py)

from streamcast.connect import make_redis  # noqa: E402
from streamcast.live import bucket_quantile  # noqa: E402  (as Prometheus' histogram_quantile)

DEFAULT_LOADS = "20x50,100x200,500x800,500x2000"
STAGE_METRIC = "streamcast_stage_seconds"


def parse_loads(text: str) -> list[tuple[int, float]]:
    """``20x50,500x2000`` -> [(20, 50.0), (500, 2000.0)]: (symbols, ticks/s)."""
    loads = []
    for item in text.split(","):
        symbols, _, rate = item.strip().lower().partition("x")
        loads.append((int(symbols), float(rate)))
    return loads


def stage_buckets(metrics_text: str) -> dict[str, list[tuple[float, float]]]:
    """Each stage's cumulative buckets, [(upper bound, count)] in ascending order (+Inf last)."""
    stages: dict[str, list[tuple[float, float]]] = {}
    for family in text_string_to_metric_families(metrics_text):
        if family.name != STAGE_METRIC:
            continue
        for sample in family.samples:
            if sample.name == STAGE_METRIC + "_bucket":
                bound = float(sample.labels["le"])
                stages.setdefault(sample.labels["stage"], []).append((bound, sample.value))
    return {stage: sorted(buckets) for stage, buckets in stages.items()}


def stage_latencies(metrics_text: str) -> dict[str, tuple[float, float]]:
    """(p50, p99) in ms of each stage the daemon exports; NaN for a stage never observed."""

    def at(q: float, buckets: list[tuple[float, float]]) -> float:
        value = bucket_quantile(q, buckets)
        return math.nan if value is None else value * 1000

    return {stage: (at(0.5, b), at(0.99, b)) for stage, b in stage_buckets(metrics_text).items()}


async def run_load(redis, url, tmp, args, load, code, checkout) -> dict:
    """One load against a fresh daemon of ``checkout`` on a fresh key prefix."""
    symbols, rate = load
    names = [f"B{k:04d}" for k in range(symbols)]
    feed = bench.prices(symbols, 2050)
    settings = argparse.Namespace(
        rate=rate,
        seconds=args.seconds,
        drain_timeout=args.drain_timeout,
        env=args.env,
        retrain=False,
        capacity_ticks=0,
    )
    prefix = f"{code}-{symbols}x{rate:.0f}"
    r = await bench.run_daemon(redis, url, tmp, prefix, names, feed, settings, [], checkout)
    r.update(symbols=symbols, rate=rate, code=code, stages=stage_latencies(r["metrics"]))
    lat = r["latencies"]
    print(
        f"  {code} {symbols}x{rate:.0f}: {r['done']}/{r['sent']} forecast, "
        f"p99 {np.percentile(lat, 99) if len(lat) else math.nan:.0f} ms",
        flush=True,
    )
    return r


def ms(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.1f}" if value < 10 else f"{value:.0f}"


def row(r: dict, stages: list[str]) -> str:
    lat = r["latencies"] if len(r["latencies"]) else np.array([math.nan])
    everything = "all" if r["done"] == r["sent"] else f"{r['done'] / r['sent']:.1%}"
    cells = [
        r["code"],
        str(r["symbols"]),
        f"{r['rate']:,.0f}",
        f"{r['sent']:,}",
        everything,
        f"{np.percentile(lat, 50):.0f}",
        f"{np.percentile(lat, 99):.0f}",
        f"{np.max(lat):.0f}",
        f"{np.percentile(r['ages'], 99):.1f}",
    ]
    for stage in stages:
        p50, p99 = r["stages"].get(stage, (math.nan, math.nan))
        cells.append(f"{ms(p50)} / {ms(p99)}")
    return "| " + " | ".join(cells) + " |"


def p99(r: dict) -> float:
    return float(np.percentile(r["latencies"], 99)) if len(r["latencies"]) else math.nan


def targets(runs: list[dict], out: Report) -> None:
    """Issue 16's targets, judged on the current code's rows."""
    out("targets (issue 16, the current code):")
    judged = False
    for r in runs:
        if r["code"] != "current":
            continue
        load = f"{r['symbols']} symbols, {r['rate']:,.0f} ticks/s"
        if r["rate"] >= 2000:
            age = np.percentile(r["ages"], 99)
            ok = r["done"] == r["sent"] and p99(r) <= 100 and age <= 10
            out(
                f"  {load}: every tick forecast, p99 <= 100 ms, p99 path age <= 10 s "
                f"(p99 {p99(r):.0f} ms, path age {age:.1f} s, {r['done']}/{r['sent']} "
                f"forecast): {'met' if ok else 'NOT met'}"
            )
            judged = True
        elif r["rate"] <= 200:
            ok = p99(r) <= 25
            out(f"  {load}: p99 <= 25 ms (p99 {p99(r):.0f} ms): {'met' if ok else 'NOT met'}")
            judged = True
    if not any(r["code"] == "current" and r["rate"] >= 2000 for r in runs):
        out("  no load at 2,000 ticks/s in this run: its target (p99 <= 100 ms) is not judged")
    if not judged:
        out("  no load this run judges")


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--loads", default=DEFAULT_LOADS, help="SYMBOLSxRATE,... (ticks/s)")
    parser.add_argument("--seconds", type=float, default=30.0, help="each load's duration")
    parser.add_argument("--drain-timeout", type=float, default=120.0)
    parser.add_argument(
        "--before", metavar="REF", help="also run each load with the daemon of commit REF"
    )
    parser.add_argument(
        "--env", action="append", default=[], help="extra STREAMCAST_X=Y for the daemons"
    )
    parser.add_argument(
        "--record", action="store_true", help="write docs/results/latency.md (latency-before.md)"
    )
    parser.add_argument("--result", help="NAME of the recorded result (docs/results/NAME.md)")
    args = parser.parse_args()
    loads = parse_loads(args.loads)

    runs: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        old = bench.worktree(args.before, Path(tmp)) if args.before else None
        redis_proc, url = bench.start_redis(tmp)
        redis = make_redis(url)
        try:
            for load in loads:
                if old is not None:
                    runs.append(await run_load(redis, url, tmp, args, load, "before", old))
                runs.append(await run_load(redis, url, tmp, args, load, "current", bench.ROOT))
        finally:
            await redis.aclose()
            redis_proc.terminate()
            redis_proc.wait(10)
            if old is not None:
                bench.remove_worktree(old)

    stages: list[str] = []
    for r in runs:
        stages += [s for s in r["stages"] if s not in stages]
    out = Report(args.result or ("latency-before" if args.before else "latency"))
    out(header(args, loads))
    out(
        "| code | symbols | ticks/s | ticks offered | forecast | p50 (ms) | p99 (ms) | max (ms) | "
        "p99 path age (s) | "
        + " | ".join(f"{s} p50 / p99 (ms)" for s in stages)
        + " |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|"
        + "---:|" * len(stages)
    )
    for r in runs:
        out(row(r, stages))
    out()
    out(
        "stages: from the daemon's streamcast_stage_seconds histogram once the load drained, "
        "interpolated within its buckets (so estimates, as fine as the buckets)"
    )
    if args.before:
        out(f"\np99 tick-to-forecast, before ({args.before}) / current:")
        for before, after in zip(runs[::2], runs[1::2], strict=True):
            out(
                f"  {after['symbols']} symbols, {after['rate']:,.0f} ticks/s: "
                f"{p99(before):.0f} / {p99(after):.0f} ms = "
                f"{p99(before) / max(p99(after), 1e-9):.2f}x"
            )
    out()
    targets(runs, out)
    out.save(args.record)


def header(args, loads: list[tuple[int, float]]) -> str:
    import keras

    settings = " ".join(args.env) or "default settings"
    offered = ", ".join(f"{s} symbols at {r:,.0f} ticks/s" for s, r in loads)
    before = (
        f"; 'before' rows: the daemon of {args.before}, each run just before the current code's"
        if args.before
        else ""
    )
    return (
        f"# streamcast latency benchmark: {platform.node()}, {os.cpu_count()} CPUs, "
        f"Keras {keras.__version__}\n# loads {offered}; each {args.seconds:.0f} s, paced in "
        f"10 ms slices, a fresh daemon and key prefix each; {settings}; redis, load and daemon "
        f"share the machine{before}\n"
    )


if __name__ == "__main__":
    asyncio.run(main())
