"""What publishing one batch costs the replica and Redis, by batch size (issue 14's per-batch cost).

    python bench/publish.py [--sizes 1,2,8,100] [--batches 400] [--rounds 3] [--before REF]
                            [--record]

A replica's CPU follows its batches (docs/BENCHMARKS.md, "Partitions"): a light one publishes
a batch of a tick or two a few milliseconds apart, a busy one a hundred at once. This times the
publish alone, the sink's ``write`` of a computed batch (its forecasts with bands, history
entries, symbol sets, acknowledged marks and XACK, fenced by the partitions' leases), against a
private redis-server on a free port:

1. For each size in --sizes, a batch holds that many ticks of as many symbols (500 symbols over
   8 partitions): up to 8 ticks, all of one partition (a replica owning one, as case B of
   bench/partitions.py); more, spread over all 8 (a replica owning all); from ~490 on (8 times
   the smallest partition's 61 symbols), a symbol has several ticks in the batch (a backlog; `STREAMCAST_BATCH_MAX_SIZE` allows 65,536: Redis runs
   nothing else while the script runs, so `--sizes 65536 --batches 3` says for how long). Each
   partition's lease holds the sink's token.
2. A worker process (the code of the checkout under test: this one, or with --before REF a
   `git worktree` of REF, the same venv) writes 50 batches to warm up (2 past 500 ticks), then
   --batches batches one after another, each with new tick ids, and reports the median and the
   longest wall time of a write (the longest: its median over the rounds), its own
   CPU (utime + stime) per write, and Redis's (INFO cpu, used_cpu_user + used_cpu_sys) per write.
3. --rounds rounds, each running every code once per size (before, then current), so drifts of a
   noisy machine fall on both alike; each figure is the median over the rounds.

Not measured: the XACKs find no pending entries here (no consumer group reads the streams), and
the daemon's event loop runs nothing else meanwhile.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if __name__ == "__main__" and "--worker" in sys.argv:
    # the worker imports streamcast from the checkout under test
    sys.path.insert(0, sys.argv[sys.argv.index("--checkout") + 1])
else:
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "bench"))

PARTITIONS = 8
SYMBOLS = 500
WARMUP = 50
ONE_PARTITION_UP_TO = 8  # ticks: a batch this small is of one partition, a bigger one of all
TOKEN = "bench-publish-token"
BANDS = {"80": {"next": [99.0, 101.0]}, "95": {"next": [98.0, 102.0]}}  # as the daemon's


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def work(url: str, prefix: str, size: int, batches: int) -> dict[str, float]:
    """Write ``batches`` batches of ``size`` ticks with this checkout's ForecastSink."""
    from prometheus_client import CollectorRegistry

    from streamcast.connect import make_redis
    from streamcast.daemon.batch import Batch, Stats
    from streamcast.daemon.config import DaemonConfig
    from streamcast.daemon.sink import ForecastSink
    from streamcast.keys import Keys
    from streamcast.metrics import Metrics
    from streamcast.wire import Forecast, Tick

    keys = Keys(prefix, partitions=PARTITIONS)
    redis = make_redis(url, cluster=False)
    publisher = make_redis(url, retries=0, cluster=False)
    for p in range(PARTITIONS):
        await redis.set(keys.lease(p), TOKEN)
    sink = ForecastSink(
        publisher, redis, keys, TOKEN, DaemonConfig(), Metrics(CollectorRegistry()), Stats()
    )
    by_part: dict[int, list[str]] = {}
    for name in (f"P{k:04d}" for k in range(SYMBOLS)):
        by_part.setdefault(keys.partition(name), []).append(name)
    # a light replica's batch is of the one partition it owns, a busy one's spans all 8
    spread = PARTITIONS if size > ONE_PARTITION_UP_TO else 1
    # past 500 a symbol has several ticks in the batch (a backlog, up to batch_max_size 65,536)
    chosen = [by_part[k % spread][(k // spread) % len(by_part[k % spread])] for k in range(size)]
    base_ms = int(time.time() * 1000)

    def batch(k: int) -> Batch:
        made = Batch(partition_of=keys.partition)
        for j, name in enumerate(chosen):
            tick = Tick(f"{base_ms + k}-{j}", name, 100.0 + k % 7, None)
            made.accepted.append(tick)
            made.ready.append(tick)
            made.forecasts.append(Forecast.of(tick, "bench", 100.5, bands=BANDS))
            made.part(keys.partition(name)).ack_ids.append(tick.id)
        return made

    async def redis_cpu() -> float:
        info = await redis.info("cpu")
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])

    warmup = warmup_writes(size)
    for k in range(warmup):
        await sink.write(batch(k))
    ready = [batch(warmup + k) for k in range(batches)]  # built before the clock starts
    walls = []
    server, cpu = await redis_cpu(), cpu_seconds()
    for made in ready:
        began = time.perf_counter()
        await sink.write(made)
        walls.append(time.perf_counter() - began)
    cpu, server = cpu_seconds() - cpu, await redis_cpu() - server
    await redis.aclose()
    await publisher.aclose()
    return {
        "wall_ms": statistics.median(walls) * 1000,
        "wall_max_ms": max(walls) * 1000,
        "cpu_ms": cpu / batches * 1000,
        "redis_ms": server / batches * 1000,
    }


def warmup_writes(size: int) -> int:
    """Writes before the timed ones: fewer for a big batch (the script is loaded by the first)."""
    return WARMUP if size <= SYMBOLS else 2


def run_worker(checkout: Path, url: str, prefix: str, size: int, batches: int) -> dict:
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "publish.py"),
            "--worker",
            "--checkout",
            str(checkout),
            "--url",
            url,
            "--prefix",
            prefix,
            "--sizes",
            str(size),
            "--batches",
            str(batches),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    if done.returncode != 0:
        sys.exit(f"the worker failed ({checkout}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="1,2,8,100", help="ticks per batch")
    parser.add_argument("--batches", type=int, default=400, help="timed writes per size and run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--before", help="also run the sink of this commit, side by side")
    parser.add_argument("--record", action="store_true", help="write docs/results/NAME.md")
    parser.add_argument("--result", default="publish", help="NAME of the recorded result")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--checkout", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--prefix", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.worker:
        import asyncio

        print(json.dumps(asyncio.run(work(args.url, args.prefix, sizes[0], args.batches))))
        return

    import daemon as bench  # bench/daemon.py: redis-server, worktrees
    from results import Report

    codes: list[tuple[str, Path]] = [("current", ROOT)]
    with tempfile.TemporaryDirectory(prefix="streamcast-publish-") as tmp:
        if args.before:
            codes.insert(0, ("before", bench.worktree(args.before, Path(tmp))))
        server, url = bench.start_redis(tmp)
        seen: dict[tuple[str, int], list[dict]] = {}
        try:
            run = 0
            for _ in range(args.rounds):
                for size in sizes:
                    for name, checkout in codes:
                        run += 1
                        got = run_worker(checkout, url, f"pub{run}", size, args.batches)
                        seen.setdefault((name, size), []).append(got)
        finally:
            server.terminate()
            server.wait(timeout=10)
            if args.before:
                bench.remove_worktree(codes[0][1])

    out = Report(args.result)
    out(f"# bench/publish.py on {platform.node()}, {os.cpu_count()} CPUs")
    out(
        f"# one sink write of a computed batch (forecasts with bands, history, symbol sets, "
        f"acked marks, XACK; fenced) to a private redis-server; {args.batches} writes per size "
        f"and run after {WARMUP} to warm up (2 past {SYMBOLS} ticks), {args.rounds} rounds; "
        "medians over the rounds"
        + (f"; 'before': the sink of {args.before}" if args.before else "")
    )
    out()
    out(
        "| code | ticks per batch | wall per write (ms) | longest write (ms, median of rounds) | "
        "replica CPU per write (ms) | Redis CPU per write (ms) | replica CPU per tick (ms) |"
    )
    out("|---|---:|---:|---:|---:|---:|---:|")
    median: dict[tuple[str, int], dict[str, float]] = {}
    for size in sizes:
        for name, _ in codes:
            runs = seen[(name, size)]
            m = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            median[(name, size)] = m
            out(
                f"| {name} | {size} | {m['wall_ms']:.3f} | {m['wall_max_ms']:.3f} | "
                f"{m['cpu_ms']:.3f} | "
                f"{m['redis_ms']:.3f} | {m['cpu_ms'] / size:.3f} |"
            )
    if args.before:
        out()
        for size in sizes:
            b, c = median[("before", size)], median[("current", size)]
            out(
                f"{size} tick(s): before / current: wall {b['wall_ms'] / c['wall_ms']:.2f}x, "
                f"replica CPU {b['cpu_ms'] / c['cpu_ms']:.2f}x, "
                f"Redis CPU {b['redis_ms'] / c['redis_ms']:.2f}x"
            )
    out.save(args.record)


if __name__ == "__main__":
    main()
