"""Overload: offer many times the sustainable rate, then stop, and watch the daemon cope.

    python bench/overload.py [--symbols 500] [--rate 20000] [--seconds 60]

Starts a private redis-server and `streamcast serve`, then offers --rate ticks/s (by default 10x
what the daemon sustains on the 2-core machine, docs/BENCHMARKS.md) for --seconds. Every second
it samples the daemon's resident memory (VmRSS from /proc) and its exported stream lag. After the
load it waits for the backlog to drain and checks that every tick was forecast (1-step forecasts
are never skipped, only the 50-step paths are rationed). Prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import daemon as bench  # noqa: E402  (bench/daemon.py: redis, load, collection helpers)
import numpy as np  # noqa: E402
from results import Report  # noqa: E402  (bench/results.py)

from streamcast.connect import make_redis  # noqa: E402
from streamcast.demo import free_port  # noqa: E402
from streamcast.keys import Keys  # noqa: E402


def produce(
    url: str, names: list[str], feed: np.ndarray, rate: float, seconds: float, start_at: float
) -> int:
    """One producer process: from ``start_at`` (epoch seconds, the same for every producer, so
    their start-up is not load time) offer ``rate`` ticks/s over its symbols; ticks sent."""

    async def run() -> int:
        redis = make_redis(url)
        await redis.ping()
        await asyncio.sleep(max(0.0, start_at - time.time()))
        try:
            return await bench.offer_load(redis, Keys("overload"), names, feed, rate, seconds)
        finally:
            await redis.aclose()

    return asyncio.run(run())


async def offer_in_processes(
    url: str,
    names: list[str],
    feed: np.ndarray,
    rate: float,
    seconds: float,
    processes: int,
    start_at: float,
) -> int:
    """Split symbols and rate over ``processes`` producers (one Python process tops out near
    12,000 ticks/s on this machine); returns ticks sent in all."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    context = multiprocessing.get_context("spawn")
    loop = asyncio.get_running_loop()
    with ProcessPoolExecutor(processes, mp_context=context) as pool:
        parts = [
            loop.run_in_executor(
                pool, produce, url, names[k::processes], feed[k::processes], rate / processes,
                seconds, start_at,
            )
            for k in range(processes)
        ]  # fmt: skip
        return sum(await asyncio.gather(*parts))


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def lag(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
        for line in response.read().decode().splitlines():
            if line.startswith("streamcast_stream_lag "):
                return float(line.split()[1])
    return float("nan")


async def sample(pid: int, port: int, stop: asyncio.Event, out: list) -> None:
    started = time.monotonic()
    while not stop.is_set():
        with contextlib.suppress(OSError):
            out.append((time.monotonic() - started, rss_mb(pid), lag(port)))
        await asyncio.sleep(1.0)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--symbols", type=int, default=500)
    parser.add_argument("--rate", type=float, default=20_000.0)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--drain-timeout", type=float, default=1800.0)
    parser.add_argument("--producers", type=int, default=2, help="load generator processes")
    parser.add_argument("--record", action="store_true", help="write docs/results/overload.md")
    args = parser.parse_args()

    names = [f"O{k:04d}" for k in range(args.symbols)]
    feed = bench.prices(args.symbols, 4000)
    with tempfile.TemporaryDirectory() as tmp:
        redis_proc, url = bench.start_redis(tmp)
        redis = make_redis(url)
        keys = Keys("overload")
        await bench.seed_history(redis, keys, names, feed[:, :50])
        http_port = free_port()
        env = {
            **os.environ,
            "STREAMCAST_REDIS_URL": url,
            "STREAMCAST_KEY_PREFIX": "overload",
            "STREAMCAST_HTTP_PORT": str(http_port),
            "STREAMCAST_MODEL_CACHE_DIR": str(Path(tmp) / "cache"),
            "STREAMCAST_RETRAIN_INTERVAL_S": "0",
        }
        daemon = bench.spawn_serve(env, Path(tmp) / "daemon.log")
        try:
            await bench.wait_ready(http_port, daemon)
            idle_rss = rss_mb(daemon.pid)
            samples: list = []
            stop = asyncio.Event()
            sampler = asyncio.create_task(sample(daemon.pid, http_port, stop, samples))
            # the producers start together once spawned: their start-up is not load time
            start_at = time.time() + 5.0
            sent = await offer_in_processes(
                url, names, feed[:, 50:], args.rate, args.seconds, args.producers, start_at
            )
            load_s = time.time() - start_at
            end = time.monotonic()
            done = 0
            while time.monotonic() - end < args.drain_timeout:
                done = await bench.forecasts_count(redis, keys, names)
                if done >= sent:
                    break
                await asyncio.sleep(1.0)
            drain_s = time.monotonic() - end
            stop.set()
            await sampler
            alive = daemon.poll() is None
            redis_mem = (await redis.info("memory"))["used_memory"] / 2**20
        finally:
            daemon.terminate()
            daemon.wait(60)
            await redis.aclose()
            redis_proc.terminate()
            redis_proc.wait(10)

    t, rss, lags = (np.array(col) for col in zip(*samples, strict=True))
    t = t - 5.0  # the sampler started with the 5 s wait for the producers
    out = Report("overload")
    during = t <= load_s
    out(f"# streamcast overload: {platform.node()}, {os.cpu_count()} CPUs")
    out(
        f"# offered {args.rate:,.0f} ticks/s over {args.symbols} symbols for {args.seconds:.0f} s "
        f"(achieved {sent / load_s:,.0f}/s by {args.producers} producer processes); redis, the "
        "load and the daemon share the machine\n"
    )
    out("| ticks offered | forecast | daemon alive | RSS idle | RSS peak | peak lag | "
          "lag at load end | drain after load | redis memory at end |")  # fmt: skip
    out("|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    out(
        f"| {sent:,} | {done:,} ({done / sent:.1%}) | {'yes' if alive else 'NO'} | "
        f"{idle_rss:,.0f} MB | {np.nanmax(rss):,.0f} MB | {np.nanmax(lags):,.0f} | "
        f"{lags[during][-1] if during.any() else float('nan'):,.0f} | {drain_s:,.1f} s | "
        f"{redis_mem:,.0f} MB |"
    )
    out()
    out("RSS (MB) and lag every 10 s: " + "  ".join(
        f"{tt:.0f}s:{r:.0f}/{g:,.0f}" for tt, r, g in zip(t[::10], rss[::10], lags[::10], strict=True)
    ))  # fmt: skip
    out(f"every tick forecast after the drain: {'yes' if done == sent else 'NO'}")
    out.save(args.record)


if __name__ == "__main__":
    asyncio.run(main())
