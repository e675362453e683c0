"""Everything operators and hostile clients do, to one running deployment, at once.

    python bench/hostile.py [--symbols 20] [--rate 200] [--seconds 60] [--record]

Starts a private redis-server and two `streamcast serve` processes with the same settings (one
consumes, one stands by), after promoting a current model that does not load. A paced producer
(10 ms slices) offers --rate ticks/s over --symbols symbols, remembering every id Redis gave it:
the truth the end checks compare with. Meanwhile, on a schedule: 100 live pages opened and
dropped, 300 slow-header sockets held, 50 oversized requests, absurd prices and timestamps, 1 MB
entries and garbage, the consumer group destroyed, Redis at maxmemory for a few seconds, a symbol
whose forecasts key is the wrong type, a symbol with bad history, and the consuming process
kill -9'd. Then it waits for the backlog, checks every symbol tick by tick, and prints a table.
Exit status 1 if any check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import daemon as bench  # noqa: E402  (bench/daemon.py: redis, serve, load helpers)
import numpy as np  # noqa: E402
from results import Report  # noqa: E402  (bench/results.py)

from streamcast.connect import make_redis  # noqa: E402
from streamcast.demo import free_port  # noqa: E402
from streamcast.keys import Keys  # noqa: E402
from streamcast.model import DEFAULT_MODEL_DIR  # noqa: E402
from streamcast.registry import Registry  # noqa: E402
from streamcast.wire import Tick, id_key  # noqa: E402

PREFIX = "hostile"


def metrics(port: int) -> dict[str, float]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=3) as response:
            body = response.read().decode()
    except OSError:
        return {}
    out = {}
    for line in body.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                out[name] = float(value)
    return out


def status(port: int, path: str = "/readyz") -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=3) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


class Producer:
    """Paced XADDs (10 ms slices) over the symbols, retrying a slice Redis refuses (OOM)."""

    def __init__(self, redis, keys: Keys, names: list[str], rate: float) -> None:
        self.redis, self.keys, self.names, self.rate = redis, keys, names, rate
        self.ids: dict[str, list[str]] = {n: [] for n in names}
        self.refused = 0
        self.sent = 0
        rng = np.random.default_rng(3)
        self.feed = 100 * np.exp(np.cumsum(rng.normal(0, 0.004, (len(names), 20_000)), axis=1))

    async def run(self, seconds: float) -> int:
        started, sent = time.monotonic(), 0
        while (elapsed := time.monotonic() - started) < seconds:
            due = int(min(elapsed + 0.01, seconds) * self.rate) - sent
            if due > 0:
                await self.send(due)
                sent += due
            await asyncio.sleep(max(0.0, started + sent / self.rate - time.monotonic()))
        return sent

    async def send(self, count: int) -> None:
        """``count`` more ticks, round robin; a tick Redis refuses (OOM) is sent again, alone:
        only the ids Redis acknowledged are recorded, each once."""
        batch = [
            ((self.sent + k) % len(self.names), (self.sent + k) // len(self.names))
            for k in range(count)
        ]
        self.sent += count
        while batch:
            pipe = self.redis.pipeline(transaction=False)
            for s, t in batch:
                # each to its symbol's partition; not the client's publish_many, which raises
                # on a refusal: here each refused tick is sent again
                name = self.names[s]
                pipe.xadd(self.keys.ticks_for(name), Tick.encode(name, float(self.feed[s, t])))
            replies = await pipe.execute(raise_on_error=False)
            again = []
            for (s, t), reply in zip(batch, replies, strict=True):
                if isinstance(reply, Exception):
                    again.append((s, t))
                else:
                    self.ids[self.names[s]].append(reply.decode())
            if again:
                self.refused += len(again)  # Redis at maxmemory: the feed waits and retries
                await asyncio.sleep(0.05)
            batch = again


async def open_and_drop_pages(port: int, count: int) -> None:
    for _ in range(count):
        with contextlib.suppress(OSError):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /events?symbols=S0 HTTP/1.1\r\nHost: x\r\n\r\n")
            await writer.drain()
            await reader.readline()
            writer.close()


async def slow_heads(port: int, count: int) -> list:
    held = []
    for _ in range(count):
        with contextlib.suppress(OSError):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            held.append(writer)
    return held


async def oversized(port: int, count: int) -> int:
    answered = 0
    for _ in range(count):
        with contextlib.suppress(OSError):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            # 20 kB: over aiohttp's 8 kB line limit, small enough to be sent whole before the 400
            writer.write(b"GET /?" + b"q" * 20_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
            await writer.drain()
            line = await reader.readline()
            parts = line.split()
            answered += len(parts) > 1 and parts[1].startswith(b"4")
            writer.close()
    return answered


HOSTILE_PRICES = [
    ("1e-320", "price_out_of_range"),
    ("1e300", "price_out_of_range"),
    ("+100", "bad_price"),
    (" 12.5 ", "bad_price"),
    ("1_000", "bad_price"),
    ("\u0661\u0662", "bad_price"),
    ("nan", "non_finite_price"),
    ("-3", "non_positive_price"),
]


async def hostile_entries(redis, keys: Keys) -> dict[str, int]:
    """Bad entries of every kind; returns the dead letters they must produce, by reason."""
    expected: dict[str, int] = {}
    now_ms = int(time.time() * 1000)
    pipe = redis.pipeline(transaction=False)
    for price, reason in HOSTILE_PRICES:
        pipe.xadd(keys.ticks_for("S1"), {"symbol": "S1", "price": price})
        expected[reason] = expected.get(reason, 0) + 1
    for ts in (now_ms + 10**9, now_ms * 1000):  # 11 days ahead; microseconds
        pipe.xadd(keys.ticks_for("S2"), {"symbol": "S2", "price": "100", "ts": str(ts)})
        expected["bad_ts"] = expected.get("bad_ts", 0) + 1
    for i in range(20):
        junk = {"symbol": "S3", "price": "100", "junk": b"x" * 1_000_000, "i": i}
        pipe.xadd(keys.ticks_for("S3"), junk)
        expected["oversized"] = expected.get("oversized", 0) + 1
    rng = np.random.default_rng(9)
    for _ in range(200):
        bad = "../" + "x" * int(rng.integers(1, 80))
        pipe.xadd(keys.ticks_for(bad), {"symbol": bad, "price": "1"})
        expected["bad_symbol"] = expected.get("bad_symbol", 0) + 1
    await pipe.execute()
    return expected


async def promote_a_broken_model(redis, keys: Keys, tmp: Path) -> str:
    registry = Registry(redis, keys, tmp / "cache")
    await registry.ensure_current(DEFAULT_MODEL_DIR)
    broken = tmp / "broken"
    shutil.copytree(DEFAULT_MODEL_DIR, broken)
    (broken / "model.keras").write_bytes(b"not a model")
    sidecar = json.loads((broken / "model.json").read_text())
    sidecar.update(version="broken-1", sha256=hashlib.sha256(b"not a model").hexdigest())
    (broken / "model.json").write_text(json.dumps(sidecar))
    await registry.register(broken)
    await registry.promote("broken-1", reason="bench/hostile.py: a bad promotion")
    return "broken-1"


def rss_mb(pid: int) -> float:
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as status_file:
        for line in status_file:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--symbols", type=int, default=20)
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--record", action="store_true", help="write docs/results/hostile.md")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="hostile-"))
    server, url = bench.start_redis(str(tmp))
    redis = make_redis(url)
    keys = Keys(PREFIX)
    names = [f"S{i}" for i in range(args.symbols)] + ["BADHIST", "WRONG"]
    rows: list[tuple[str, str, bool]] = []
    processes = []
    held: list = []
    try:
        refused_version = await promote_a_broken_model(redis, keys, tmp)
        for i in range(60):  # history with a 0 and a 1e-320 in it, written raw
            price = {20: "0", 40: "1e-320"}.get(i, repr(100.0 + i))
            await redis.xadd(keys.history("BADHIST"), {"price": price}, id=f"0-{i + 1}")
        await redis.set(keys.forecasts("WRONG"), "an operator's mistake")
        ports = [free_port(), free_port()]
        env = {
            **os.environ,
            "STREAMCAST_REDIS_URL": url,
            "STREAMCAST_KEY_PREFIX": PREFIX,
            "STREAMCAST_CONSUMER_NAME": "replica-0",
            "STREAMCAST_LEASE_TTL_S": "5",
            "STREAMCAST_TICKS_TRIM_INTERVAL_S": "2",
            "STREAMCAST_MODEL_CHECK_S": "2",
            "STREAMCAST_MODEL_CACHE_DIR": str(tmp / "models"),
            "STREAMCAST_HTTP_HEADER_TIMEOUT_S": "3",
            "STREAMCAST_RETRAIN_INTERVAL_S": "0",
        }
        for i, port in enumerate(ports):
            processes.append(
                bench.spawn_serve(
                    {**env, "STREAMCAST_HTTP_PORT": str(port)}, tmp / f"serve-{i}.log"
                )
            )
            if i == 0:
                await bench.wait_ready(port, processes[0])
        first, second = processes
        deadline = time.monotonic() + 120
        while metrics(ports[1]).get("streamcast_standby") != 1.0:
            assert time.monotonic() < deadline and second.poll() is None, "no standby"
            await asyncio.sleep(0.5)
        rows.append(
            ("second serve, same settings", "stands by, /readyz 503", status(ports[1]) == 503)
        )
        m = metrics(ports[0])
        rows.append(
            (
                "current model does not load",
                f"started on the last good one; {refused_version} refused once",
                m.get('streamcast_recoveries_total{what="start_fallback"}') == 1.0,
            )
        )

        producer = Producer(redis, keys, names, args.rate)
        load = asyncio.create_task(producer.run(args.seconds))
        t0 = time.monotonic()

        async def at(seconds: float) -> None:
            await asyncio.sleep(max(0.0, t0 + seconds - time.monotonic()))

        xlen_samples: list[int] = []

        async def sample_xlen() -> None:
            while not load.done():
                xlen_samples.append(await redis.xlen(keys.ticks(0)))
                await asyncio.sleep(1.0)

        sampler = asyncio.create_task(sample_xlen())
        s = args.seconds / 60  # the schedule scales with the run
        await at(3 * s)
        await open_and_drop_pages(ports[0], 100)
        await at(5 * s)
        held = await slow_heads(ports[0], 300)
        await at(6 * s)
        answered_4xx = await oversized(ports[0], 50)
        await at(8 * s)
        expected_dead = await hostile_entries(redis, keys)
        await at(12 * s)
        await redis.xgroup_destroy(keys.ticks(0), keys.group)
        await at(18 * s)
        await producer.send(
            1000
        )  # a burst: the daemon has a backlog to publish when memory runs out
        used = (await redis.info("memory"))["used_memory"]
        await redis.config_set("maxmemory-policy", "noeviction")
        await redis.config_set("maxmemory", str(used))
        await asyncio.sleep(3)
        oom = metrics(ports[0]).get('streamcast_redis_refusals_total{reason="OOM"}', 0.0)
        not_ready_in_oom = status(ports[0])
        await redis.config_set("maxmemory", "0")
        await at(26 * s)
        before_kill = metrics(ports[0])
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        took_over_at = time.monotonic()
        while status(ports[1]) != 200:
            assert time.monotonic() - took_over_at < 60, "the standby never took over"
            await asyncio.sleep(0.1)
        takeover_s = time.monotonic() - took_over_at
        sent = await load
        sampler.cancel()
        for writer in held:
            writer.close()

        # the backlog, then the checks
        def expected(name: str) -> list[str]:
            # in stream order: the burst and the paced feed write side by side
            ids = sorted(producer.ids[name], key=id_key)
            return ids if name == "BADHIST" else ids[49:]

        deadline = time.monotonic() + 300
        while True:
            lengths = [await redis.xlen(keys.forecasts(n)) for n in names if n != "WRONG"]
            if all(
                n >= len(expected(m))
                for n, m in zip(lengths, [x for x in names if x != "WRONG"], strict=True)
            ):
                break
            assert time.monotonic() < deadline, "the backlog did not drain"
            await asyncio.sleep(0.5)
        await asyncio.sleep(2.0)  # anything doubled would land now
        exact = []
        for name in names:
            if name == "WRONG":
                continue
            got = [e.decode() for e, _ in await redis.xrange(keys.forecasts(name))]
            exact.append(got == expected(name))
            if got != expected(name):
                want = expected(name)
                missing = sorted(set(want) - set(got))
                print(
                    f"{name}: {len(got)} forecasts for {len(want)} ticks; missing {len(missing)} "
                    f"(first {missing[:3]}), extra {sorted(set(got) - set(want))[:3]}, "
                    f"ticks from {want[:1]}, forecasts from {got[:1]}"
                )
        letters = await redis.xrange(keys.dead(0))
        by_reason: dict[str, int] = {}
        for _, fields in letters:
            reason = fields[b"reason"].decode()
            by_reason[reason] = by_reason.get(reason, 0) + 1
        wrong_letters = [
            f[b"tick_id"].decode() for _, f in letters if f[b"reason"] == b"publish_failed"
        ]
        big = max((sum(len(k) + len(v) for k, v in f.items()) for _, f in letters), default=0)
        recreated = before_kill.get('streamcast_recoveries_total{what="group_recreated"}', 0.0)
        skipped = before_kill.get("streamcast_history_skipped_total", 0.0)
        live_ok = status(ports[1], "/api/symbols") == 200
        rows += [
            (
                "paced feed",
                f"{sent:,} ticks at {args.rate:g}/s over {len(names)} symbols, "
                f"{producer.refused} refused (OOM) and sent again",
                sent > 0,
            ),
            ("100 live pages dropped", "a later page still served", live_ok),
            ("300 slow-header sockets", "held; the daemon kept serving", True),
            ("50 oversized requests", f"{answered_4xx} answered 4xx", answered_4xx == 50),
            (
                "absurd prices, timestamps, 1 MB entries, 200 bad symbols",
                ", ".join(
                    f"{k} {by_reason.get(k, 0)}/{v}" for k, v in sorted(expected_dead.items())
                ),
                all(by_reason.get(k, 0) == v for k, v in expected_dead.items()),
            ),
            ("dead letters stay small", f"largest {big:,} bytes", big < 4096),
            (
                "consumer group destroyed",
                f"recreated ({recreated:g} times); no dead letter written twice",
                recreated >= 1,
            ),
            (
                "Redis at maxmemory for 3 s",
                f"OOM refusals {oom:g}, /readyz {not_ready_in_oom} meanwhile",
                oom >= 1 and not_ready_in_oom == 503,
            ),
            (
                "forecasts key of the wrong type",
                f"{len(wrong_letters)} publish_failed dead letters for {len(expected('WRONG'))} ticks",
                wrong_letters == expected("WRONG"),
            ),
            (
                "bad prices in a symbol's history",
                f"skipped {skipped:g} bad entries; every tick forecast",
                exact[names.index("BADHIST")],
            ),
            ("consumer kill -9'd", f"standby ready {takeover_s:.1f} s later", takeover_s < 15),
            (
                "every tick, every symbol",
                f"{sum(exact)}/{len(exact)} symbols exactly once (ids compared)",
                all(exact),
            ),
            (
                "ticks stream trimmed",
                f"XLEN max {max(xlen_samples, default=0):,} of {sent + 230:,} sent",
                max(xlen_samples, default=0) < (sent + 230) // 2,
            ),
            (
                "the surviving replica",
                f"up, ready, RSS {rss_mb(second.pid):.0f} MB",
                second.poll() is None and status(ports[1]) == 200,
            ),
        ]
    finally:
        for process in processes:
            with contextlib.suppress(Exception):
                process.kill()
                process.wait(10)
        with contextlib.suppress(Exception):
            await redis.aclose()
        server.kill()
    logs = "\n".join(p.read_text() for p in tmp.glob("serve-*.log"))
    rows.append(("logs", "no traceback in either daemon's log", "Traceback" not in logs))
    out = Report("hostile")
    out(f"# bench/hostile.py on {platform.node()} ({os.cpu_count()} CPUs)")
    out("| case | result | ok |")
    out("|---|---|---|")
    for case, result, ok in rows:
        out(f"| {case} | {result} | {'yes' if ok else '**NO**'} |")
    failed = [case for case, _, ok in rows if not ok]
    out(f"{len(rows) - len(failed)} of {len(rows)} cases held")
    out.save(args.record)
    if failed:
        print(f"logs kept in {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
