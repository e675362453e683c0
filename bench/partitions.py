"""Read cost follows the partitions a replica owns (issue 14).

    python bench/partitions.py [--symbols 500] [--partitions 8] [--rate 2000] [--seconds 30]
                               [--warmup 5] [--cases A,B,D,C] [--env STREAMCAST_X=Y]
                               [--before REF] [--record]

Before partitions, every replica read and decoded every tick of one stream and dropped the other
shards' symbols: a replica owning 1/50 of 500 symbols spent 28 % of a core on 2,000 ticks/s just
reading ticks that were not its own. Now ticks go to --partitions streams (crc32 of the symbol)
and a replica reads only the streams of the partitions it owns.

1. Starts a private redis-server on a free port.
2. For each case, under a fresh key prefix: seeds every symbol's history with 50 prices (windows
   are full from the first tick), starts `python -m streamcast.cli serve` with static assignment
   and waits for /readyz,
   A. owning all partitions (STREAMCAST_SHARD_INDEX=0, STREAMCAST_SHARD_COUNT=1),
   B. owning 1 of them (STREAMCAST_SHARD_INDEX=0, STREAMCAST_SHARD_COUNT=--partitions),
   C. (unless --no-foreign) as B, but the load has no tick of its partition: all --rate
      ticks/s go to the partitions it does not own (what the issue measured as waste),
   D. owning all partitions, offered only what B receives: B's number of symbols (spread over
      all partitions) at B's ticks/s. CPU(B)/CPU(D) is what owning a share costs of its own
      (1.0: nothing); CPU(D)/CPU(A) is how one replica's CPU follows its load,
   (--cases picks and orders them: A,B,D,C by default),
   samples the replica's CPU while idle, then a producer in its own process (so its CPU is not
   the replica's) offers --rate ticks/s round-robin over --symbols symbols, evenly in 10 ms
   slices (one pipeline of XADDs to `keys.ticks_for(symbol)` per slice) for --seconds.
3. The replica's CPU (utime + stime from /proc/<pid>/stat, all its threads) per wall second over
   the steady-state window (the load minus its first --warmup s); after the backlog drained, the
   entries it read (the sum of its `streamcast_ticks_total` outcomes: forecast, filling, dead,
   duplicate; cross-checked with XINFO GROUPS entries-read) against the entries added to the
   streams of the partitions it owns (XINFO STREAM entries-added, which trimming does not lower),
   what its group read on the partitions it does not own, the ticks it forecast, and its batches
   (streamcast_batch_size_count), 50-step paths, and the p99 tick-to-forecast latency over the
   window to its histogram's resolution (the bound of the bucket that holds it).

--before REF runs each case also with the replica of commit REF (a `git worktree` of it in a temp
dir, same venv), just before the current code's run of that case: before, current, before,
current..., so the two are compared side by side in one run on the same machine.
"""

from __future__ import annotations

import argparse
import asyncio
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

import daemon as bench  # noqa: E402  (bench/daemon.py: redis-server, serve, readiness, prices)
import numpy as np  # noqa: E402
from results import Report  # noqa: E402  (bench/results.py)

from streamcast.connect import make_redis  # noqa: E402
from streamcast.demo import free_port  # noqa: E402
from streamcast.keys import Keys  # noqa: E402
from streamcast.wire import Tick  # noqa: E402

HISTORY = 50  # prices seeded per symbol: a full window


def names_for(symbols: int) -> list[str]:
    return [f"P{k:04d}" for k in range(symbols)]


def owned(index: int, count: int, partitions: int) -> list[int]:
    """The partitions static assignment gives replica ``index`` of ``count``."""
    return [p for p in range(partitions) if p % count == index]


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    # after the command name, the fields start at field 3 (state): utime is 14, stime 15
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def metric_values(port: int, name: str) -> dict[str, float]:
    """Values of one metric from the replica's /metrics, by the text of its labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    values = {}
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            series, value = line.rsplit(" ", 1)
            values[series[len(name) :]] = float(value)
    return values


def latency_buckets(port: int) -> dict[float, float]:
    """streamcast_tick_to_forecast_seconds's cumulative bucket counts, by upper bound."""
    out = {}
    for labels, value in metric_values(port, "streamcast_tick_to_forecast_seconds_bucket").items():
        bound = labels.split('le="', 1)[1].split('"', 1)[0]
        out[float(bound)] = value
    return out


def p99_bound(before: dict[float, float], after: dict[float, float]) -> float:
    """The upper bound of the histogram bucket that holds the p99 of what was observed between
    two scrapes (the histogram's resolution: 10, 25, 50, 75, 100 ms, ...)."""
    counts = {b: after[b] - before.get(b, 0.0) for b in sorted(after)}
    total = counts.get(float("inf"), 0.0)
    if total <= 0:
        return float("nan")
    return next(b for b, c in counts.items() if c >= 0.99 * total)


def ticks_read(port: int) -> dict[str, int]:
    """streamcast_ticks_total by outcome (forecast, filling, dead, duplicate)."""
    out = {}
    for labels, value in metric_values(port, "streamcast_ticks_total").items():
        outcome = labels.split('outcome="', 1)[1].split('"', 1)[0]
        out[outcome] = int(value)
    return out


async def seed_history(redis, keys: Keys, names: list[str], warm: np.ndarray) -> None:
    pipe = redis.pipeline(transaction=False)
    for name, row in zip(names, warm, strict=True):
        for t, price in enumerate(row):
            pipe.xadd(keys.history(name), {"price": repr(float(price))}, id=f"{t + 1}-0")
        pipe.sadd(keys.symbols(keys.partition(name)), name)
    await pipe.execute()


def produce(
    url: str,
    prefix: str,
    partitions: int,
    symbols: int,
    rate: float,
    seconds: float,
    at: float,
    skip: tuple[int, ...] = (),
) -> tuple[int, float]:
    """The producer process: from ``at`` (epoch seconds) XADD ``rate`` ticks/s round-robin over
    the symbols to their partitions' streams, one pipeline per 10 ms slice, for ``seconds``.
    A slice that falls behind sends at most two slices' worth, so the load stays even and ends on
    time. Symbols of the partitions in ``skip`` get no ticks. Returns (ticks sent, seconds)."""
    keys = Keys(prefix, partitions)
    every = names_for(symbols)
    keep = [k for k, name in enumerate(every) if keys.partition(name) not in skip]
    names = [every[k] for k in keep]
    streams = [keys.ticks_for(name) for name in names]
    feed = bench.prices(symbols, 2000, seed=1)[keep, HISTORY:]
    symbols = len(names)
    width = feed.shape[1]

    async def run() -> tuple[int, float]:
        redis = make_redis(url)
        await redis.ping()
        await asyncio.sleep(max(0.0, at - time.time()))
        started = time.monotonic()
        sent = 0
        most = max(1, int(rate * 0.02))
        try:
            while (elapsed := time.monotonic() - started) < seconds:
                due = min(most, int(min(elapsed + 0.01, seconds) * rate) - sent)
                if due > 0:
                    pipe = redis.pipeline(transaction=False)
                    for k in range(sent, sent + due):
                        s = k % symbols
                        pipe.xadd(
                            streams[s],
                            Tick.encode(names[s], float(feed[s, (k // symbols) % width])),
                        )
                    await pipe.execute()
                    sent += due
                await asyncio.sleep(max(0.0, started + sent / rate - time.monotonic()))
            return sent, time.monotonic() - started
        finally:
            await redis.aclose()

    return asyncio.run(run())


async def stream_counts(redis, keys: Keys, mine: list[int]) -> dict[str, int]:
    """Entries added to owned / other partitions' streams, and what the group read of each."""
    out = {"added_mine": 0, "added_all": 0, "group_read_mine": 0, "group_read_other": 0}
    out["pending"] = 0
    for p in range(keys.partitions):
        stream = keys.ticks(p)
        if not await redis.exists(stream):
            continue
        added = int((await redis.xinfo_stream(stream))["entries-added"])
        out["added_all"] += added
        if p in mine:
            out["added_mine"] += added
        for group in await redis.xinfo_groups(stream):
            name = group["name"]
            name = name.decode() if isinstance(name, bytes) else name
            if name != keys.group:
                continue
            read = int(group.get("entries-read") or 0)
            out["group_read_mine" if p in mine else "group_read_other"] += read
            out["pending"] += int(group["pending"])
    return out


async def run_case(
    redis,
    url: str,
    tmp: str,
    case: str,
    shard_count: int,
    args,
    foreign: bool = False,
    symbols: int | None = None,
    rate: float | None = None,
    code: str = "current",
    checkout: Path = ROOT,
) -> dict:
    """One replica, replica 0 of ``shard_count``; with ``foreign``, the load has no tick of its
    partitions (all ``rate`` ticks/s go to the others). ``symbols`` and ``rate``: --symbols and
    --rate unless given. ``checkout``: the code the replica runs (``code`` names it)."""
    symbols = args.symbols if symbols is None else symbols
    rate = args.rate if rate is None else rate
    prefix = f"partitions-{case}-{code}-{int(time.time())}"
    keys = Keys(prefix, args.partitions)
    names = names_for(symbols)
    mine = owned(0, shard_count, args.partitions)
    share = 0.0 if foreign else sum(1 for n in names if keys.partition(n) in mine) / len(names)
    await seed_history(redis, keys, names, bench.prices(symbols, 2000, seed=1)[:, :HISTORY])
    port = free_port()
    env = {
        **os.environ,
        "STREAMCAST_REDIS_URL": url,
        "STREAMCAST_KEY_PREFIX": prefix,
        "STREAMCAST_PARTITIONS": str(args.partitions),
        "STREAMCAST_ASSIGNMENT": "static",
        "STREAMCAST_SHARD_INDEX": "0",
        "STREAMCAST_SHARD_COUNT": str(shard_count),
        "STREAMCAST_HTTP_PORT": str(port),
        "STREAMCAST_MODEL_CACHE_DIR": str(Path(tmp) / "cache"),
        "STREAMCAST_RETRAIN_INTERVAL_S": "0",
        "TF_CPP_MIN_LOG_LEVEL": "3",
    }
    for item in args.env:
        key, _, value = item.partition("=")
        env[key] = value
    replica = bench.spawn_serve(env, Path(tmp) / f"serve-{case}-{code}.log", checkout)
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    loop = asyncio.get_running_loop()
    try:
        await bench.wait_ready(port, replica)
        owned_gauge = metric_values(port, "streamcast_partitions_owned")
        await asyncio.sleep(2.0)  # past start-up work
        idle_t, idle_c = time.monotonic(), cpu_seconds(replica.pid)
        await asyncio.sleep(args.idle)
        idle = (cpu_seconds(replica.pid) - idle_c) / (time.monotonic() - idle_t)
        load_before = os.getloadavg()[0]
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            at = time.time() + 5.0  # the producer's start-up is not load time
            producer = loop.run_in_executor(
                pool, produce, url, prefix, args.partitions, symbols, rate,
                args.seconds, at, tuple(mine) if foreign else (),
            )  # fmt: skip
            await asyncio.sleep(max(0.0, at + args.warmup - time.time()))
            t0, c0 = time.monotonic(), cpu_seconds(replica.pid)
            batches_before = metric_values(port, "streamcast_batch_size_count")
            latency_before = latency_buckets(port)
            await asyncio.sleep(max(0.0, at + args.seconds - time.time()))
            t1, c1 = time.monotonic(), cpu_seconds(replica.pid)
            load_during = os.getloadavg()[0]
            batches_during = metric_values(port, "streamcast_batch_size_count")
            p99 = p99_bound(latency_before, latency_buckets(port))
            sent, took = await producer
        counts = await stream_counts(redis, keys, mine)
        deadline = time.monotonic() + args.drain_timeout
        while (
            sum((read := ticks_read(port)).values()) < counts["added_mine"]
            and time.monotonic() < deadline
        ):
            await asyncio.sleep(0.5)
        await asyncio.sleep(1.0)  # anything read past the owned entries would show now
        read = ticks_read(port)
        counts = await stream_counts(redis, keys, mine)
        paths = metric_values(port, "streamcast_forecasts_total").get('{kind="path"}', 0.0)
        groups = metric_values(port, "streamcast_stage_seconds_count").get(
            '{stage="path_compute"}', 0.0
        )
        batches = metric_values(port, "streamcast_batch_size_count").get("", 0.0)
    finally:
        replica.terminate()
        try:
            replica.wait(30)
        except Exception:
            replica.kill()
    return {
        "case": case,
        "code": code,
        "symbols": symbols,
        "mine": mine,
        "owned_gauge": next(iter(owned_gauge.values()), float("nan")),
        "share": share,
        "idle": idle,
        "cpu": (c1 - c0) / (t1 - t0),
        "window": t1 - t0,
        "sent": sent,
        "rate": sent / took,
        "read": sum(read.values()),
        "outcomes": read,
        "load": (load_before, load_during),
        "paths": int(paths),
        "path_groups": int(groups),
        "p99": p99,
        "batches": int(batches),
        "batch_rate": (batches_during.get("", 0.0) - batches_before.get("", 0.0)) / (t1 - t0),
        **counts,
    }


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--symbols", type=int, default=500)
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--rate", type=float, default=2000.0)
    parser.add_argument("--seconds", type=float, default=30.0, help="load per case")
    parser.add_argument("--warmup", type=float, default=5.0, help="load seconds not measured")
    parser.add_argument("--idle", type=float, default=5.0, help="idle CPU sample before the load")
    parser.add_argument("--drain-timeout", type=float, default=60.0)
    parser.add_argument(
        "--env", action="append", default=[], help="extra STREAMCAST_X=Y for the replica"
    )
    parser.add_argument(
        "--no-foreign", action="store_true", help="skip case C (only other partitions' ticks)"
    )
    parser.add_argument("--cases", default="A,B,D,C", help="which cases, in this order")
    parser.add_argument(
        "--before", metavar="REF", help="also run each case with the replica of commit REF"
    )
    parser.add_argument("--record", action="store_true", help="write docs/results/partitions.md")
    parser.add_argument("--result", help="NAME of the recorded result (docs/results/NAME.md)")
    args = parser.parse_args()
    if args.warmup >= args.seconds:
        sys.exit("--warmup must be shorter than --seconds")

    cases = [c for c in args.cases.split(",") if c and not (c == "C" and args.no_foreign)]
    if not cases or not set(cases) <= {"A", "B", "C", "D"} or len(set(cases)) != len(cases):
        sys.exit("--cases: a comma-separated list of A, B, C, D, each at most once")
    # D: what B receives (its symbols, its ticks/s) on a replica that owns every partition
    keys = Keys("bench", args.partitions)
    b_symbols = sum(
        1
        for n in names_for(args.symbols)
        if keys.partition(n) in owned(0, args.partitions, args.partitions)
    )
    if "D" in cases and b_symbols == 0:
        sys.exit("case D: replica 0's partition holds none of the symbols (more --symbols)")
    runs: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        old = bench.worktree(args.before, Path(tmp)) if args.before else None
        redis_proc, url = bench.start_redis(tmp)
        redis = make_redis(url)
        codes = [("before", old), ("current", ROOT)] if old is not None else [("current", ROOT)]
        try:
            for case in cases:
                for code, checkout in codes:
                    where = {"code": code, "checkout": checkout}
                    if case == "A":
                        r = await run_case(redis, url, tmp, case, 1, args, **where)
                    elif case == "D":
                        rate = args.rate * b_symbols / args.symbols
                        r = await run_case(
                            redis, url, tmp, case, 1, args, symbols=b_symbols, rate=rate, **where
                        )
                    else:
                        r = await run_case(
                            redis, url, tmp, case, args.partitions, args, case == "C", **where
                        )
                    runs.append(r)
        finally:
            await redis.aclose()
            redis_proc.terminate()
            redis_proc.wait(10)
            if old is not None:
                bench.remove_worktree(old)
    report(args, runs)


def report(args, runs: list[dict]) -> None:
    out = Report(args.result or "partitions")
    out(f"# bench/partitions.py on {platform.node()}, {os.cpu_count()} CPUs")
    out(
        f"# {args.symbols} symbols over {args.partitions} partitions; a producer process offers "
        f"{args.rate:,.0f} ticks/s evenly in 10 ms slices for {args.seconds:.0f} s per case; one "
        "`streamcast serve` replica with static assignment; redis, the producer and the replica "
        "share the machine"
        + (f"; replica settings {' '.join(args.env)}" if args.env else "")
        + (
            f"; 'before' rows: the replica of {args.before}, each run just before the current "
            "code's run of the case"
            if args.before
            else ""
        )
    )
    out(
        f"# CPU: the replica's utime+stime per wall second over the last "
        f"{args.seconds - args.warmup:.0f} s of the load (idle: {args.idle:.0f} s before it); "
        "entries read: its streamcast_ticks_total (forecast+filling+dead+duplicate) after the drain"
    )
    out()
    before = bool(args.before)
    out(
        ("| code " if before else "")
        + "| case | partitions owned | share of ticks | ticks offered (rate) | CPU idle | CPU under "
        "load | entries read | entries in owned partitions | read == owned | read from other "
        "partitions | forecasts | 50-step paths | batches (per s in the window) | p99 latency "
        "in the window | 1-min load avg (before / end) |"
    )
    out(
        ("|---" if before else "")
        + "|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|"
    )
    for r in runs:
        label = {
            "A": "A: owns all",
            "B": f"B: owns 1 of {args.partitions}",
            "C": f"C: owns 1 of {args.partitions}, no tick of its own offered",
            "D": f"D: owns all, offered only what B gets ({r['symbols']} symbols)",
        }[r["case"]]
        same = r["read"] == r["added_mine"] == r["group_read_mine"]
        out(
            (f"| {r['code']} " if before else "")
            + f"| {label} | {len(r['mine'])} {r['mine']} | {r['share']:.1%} | {r['sent']:,} "
            f"({r['rate']:,.0f}/s) | {r['idle']:.1%} | {r['cpu']:.1%} | {r['read']:,} | "
            f"{r['added_mine']:,} | {'yes' if same else 'NO'} | {r['group_read_other']:,} | "
            f"{r['outcomes'].get('forecast', 0):,} | {r['paths']:,} | {r['batches']:,} "
            f"({r['batch_rate']:.0f}/s) | <= {1000 * r['p99']:.0f} ms | {r['load'][0]:.2f} / "
            f"{r['load'][1]:.2f} |"
        )
    out()
    for code in dict.fromkeys(r["code"] for r in runs):
        results = {r["case"]: r for r in runs if r["code"] == code}
        if before:
            out(f"{code}:")
        ratios(out, results, args.partitions)
    if before:
        out()
        for case in dict.fromkeys(r["case"] for r in runs):
            old, new = (
                next(r for r in runs if r["case"] == case and r["code"] == c)
                for c in ("before", "current")
            )
            out(
                f"{case}: CPU before / current = {old['cpu']:.1%} / {new['cpu']:.1%} = "
                f"{old['cpu'] / new['cpu']:.2f}x; paths {old['paths']:,} / {new['paths']:,}; "
                f"batches {old['batches']:,} / {new['batches']:,}"
            )
    out.save(args.record)


def ratios(out, results: dict[str, dict], partitions: int) -> None:
    """CPU(B)/CPU(A), CPU(B)/CPU(D), CPU(D)/CPU(A), ticks per batch, case C and the outcomes of
    one code's runs."""
    a, b, d = (results.get(k) for k in "ABD")
    if a and b:
        out(
            f"CPU(B) / CPU(A) = {b['cpu']:.1%} / {a['cpu']:.1%} = {b['cpu'] / a['cpu']:.3f} "
            f"(1/{a['cpu'] / b['cpu']:.1f}); B's share of the ticks: {b['read'] / a['read']:.3f} "
            f"(target: CPU follows the share, about 1/{partitions})"
        )
        busy_a, busy_b = a["cpu"] - a["idle"], b["cpu"] - b["idle"]
        if busy_a > 0:
            out(f"above idle: {busy_b:.1%} / {busy_a:.1%} = {busy_b / busy_a:.3f}")
    if b and d:
        out(
            f"CPU(B) / CPU(D) = {b['cpu']:.1%} / {d['cpu']:.1%} = {b['cpu'] / d['cpu']:.3f}: "
            "the same ticks on a replica owning 1 partition and on one owning all (1.0: owning a "
            "share costs nothing of its own)"
        )
    if a and d:
        out(
            f"CPU(D) / CPU(A) = {d['cpu'] / a['cpu']:.3f} for {d['read'] / a['read']:.3f} of the "
            "ticks: what one replica's CPU does when its load drops (batches shrink)"
        )
    for r in results.values():
        if r["batches"]:
            out(
                f"{r['case']}: {r['read'] / r['batches']:.1f} ticks per batch on average "
                "(a batch is one engine call, plus a rollout when some symbol's path is due)"
                + (
                    f"; {r['paths'] / r['path_groups']:.1f} paths per path group "
                    f"({r['path_groups']:,} groups)"
                    if r.get("path_groups")
                    else ""
                )
            )
    if c := results.get("C"):
        out(
            f"C: {c['sent']:,} ticks offered ({c['rate']:,.0f}/s), all to partitions it does not "
            f"own: CPU {c['cpu']:.1%} under the load vs {c['idle']:.1%} idle, what the ticks "
            "that are not its own cost it (before issue 14: 28 % of a core for a replica owning "
            "1/50 of the symbols)"
        )
    for r in results.values():
        out(
            f"{r['case']}: outcomes {r['outcomes']}; group entries-read on owned partitions "
            f"{r['group_read_mine']:,}, pending {r['pending']}; partitions_owned gauge "
            f"{r['owned_gauge']:.0f}; entries in all partitions {r['added_all']:,}"
        )


if __name__ == "__main__":
    asyncio.run(main())
