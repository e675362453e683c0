"""Conflation under overload (issue 16): what a live consumer sees with and without it, side by side.

    python bench/conflation.py [--symbols 500] [--rate 7000] [--seconds 30] [--record]

One private redis-server; `streamcast serve` twice on fresh key prefixes, default settings and
then ``STREAMCAST_CONFLATE=true``, each offered the same paced load (10 ms slices, bench/daemon.py's
producer) above the daemon's capacity (5,005 ticks/s over 500 symbols on the 2-core machine,
BENCHMARKS "Daemon"). Without conflation every tick is forecast, so a backlog builds and each forecast is
older than the one before; with it, only each symbol's newest queued tick is forecast, the rest
acknowledged and counted. Reported per run: ticks offered, forecast, conflated (the daemon's
``streamcast_ticks_total{outcome="conflated"}``), the p50/p99 tick-to-forecast latency of the
forecasts published in the load's last 10 s (what a live consumer sees once the overload has
lasted), and over the whole run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
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

LAST_S = 10.0  # the load's last seconds: what a consumer sees once the overload has lasted


def conflated(metrics_text: str) -> int:
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == "streamcast_ticks_total" and sample.labels.get("outcome") == (
                "conflated"
            ):
                return int(sample.value)
    return 0


def percentiles(values: np.ndarray) -> str:
    if not len(values):
        return "- / -"
    return f"{np.percentile(values, 50):,.0f} / {np.percentile(values, 99):,.0f}"


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--symbols", type=int, default=500)
    parser.add_argument("--rate", type=float, default=7000.0, help="ticks/s offered")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--drain-timeout", type=float, default=60.0)
    parser.add_argument("--record", action="store_true", help="write docs/results/conflation.md")
    args = parser.parse_args()
    names = [f"C{k:04d}" for k in range(args.symbols)]
    feed = bench.prices(args.symbols, 2050)
    settings = argparse.Namespace(
        rate=args.rate,
        seconds=args.seconds,
        drain_timeout=args.drain_timeout,
        env=[],
        retrain=False,
        capacity_ticks=0,
    )
    variants = {
        "default (every tick)": [],
        "STREAMCAST_CONFLATE=true": ["STREAMCAST_CONFLATE=true"],
    }
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        server, url = bench.start_redis(tmp)
        redis = make_redis(url, timeout_s=30.0)
        try:
            for k, (name, env) in enumerate(variants.items()):
                runs[name] = await bench.run_daemon(
                    redis, url, tmp, f"conflate{k}", names, feed, settings, env
                )
                print(f"  {name}: {runs[name]['done']}/{runs[name]['sent']} forecast", flush=True)
        finally:
            await redis.aclose()
            server.terminate()
            server.wait(10)
    out = Report("conflation")
    out(
        f"# bench/conflation.py: {args.symbols} symbols, {args.rate:,.0f} ticks/s offered for "
        f"{args.seconds:.0f} s (paced), {os.cpu_count()} CPUs; a fresh daemon each, one after "
        "the other; redis, producer and daemon share the machine"
    )
    out()
    out(
        f"| policy | ticks offered | forecast | conflated | p50 / p99 latency, last {LAST_S:.0f} s "
        "of the load (ms) | p50 / p99 latency, whole run (ms) | drained after the load (s) |"
    )
    out("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in runs.items():
        published, latencies = r["published"], r["latencies"]
        last = (published >= r["end_ms"] - LAST_S * 1000) & (published <= r["end_ms"])
        out(
            f"| {name} | {r['sent']:,} | {r['done']:,} | {conflated(r['metrics']):,} | "
            f"{percentiles(latencies[last])} | {percentiles(latencies)} | {r['drain_s']:.1f} |"
        )
    out()
    out(
        "forecast + conflated = offered when nothing was lost; 'drained': until every offered "
        "tick was forecast (default), or the drain timeout when some were conflated"
    )
    out.save(args.record)


if __name__ == "__main__":
    asyncio.run(main())
