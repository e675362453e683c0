"""Daemon throughput and latency against a real redis-server, next to the tutorial's way.

    python bench/daemon.py [--symbols 500] [--rate 2000] [--seconds 60] [--tutorial-seconds 20]
                           [--capacity-ticks 30000] [--record]

1. Starts a private redis-server on a free port and seeds every symbol's history with 50 prices,
   so windows are full from the first tick (as after a restart).
2. Starts `streamcast serve` as a separate process and offers --rate ticks/s round-robin over
   --symbols symbols for --seconds, then waits for the backlog to drain.
3. Reads every forecast back: sustained throughput, tick-to-forecast latency (publish time minus
   the tick's stream id time, both in ms), and the age of each symbol's newest 50-step path
   (published to its own paths stream; older code: forecast entries that carry one) sampled
   every 100 ms.
4. Capacity: once the load has drained, writes --capacity-ticks ticks at once and times how fast
   the daemon works off that backlog (saturated, unlike the paced load).
5. Runs a consumer written the tutorial's way (one `model.predict` per tick) for
   --tutorial-seconds under the same offered load, which saturates it, and prints the ratio of
   the two saturated rates.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import numpy as np  # noqa: E402
from results import Report  # noqa: E402  (bench/results.py)

from streamcast.client import Client  # noqa: E402
from streamcast.connect import make_redis  # noqa: E402
from streamcast.demo import free_port  # noqa: E402
from streamcast.keys import Keys  # noqa: E402


def start_redis(directory: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    binary = shutil.which("redis-server") or sys.exit("redis-server is not installed")
    proc = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            directory,
        ],
        stdout=subprocess.DEVNULL,
    )
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            break
        except OSError:
            time.sleep(0.02)
    return proc, f"redis://127.0.0.1:{port}/0"


def spawn_serve(env: dict[str, str], log_path: Path, checkout: Path = ROOT) -> subprocess.Popen:
    """`streamcast serve` as its own process, its output in ``log_path``; the code of
    ``checkout`` (another one, e.g. a `git worktree` of an older commit, goes on PYTHONPATH)."""
    if checkout != ROOT:
        env = {**env, "PYTHONPATH": str(checkout)}
    with open(log_path, "w") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "streamcast.cli", "serve"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=checkout,
        )


def worktree(ref: str, directory: Path) -> Path:
    """A detached `git worktree` of ``ref`` (removed by :func:`remove_worktree`)."""
    path = directory / f"before-{ref.replace('/', '-')}"
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), ref],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return path


def remove_worktree(path: Path) -> None:
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(path)], check=False
    )
    subprocess.run(["git", "-C", str(ROOT), "worktree", "prune"], check=False)


def prices(symbols: int, points: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    start = rng.uniform(20, 500, size=(symbols, 1))
    return start * np.exp(np.cumsum(rng.normal(0, 0.01, size=(symbols, points)), axis=1))


async def seed_history(redis, keys: Keys, names: list[str], warm: np.ndarray) -> None:
    pipe = redis.pipeline(transaction=False)
    for name, row in zip(names, warm, strict=True):
        for t, price in enumerate(row):
            pipe.xadd(keys.history(name), {"price": repr(float(price))}, id=f"{t + 1}-0")
        if len(pipe) >= 20_000:  # full histories (500 x 5,000): one pipeline would time out
            await pipe.execute()
    pipe.sadd(keys.symbols(0), *names)
    await pipe.execute()


async def offer_load(
    redis, keys: Keys, names: list[str], feed: np.ndarray, rate: float, seconds: float
) -> int:
    """Publish at ``rate`` ticks/s round-robin over symbols in 10 ms slices, each tick to its
    symbol's partition stream (the client's pipeline); returns ticks sent.

    A producer that falls behind does not catch up in one burst: a slice sends at most two
    slices' worth, so the load stays even and ends on time (the caller reports the rate achieved).
    """
    client = Client(redis, keys)
    symbols = len(names)
    started = time.monotonic()
    sent = 0
    most = max(1, int(rate * 0.02))
    while True:
        elapsed = time.monotonic() - started
        if elapsed >= seconds:
            return sent
        due = min(most, int(min(elapsed + 0.01, seconds) * rate) - sent)
        if due > 0:
            now_ms = int(time.time() * 1000)
            ticks = []
            for k in range(due):
                s = (sent + k) % symbols
                t = (sent + k) // symbols
                ticks.append((names[s], float(feed[s, t % feed.shape[1]]), now_ms))
            await client.publish_many(ticks)
            sent += due
        behind = started + sent / rate - time.monotonic()
        await asyncio.sleep(max(0.0, behind))


async def forecasts_count(redis, keys: Keys, names: list[str]) -> int:
    pipe = redis.pipeline(transaction=False)
    for name in names:
        pipe.xlen(keys.forecasts(name))
    return sum(await pipe.execute())


async def entries_of(redis, key: str):
    """Every entry of a stream, oldest first, read 5,000 at a time."""
    cursor = "-"
    while True:
        entries = await redis.xrange(key, min=cursor, count=5000)
        for entry in entries:
            yield entry
        if len(entries) < 5000:
            return
        ms, seq = entries[-1][0].decode().split("-")
        cursor = f"{ms}-{int(seq) + 1}"


async def collect(
    redis, keys: Keys, names: list[str]
) -> tuple[np.ndarray, dict[str, list[int]], list[int]]:
    """Latencies (ms), path publish times per symbol (ms), and publish times of all forecasts.

    A path's publish time is its paths stream entry's ``ts``; a symbol whose paths stream is
    empty (code before the path lane) has its paths in the forecast entries that carry one."""
    latencies, published = [], []
    paths: dict[str, list[int]] = {}
    for name in names:
        inline = []
        async for eid, fields in entries_of(redis, keys.forecasts(name)):
            ts = int(fields[b"ts"])
            latencies.append(ts - int(eid.split(b"-")[0]))
            published.append(ts)
            if b"path" in fields:
                inline.append(ts)
        own = [int(fields[b"ts"]) async for _, fields in entries_of(redis, keys.paths(name))]
        if own or inline:
            paths[name] = own or inline
    return np.array(latencies), paths, published


def path_ages(
    paths: dict[str, list[int]], names: list[str], start_ms: int, end_ms: int
) -> np.ndarray:
    """Age of each symbol's newest path, sampled every 100 ms (a symbol without one counts from the start)."""
    grid = np.arange(start_ms + 1000, end_ms, 100)
    ages = []
    for name in names:
        times = np.array(sorted(paths.get(name, [])))
        idx = np.searchsorted(times, grid, side="right") - 1
        last = np.where(idx >= 0, times[np.maximum(idx, 0)] if len(times) else start_ms, start_ms)
        ages.append(grid - last)
    return np.concatenate(ages) / 1000.0


async def tutorial_consumer(
    redis, keys: Keys, model, stop: asyncio.Event, windows: dict[str, list[float]]
) -> int:
    """The tutorial's way: one model.predict per tick, then XADD the forecast and XACK."""
    group = "tutorial"
    await redis.xgroup_create(keys.ticks(0), group, id="$", mkstream=True)
    done = 0
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        reply = await redis.xreadgroup(group, "t", {keys.ticks(0): ">"}, count=100, block=200)
        for _, entries in reply or []:
            for eid, fields in entries:
                symbol = fields[b"symbol"].decode()
                window = windows[symbol]
                window.append(float(fields[b"price"]))
                del window[0]
                x = (np.array(window) / window[0] - 1.0)[None, :, None]
                y = await loop.run_in_executor(
                    None, lambda x=x: float(model.predict(x, verbose=0)[0, 0])
                )
                await redis.xadd(
                    keys.forecasts(symbol), {"next": repr(window[0] * (y + 1.0))}, id=eid
                )
                await redis.xack(keys.ticks(0), group, eid)
                done += 1
                if stop.is_set():
                    return done
    return done


def scrape_metrics(port: int) -> str:
    """The daemon's /metrics text ("" when it does not answer)."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            return response.read().decode()
    except OSError:
        return ""


async def run_daemon(
    redis,
    url: str,
    tmp: str,
    prefix: str,
    names: list[str],
    feed: np.ndarray,
    args,
    extra_env,
    checkout: Path = ROOT,
) -> dict:
    """Start `streamcast serve` (``checkout``'s code), offer the load, drain, read back; the
    measurements, with the daemon's /metrics as they were once the load had drained."""
    keys = Keys(prefix)
    history = args.history_points if args.retrain else 50
    await seed_history(redis, keys, names, feed[:, :history])
    http_port = free_port()
    env = {
        **os.environ,
        "STREAMCAST_REDIS_URL": url,
        "STREAMCAST_KEY_PREFIX": prefix,
        "STREAMCAST_HTTP_PORT": str(http_port),
        "STREAMCAST_MODEL_CACHE_DIR": str(Path(tmp) / "cache"),
        "STREAMCAST_RETRAIN_INTERVAL_S": "0",
    }
    for item in [*args.env, *extra_env]:
        key, _, value = item.partition("=")
        env[key] = value
    log_path = Path(tmp) / f"daemon-{prefix}.log"
    daemon = spawn_serve(env, log_path, checkout)
    try:
        await wait_ready(http_port, daemon)
        start_ms = int(time.time() * 1000)
        sent = await offer_load(redis, keys, names, feed[:, history:], args.rate, args.seconds)
        end_ms = int(time.time() * 1000)
        deadline = time.monotonic() + args.drain_timeout
        while (
            done := await forecasts_count(redis, keys, names)
        ) < sent and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
        drained_ms = int(time.time() * 1000)
        metrics = await asyncio.to_thread(scrape_metrics, http_port)
        latencies, paths, published = await collect(redis, keys, names)
        capacity = await measure_capacity(redis, keys, names, feed, done, args.capacity_ticks)
        daemon.terminate()
        daemon.wait(30)
        lifecycle = [
            line.rstrip()
            for line in log_path.read_text().splitlines()
            if "retrain" in line or "model" in line
        ]
    finally:
        if daemon.poll() is None:
            daemon.kill()
    retrains = trainer_runs(lifecycle, end_ms)
    return {
        "sent": sent,
        "done": done,
        "latencies": latencies,
        "ages": path_ages(paths, names, start_ms, end_ms),
        "in_window": sum(1 for t in published if t <= end_ms),
        "published": np.array(published),
        "drain_s": (drained_ms - end_ms) / 1000,
        "retrains": retrains,
        "start_ms": start_ms,
        "end_ms": end_ms,
        "lifecycle": lifecycle,
        "capacity": capacity,
        "metrics": metrics,
    }


async def measure_capacity(
    redis, keys: Keys, names: list[str], feed: np.ndarray, done: int, ticks: int
) -> float:
    """Ticks/s at saturation: write ``ticks`` at once, time until all are forecast."""
    if ticks <= 0:
        return float("nan")
    client = Client(redis, keys)
    started = time.monotonic()
    width = feed.shape[1]
    for first in range(0, ticks, 5000):
        backlog = []
        for k in range(first, min(ticks, first + 5000)):
            s, t = k % len(names), width - 1 - (k // len(names)) % 200
            backlog.append((names[s], float(feed[s, t])))
        await client.publish_many(backlog)
    while await forecasts_count(redis, keys, names) < done + ticks:
        await asyncio.sleep(0.2)
    return ticks / (time.monotonic() - started)


def trainer_runs(lines: list[str], end_ms: int) -> list[tuple[int, int, str]]:
    """(start ms, end ms, outcome) of each retrain, from the daemon's log lines."""
    from datetime import datetime

    def at(line: str) -> int:
        return int(datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp() * 1000)

    runs, start = [], None
    for line in lines:
        if "streamcast.retrain: retraining " in line:
            start = at(line)
        elif "streamcast.retrain: retrain " in line and start is not None:
            runs.append((start, at(line), line.split("retrain ")[1].split()[0]))
            start = None
    if start is not None:
        runs.append((start, end_ms, "still running when the load ended"))
    return runs


def row(name: str, r: dict, seconds: float, latencies: np.ndarray | None = None) -> str:
    lat = r["latencies"] if latencies is None else latencies
    return (
        f"| {name} | {r['sent']} | {r['done']} ({r['done'] / r['sent']:.1%}) | "
        f"{r['in_window'] / seconds:,.0f} | {np.percentile(lat, 50):.0f} | "
        f"{np.percentile(lat, 99):.0f} | {lat.max():.0f} | {np.percentile(r['ages'], 99):.1f} | "
        f"{r['drain_s']:.1f} |"
    )


HEADER = (
    "| run | ticks offered | forecast | sustained (forecasts/s in the load window) | "
    "p50 latency (ms) | p99 latency (ms) | max latency (ms) | p99 path age (s) | "
    "drain after load (s) |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|"
)


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--symbols", type=int, default=500)
    parser.add_argument("--rate", type=float, default=2000.0)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--tutorial-seconds", type=float, default=20.0)
    parser.add_argument("--drain-timeout", type=float, default=120.0)
    parser.add_argument(
        "--capacity-ticks", type=int, default=30_000, help="backlog for the capacity (0: none)"
    )
    parser.add_argument("--record", action="store_true", help="write docs/results/NAME.md")
    parser.add_argument("--result", help="NAME of the recorded result (default: daemon, retrain)")
    parser.add_argument(
        "--retrain",
        action="store_true",
        help="instead of the tutorial comparison: the same load with and without a retrain",
    )
    parser.add_argument(
        "--history-points", type=int, default=400, help="history per symbol for --retrain"
    )
    parser.add_argument(
        "--retrain-symbols", type=int, default=20, help="symbols the --retrain run trains on"
    )
    parser.add_argument(
        "--max-ratio",
        type=float,
        default=2.0,
        help="--retrain's target: p99 with a retrain at most this times the idle p99 "
        "(issue 16 set 1.5 for 2,000 ticks/s over 500 symbols with full histories)",
    )
    parser.add_argument(
        "--retrain-env",
        action="append",
        default=[],
        help="extra STREAMCAST_X=Y for the retraining run",
    )
    parser.add_argument(
        "--env", action="append", default=[], help="extra STREAMCAST_X=Y for the daemon"
    )
    args = parser.parse_args()
    if args.retrain:
        args.capacity_ticks = 0  # the retrain comparison measures latency only

    names = [f"B{k:04d}" for k in range(args.symbols)]
    feed = prices(args.symbols, 2000 + args.history_points)
    with tempfile.TemporaryDirectory() as tmp:
        redis_proc, url = start_redis(tmp)
        redis = make_redis(url)
        try:
            if args.retrain:
                await retrain_comparison(redis, url, tmp, names, feed, args)
                return
            ours = await run_daemon(redis, url, tmp, "bench", names, feed, args, [])

            # the tutorial's way on the same offered load
            from streamcast.model import DEFAULT_MODEL_DIR, load_model

            model, _ = load_model(DEFAULT_MODEL_DIR)
            model.predict(np.zeros((1, 50, 1)), verbose=0)
            tkeys = Keys("tutorial")
            windows = {n: list(feed[i, :50]) for i, n in enumerate(names)}
            stop = asyncio.Event()
            consumer = asyncio.create_task(tutorial_consumer(redis, tkeys, model, stop, windows))
            await asyncio.sleep(0.5)
            t0 = time.monotonic()
            tutorial_sent = await offer_load(
                redis, tkeys, names, feed[:, 50:], args.rate, args.tutorial_seconds
            )
            stop.set()
            tutorial_done = await consumer
            tutorial_rate = tutorial_done / (time.monotonic() - t0)
        finally:
            await redis.aclose()
            redis_proc.terminate()
            redis_proc.wait(10)

    latencies, ages = ours["latencies"], ours["ages"]
    out = Report(args.result or "daemon" if not args.env else "daemon-" + "-".join(
        e.split("=")[0].removeprefix("STREAMCAST_").lower().replace("_", "-") for e in args.env
    ))  # fmt: skip
    out(header(args))
    out(HEADER)
    out(row("streamcast serve, paced load", ours, args.seconds))
    out(
        f"| tutorial (model.predict per tick), saturated | {tutorial_sent} | {tutorial_done} | "
        f"{tutorial_rate:,.1f} | - | - | - | - | - |"
    )
    out()
    out(by_slice(ours, args.seconds, "streamcast serve"))
    out(by_slice(ours, min(args.seconds, 5.0), "its first 5 s", 1.0))
    capacity = ours["capacity"]
    out(
        f"capacity, streamcast serve draining a backlog of {args.capacity_ticks:,} ticks: "
        f"{capacity:,.0f} ticks/s"
    )
    out(f"capacity ratio (both saturated) streamcast / tutorial: {capacity / tutorial_rate:,.0f}x")
    ok = (
        ours["done"] == ours["sent"]
        and np.percentile(latencies, 99) <= 100
        and np.percentile(ages, 99) <= 10
    )
    out(
        f"target at {args.rate:,.0f} ticks/s over {args.symbols} symbols (issue 16's, set for "
        "2,000 ticks/s over 500: every tick forecast, p99 latency <= 100 ms, p99 path age "
        f"<= 10 s): {'met' if ok else 'NOT met'}"
    )
    out.save(args.record)


def by_slice(run: dict, seconds: float, name: str, width_s: float = 5.0) -> str:
    """The p99 latency of the forecasts published in each ``width_s`` slice of the load."""
    offset = (run["published"] - run["start_ms"]) // int(width_s * 1000)
    slices = [
        f"{np.percentile(run['latencies'][offset == k], 99):.0f}"
        for k in range(int(seconds // width_s))
        if (offset == k).any()
    ]
    return f"p99 latency (ms) by {width_s:g} s slice, {name}: {' '.join(slices)}"


def header(args) -> str:
    import keras

    settings = " ".join(args.env) or "default settings"
    return (
        f"# streamcast daemon benchmark: {platform.node()}, {os.cpu_count()} CPUs, "
        f"Keras {keras.__version__}\n# offered {args.rate:.0f} ticks/s over {args.symbols} "
        f"symbols for {args.seconds:.0f} s, paced in 10 ms slices; {settings}; redis, load and "
        "daemon share the machine\n"
    )


async def retrain_comparison(redis, url, tmp, names, feed, args) -> None:
    """The same load twice: idle, then with the daemon retraining (and swapping) under it."""
    idle = await run_daemon(redis, url, tmp, "idle", names, feed, args, [])
    busy = await run_daemon(
        redis,
        url,
        tmp,
        "retrain",
        names,
        feed,
        args,
        [
            "STREAMCAST_RETRAIN_INTERVAL_S=3",
            "STREAMCAST_RETRAIN_EPOCHS=1",
            "STREAMCAST_RETRAIN_MARGIN=0",
            f"STREAMCAST_RETRAIN_MAX_POINTS={args.history_points}",
            f"STREAMCAST_RETRAIN_SYMBOLS={','.join(names[: args.retrain_symbols])}",
            *args.retrain_env,
        ],
    )
    # forecasts published while a retrain ran (from its start to its outcome)
    published = busy["published"]
    during = np.zeros(len(published), dtype=bool)
    for start, end, _ in busy["retrains"]:
        during |= (published >= start) & (published <= end)
    lat = busy["latencies"][during] if during.any() else busy["latencies"]
    active = sum(
        max(0, min(end, busy["end_ms"]) - max(start, busy["start_ms"]))
        for start, end, _ in busy["retrains"]
    ) / max(1, busy["end_ms"] - busy["start_ms"])
    out = Report(args.result or "retrain")
    out(header(args))
    out(HEADER)
    out(row("idle (no retrain)", idle, args.seconds))
    out(row("retraining: whole run", busy, args.seconds))
    out(row("retraining: while the trainer ran", busy, args.seconds, lat))
    out()
    for start, end, outcome in busy["retrains"]:
        out(
            f"retrain {outcome}: from {(start - busy['start_ms']) / 1000:.1f} s to "
            f"{(end - busy['start_ms']) / 1000:.1f} s of the {args.seconds:.0f} s load window"
        )
    out(f"share of the load window with a retrain running: {active:.0%}")
    for name, run in (("idle", idle), ("retraining", busy)):
        out(by_slice(run, args.seconds, name))
    out("\nthe retraining daemon's log, model lifecycle lines:")
    for line in busy["lifecycle"]:
        out("    " + line[:220])
    p99_idle = np.percentile(idle["latencies"], 99)
    p99_busy = max(np.percentile(lat, 99), np.percentile(busy["latencies"], 99))
    ratio = p99_busy / p99_idle
    out(f"p99 latency ratio retraining / idle: {ratio:.2f}x")
    out("p99 latency ratio = max(p99 while the trainer ran, p99 of the whole run) / idle p99")
    out(
        f"target (at most {args.max_ratio:g}x the idle p99): "
        f"{'met' if ratio <= args.max_ratio else 'NOT met'}"
    )
    out.save(args.record)


async def wait_ready(port: int, process: subprocess.Popen, timeout_s: float = 120) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit("the daemon exited during start-up")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        await asyncio.sleep(0.2)
    sys.exit("the daemon did not become ready")


if __name__ == "__main__":
    asyncio.run(main())
