"""The daemon on a real Redis Cluster (3 masters on free ports): replicas share 12 partitions by
lease; one is killed with -9 mid-feed, another joins, a partition's slot moves between masters
while ticks flow; and, on a cluster with a replica per master, a master is killed with -9 and its
replica promoted. Every tick (every one the cluster kept) is forecast exactly once throughout."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time

import numpy as np
import pytest
from redis import exceptions as redis_errors

from streamcast.connect import ClusterClient, ClusterClientPipeline, make_redis
from streamcast.keys import Keys
from streamcast.wire import Tick

from .helpers import (
    check_exactly_once,
    feed,
    free_port,
    http_get,
    keep_ticks,
    spawn_daemon,
    start_redis_cluster,
    wait_for,
    wait_ready,
    wait_settled,
)

pytestmark = pytest.mark.slow

PARTITIONS = "12"
SYMBOLS = [f"C{i:02d}" for i in range(24)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    nodes = start_redis_cluster(tmp_path_factory.mktemp("cluster"))
    yield nodes
    nodes.stop()


@pytest.fixture
async def client(cluster):
    redis = make_redis(cluster.url)
    # the client that says redis-py's cluster outages as lost connections, its pipelines too
    assert isinstance(redis, ClusterClient)
    assert isinstance(redis.pipeline(), ClusterClientPipeline)
    yield redis
    await redis.aclose()


class PacedFeed:
    """Sends one tick of every symbol per round, rounds evenly spaced, through the cluster
    client (each symbol's partition stream); stops when told."""

    def __init__(self, redis, keys: Keys, rate_rounds: float = 10.0) -> None:
        self.redis, self.keys = redis, keys
        self.prices = feed(len(SYMBOLS), 2000)
        self.interval = 1.0 / rate_rounds
        self.rounds = 0
        self.stop = asyncio.Event()

    async def run(self, rounds: int) -> None:
        start = time.monotonic()
        while self.rounds < rounds and not self.stop.is_set():
            for attempt in range(20):
                pipe = self.redis.pipeline(transaction=False)
                for row, symbol in enumerate(SYMBOLS):
                    price = float(self.prices[row, self.rounds])
                    pipe.xadd(self.keys.ticks_for(symbol), Tick.encode(symbol, price))
                try:
                    await pipe.execute()
                    break
                except (
                    redis_errors.ClusterError,
                    redis_errors.ConnectionError,
                    redis_errors.TimeoutError,
                    redis_errors.RedisClusterException,
                ):
                    # a slot moving, or a master failing over: a producer tries again (some
                    # ticks of the round may land twice: each is its own tick)
                    await asyncio.sleep(0.05 * (attempt + 1))
            self.rounds += 1
            delay = start + self.rounds * self.interval - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)

    def expected(self) -> int:
        return len(SYMBOLS) * max(0, self.rounds - 49)


async def feeding(
    client, keys: Keys, rounds: int, first: int
) -> tuple[PacedFeed, asyncio.Task[None]]:
    """A paced feed of ``rounds`` rounds running, once its ``first`` rounds are sent."""
    producer = PacedFeed(client, keys)
    sending = asyncio.create_task(producer.run(rounds))
    await wait_for(lambda: asyncio.sleep(0, producer.rounds >= first), timeout_s=60)
    return producer, sending


async def forecasts(redis, keys: Keys) -> int:
    return sum([await redis.xlen(keys.forecasts(s)) for s in SYMBOLS])


def owned(port: int) -> float:
    for line in http_get(port, "/metrics")[1].splitlines():
        if line.startswith("streamcast_partitions_owned "):
            return float(line.split()[1])
    return -1.0


def replica(cluster, prefix: str, tmp_path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    process = spawn_daemon(
        cluster.nodes[1].url.rsplit("/", 1)[0],  # any node of the cluster will do
        prefix,
        port,
        tmp_path,
        STREAMCAST_PARTITIONS=PARTITIONS,
        STREAMCAST_LEASE_TTL_S="4",
        STREAMCAST_RETRAIN_INTERVAL_S="0",
    )
    return process, port


def stop(processes) -> None:
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()


async def all_forecast(client, keys: Keys, producer: PacedFeed, timeout_s: float = 90) -> None:
    async def done() -> bool:
        return await forecasts(client, keys) >= producer.expected()

    await wait_for(done, timeout_s=timeout_s, what=f"{producer.expected()} forecasts")
    await wait_settled(client, keys)


async def test_replicas_killed_and_added_mid_feed_forecast_each_tick_once(
    cluster, client, tmp_path
):
    keys = Keys("killjoin", partitions=int(PARTITIONS))
    await keep_ticks(client, keys)
    started = [replica(cluster, keys.prefix, tmp_path) for _ in range(3)]
    processes = [p for p, _ in started]
    try:
        for process, port in started:
            await wait_ready(port, process)
        await wait_for(
            lambda: asyncio.sleep(0, sorted(owned(p) for _, p in started) == [4, 4, 4]),
            what="four partitions each",
            timeout_s=30,
        )
        producer, sending = await feeding(client, keys, rounds=400, first=100)
        victim, _ = started.pop(0)
        os.kill(victim.pid, signal.SIGKILL)  # mid-feed: its batch in flight is not acknowledged
        killed = time.monotonic()
        await wait_for(
            lambda: asyncio.sleep(0, sorted(owned(p) for _, p in started) == [6, 6]),
            what="the killed replica's partitions taken over",
            timeout_s=15 + 5,
        )
        took_over_s = time.monotonic() - killed
        joined = replica(cluster, keys.prefix, tmp_path)
        processes.append(joined[0])
        await wait_ready(joined[1], joined[0], status=200)
        started.append(joined)
        await wait_for(
            lambda: asyncio.sleep(0, sorted(owned(p) for _, p in started) == [4, 4, 4]),
            what="the new replica's fair share",
            timeout_s=30,
        )
        await sending
        await all_forecast(client, keys, producer)
    finally:
        stop(processes)
    await check_exactly_once(client, keys, SYMBOLS)
    assert took_over_s < 15, f"the takeover took {took_over_s:.1f} s"


def _cli(port: int, *args: str) -> str:
    done = subprocess.run(
        ["redis-cli", "-p", str(port), *args], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def node_id(port: int) -> str:
    return _cli(port, "cluster", "myid")


def busiest_slot(cluster, keys: Keys) -> int:
    """The slot of the partition with the most of the test's symbols."""
    counts = np.bincount([keys.partition(s) for s in SYMBOLS], minlength=keys.partitions)
    ticks = keys.ticks(int(np.argmax(counts)))
    return int(_cli(cluster.nodes[0].port, "cluster", "keyslot", ticks))


def slot_owner(cluster, slot: int, via=None):
    """The node serving ``slot``, as ``via`` (a live node; the first by default) sees it."""
    # CLUSTER NODES: id host:port@bus flags master - ping pong epoch state slot ranges...
    for line in _cli((via or cluster.nodes[0]).port, "cluster", "nodes").splitlines():
        fields = line.split()
        if "fail" in fields[2].split(","):
            continue
        port = int(fields[1].split("@")[0].split(":")[1])
        for spec in fields[8:]:
            if spec.startswith("["):
                continue
            low, _, high = spec.partition("-")
            if int(low) <= slot <= int(high or low):
                return next(n for n in cluster.nodes if n.port == port)
    raise AssertionError(f"no node serves slot {slot}")


def migrate_slot(cluster, slot: int, target) -> None:
    """Move ``slot`` to ``target`` key by key, as `redis-cli --cluster reshard` does: IMPORTING
    on the target, MIGRATING on the source, MIGRATE of every key, then the slot's new owner told
    to every master. Clients meet ASK during the move and MOVED after it."""
    source = slot_owner(cluster, slot)
    assert source.port != target.port
    _cli(target.port, "cluster", "setslot", str(slot), "importing", node_id(source.port))
    _cli(source.port, "cluster", "setslot", str(slot), "migrating", node_id(target.port))
    while True:
        keys = _cli(source.port, "cluster", "getkeysinslot", str(slot), "100").split()
        if not keys:
            break
        _cli(source.port, "migrate", "127.0.0.1", str(target.port), "", "0", "5000", "keys", *keys)
        time.sleep(0.05)  # ticks keep flowing meanwhile
    for node in cluster.nodes:
        _cli(node.port, "cluster", "setslot", str(slot), "node", node_id(target.port))


async def test_a_partitions_slot_moves_between_masters_while_ticks_flow(cluster, client, tmp_path):
    keys = Keys("reshard", partitions=int(PARTITIONS))
    await keep_ticks(client, keys)
    one = replica(cluster, keys.prefix, tmp_path)
    try:
        await wait_ready(one[1], one[0])
        producer, sending = await feeding(client, keys, rounds=300, first=80)
        slot = busiest_slot(cluster, keys)
        source = slot_owner(cluster, slot)
        target = next(n for n in cluster.nodes if n.port != source.port)
        await asyncio.to_thread(migrate_slot, cluster, slot, target)
        assert slot_owner(cluster, slot).port == target.port
        await sending
        await all_forecast(client, keys, producer)
        assert one[0].poll() is None, "the daemon exited"
    finally:
        stop([one[0]])
    await check_exactly_once(client, keys, SYMBOLS)


def replica_of(nodes, master):
    """The node replicating ``master``, as ``master`` sees it."""
    master_id = node_id(master.port)
    for line in _cli(master.port, "cluster", "nodes").splitlines():
        fields = line.split()
        if fields[3] == master_id:
            port = int(fields[1].split("@")[0].split(":")[1])
            return next(n for n in nodes.nodes if n.port == port)
    raise AssertionError(f"no replica of {master.port}")


@pytest.mark.parametrize("how", ["kill", "failover"])
async def test_a_master_lost_mid_feed_fails_over_and_every_kept_tick_is_forecast_once(
    tmp_path, how
):
    """The master serving the busiest partition, while ticks flow: killed with -9 (``kill``: its
    replica is promoted after cluster-node-timeout, 2 s, plus the election), or handed over by
    ``CLUSTER FAILOVER`` on its replica (``failover``: the operator's way, nothing lost; the old
    master becomes a replica, its clients get MOVED). The daemon carries on there.
    Replication is asynchronous, so ticks (and publishes) the old master took just before it died
    may be gone; every tick the cluster kept is forecast exactly once: a publish is one script,
    replicated whole, and the daemon rebuilds its windows from history after the outage."""
    nodes = start_redis_cluster(tmp_path / "ha", replicas=1, node_timeout_ms=2000)
    client = make_redis(nodes.url)
    keys = Keys("failover", partitions=int(PARTITIONS))
    one = None
    try:
        await keep_ticks(client, keys)
        one = replica(nodes, keys.prefix, tmp_path)
        await wait_ready(one[1], one[0])
        _, sending = await feeding(client, keys, rounds=300, first=80)
        slot = busiest_slot(nodes, keys)
        victim = slot_owner(nodes, slot)
        survivor = replica_of(nodes, victim)
        if how == "kill":
            victim.process.kill()
            victim.process.wait(10)
        else:
            _cli(survivor.port, "cluster", "failover")

        def promoted() -> bool:
            if "cluster_state:ok" not in _cli(survivor.port, "cluster", "info"):
                return False
            try:
                return slot_owner(nodes, slot, survivor) is survivor
            except AssertionError:  # marked failed, no replica promoted yet
                return False

        await wait_for(
            lambda: asyncio.to_thread(promoted), timeout_s=30, what="the replica promoted"
        )
        await sending
        await wait_settled(client, keys, timeout_s=90)
        assert one[0].poll() is None, "the daemon exited"
        assert http_get(one[1], "/readyz")[0] == 200
        stop([one[0]])
        await check_exactly_once(client, keys, SYMBOLS)
    finally:
        if one is not None:
            stop([one[0]])
        await client.aclose()
        nodes.stop()
