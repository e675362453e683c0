"""deploy/docker-compose.yml for real: `up -d --scale streamcast=3 redis streamcast replay` on a
Docker engine, Compose's own bridge network and published ports, as the file ships.

Three replicas become ready and share the 12 partitions 4, 4 and 4 (their
`streamcast_partition_owned` on each one's host port, which `docker-compose port --index N`
names; the lease keys in Redis agree), the replay's S&P 500 symbols are forecast, a replica
killed is replaced by the others within a minute, `up` again brings it back to a share, and the
stack stops cleanly. Torn down after (`down -v`, a project name of its own), also on failure.

What is started, and what stands in:
- Prometheus and Grafana are left out (services named on `up`): their images (prom/prometheus,
  grafana/grafana) cannot be pulled here, and Debian packages no Grafana to build one from. Their
  configuration is checked without them (tests/test_deploy.py: promtool, a live scrape, the
  dashboard's queries).
- `redis:7` is deploy/docker/redis-stand-in.sh's image where no real one is present: Debian's
  redis-server behaving as the official image does (the command, redis-cli for the healthcheck,
  /data); a real redis:7 is used as it is.
- streamcast and replay run the image built from this tree (the `image` fixture,
  streamcast:test-HASH): an override file names it instead of streamcast:latest, which may be an
  operator's own build and is neither replaced nor built (`--no-build`). Nothing else is
  overridden: the network, ports, environment, health checks, volume, stop signals, grace
  periods and restart policies tested are the shipped file's.

The kill is `docker kill` (SIGKILL: no drain, no lease given back). The engine counts it as a
user's stop: `restart: unless-stopped` does not bring the container back (checked), so the two
survivors must take its 4 partitions once its leases lapse (10 s TTL) and its membership with
them; then `up` again, as an operator restores the scale, starts it and the shares return to 4.
A crash of the process itself (not a kill through the engine) would be restarted by the policy.
About a minute with the images built.
"""

from __future__ import annotations

import http.client
import os
import re
import secrets
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from streamcast.keys import Keys
from streamcast.replay import symbol_names

from .dockerlib import BUILD_TIMEOUT_S, DOCKER_DIR, ROOT, inspect, need_root_and_tool, run
from .helpers import http_get, wait_for

COMPOSE_FILE = ROOT / "deploy" / "docker-compose.yml"
SERVICES = ("redis", "streamcast", "replay")  # not prometheus, grafana: no image (docstring)
REPLICAS = 3
PARTITIONS = 12  # the file's STREAMCAST_PARTITIONS
KEYS = Keys("streamcast", PARTITIONS)  # the default key prefix: the file sets none
SYMBOLS = symbol_names("SPX", 20)  # the file's replay: --symbol SPX --symbols 20
TAKEOVER_S = 60  # a dead replica's leases lapse after 10 s; the survivors take them a round later
READY_S = 240  # three replicas loading and compiling the model at once on two cores


@pytest.fixture(scope="module")
def compose() -> str:
    return need_root_and_tool("docker-compose", "docker-compose")


@pytest.fixture(scope="module")
def redis_image(docker: str) -> str:
    """The file's Redis image: the stand-in, made now unless it is up to date or a real one is
    present."""
    name = yaml.safe_load(COMPOSE_FILE.read_text())["services"]["redis"]["image"]
    if run(docker, "image", "inspect", name, check=False).returncode != 0:
        # none yet: only root, with debootstrap, makes the stand-in
        if os.geteuid() != 0:
            pytest.skip(f"no {name} image, and only root can make its stand-in")
        need_root_and_tool("debootstrap", "debootstrap")
    run(str(DOCKER_DIR / "redis-stand-in.sh"), timeout_s=900, env={**os.environ, "DOCKER": docker})
    run(docker, "image", "inspect", name)
    return name


class Stack:
    """One Compose project of the shipped file, with the test's image in place of
    streamcast:latest."""

    def __init__(self, compose: str, docker: str, image: str, csv: Path, tmp_path: Path) -> None:
        override = tmp_path / "image.yml"
        override.write_text(
            yaml.safe_dump(
                {
                    "version": "2.4",
                    "services": {name: {"image": image} for name in ("streamcast", "replay")},
                }
            )
        )
        self.docker = docker
        self.project = f"streamcasttest{os.getpid()}{secrets.token_hex(3)}"
        self.command = [compose, "-p", self.project, "-f", str(COMPOSE_FILE), "-f", str(override)]
        self.env = {**os.environ, "SP500_CSV": str(csv)}

    def __call__(self, *args: str, timeout_s: float = 120, **kwargs) -> subprocess.CompletedProcess:
        return run(*self.command, *args, timeout_s=timeout_s, env=self.env, **kwargs)

    def up(self) -> None:
        self(
            "up", "-d", "--no-build", "--scale", f"streamcast={REPLICAS}", *SERVICES, timeout_s=300
        )

    def containers(self, service: str) -> dict[int, str]:
        """The service's containers, running or not, by their number (--index): short ids, which
        are also their host names."""
        # fmt: off
        out = run(
            self.docker, "ps", "--all",
            "--filter", f"label=com.docker.compose.project={self.project}",
            "--filter", f"label=com.docker.compose.service={service}",
            "--format", '{{.Label "com.docker.compose.container-number"}} {{.ID}}',
        ).stdout
        # fmt: on
        return {int(n): cid for n, cid in (line.split() for line in out.splitlines())}

    def port(self, index: int) -> int:
        """The host port of replica ``index``'s 8000 (a new one each time it starts)."""
        out = self("port", "--index", str(index), "streamcast", "8000").stdout.strip()
        return int(out.rsplit(":", 1)[1])

    def redis(self, *commands: str) -> list[str]:
        """The replies of redis-cli in the redis service, one line each (the service publishes
        no port)."""
        out = self("exec", "-T", "redis", "redis-cli", input="\n".join(commands) + "\n")
        return out.stdout.splitlines()

    def forecasts(self) -> dict[str, int]:
        """The length of every replayed symbol's forecast stream."""
        lengths = self.redis(*(f"XLEN {KEYS.forecasts(s)}" for s in SYMBOLS))
        return dict(zip(SYMBOLS, map(int, lengths), strict=True))

    def lease_hosts(self) -> list[str]:
        """The host (container) holding each partition's lease, partition by partition."""
        tokens = self.redis(*(f"GET {KEYS.lease(p)}" for p in range(PARTITIONS)))
        # a token is base:host-hash:pid:random (streamcast.lease.consumer_token)
        return [t.rsplit(":", 3)[1].rsplit("-", 1)[0] if t else "" for t in tokens]

    def logs(self) -> str:
        out = self("logs", "--no-color", "--tail", "25", check=False)
        return (out.stdout + out.stderr)[-8000:]


def owned(port: int) -> set[int] | None:
    """The partitions a replica says it consumes (None while it does not answer, or its two
    gauges disagree mid-change)."""
    try:
        status, body = http_get(port, "/metrics")
    except (OSError, http.client.HTTPException):
        return None
    held = re.findall(r'^streamcast_partition_owned\{partition="(\d+)"\} 1\.0$', body, re.M)
    total = re.search(r"^streamcast_partitions_owned (\S+)$", body, re.M)
    if status != 200 or total is None or float(total[1]) != len(held):
        return None
    return {int(p) for p in held}


def shared_fairly(ports: dict[int, int]) -> dict[int, set[int]] | None:
    """Each replica's partitions once every partition is held by exactly one of them and each
    holds its fair share (12 / replicas); None before."""
    shares: dict[int, set[int]] = {}
    for index, port in ports.items():
        if (held := owned(port)) is None:
            return None
        shares[index] = held
    everyone = sorted(p for held in shares.values() for p in held)  # a partition twice: twice
    fair = PARTITIONS // len(ports)
    if everyone != list(range(PARTITIONS)) or any(len(h) != fair for h in shares.values()):
        return None
    return shares


async def wait_grown(stack: Stack, before: dict[str, int], what: str) -> dict[str, int]:
    """Wait until every symbol's forecast stream has grown past ``before``."""

    def grown() -> dict[str, int] | None:
        now = stack.forecasts()
        return now if all(now[s] > before[s] for s in SYMBOLS) else None

    return await wait_for(grown, 90, what=what, interval_s=1)


@pytest.mark.docker
@pytest.mark.timeout(BUILD_TIMEOUT_S)
async def test_compose_scales_to_three_replicas_that_share_the_partitions_and_fail_over(
    docker, image, redis_image, compose, shared_data, tmp_path
):
    stack = Stack(compose, docker, image, shared_data / "sp500.csv", tmp_path)
    started = time.monotonic()
    try:
        stack.up()
        replicas = stack.containers("streamcast")
        assert sorted(replicas) == [1, 2, 3]
        (redis,) = stack.containers("redis").values()
        (replay,) = stack.containers("replay").values()

        # Redis: the file's command, healthy by the file's check, the append-only file in /data
        state = inspect(docker, redis)
        assert state["State"]["Health"]["Status"] == "healthy"  # replicas wait on it to start
        assert stack.redis("CONFIG GET dir", "CONFIG GET appendonly", "CONFIG GET save") == [
            "dir", "/data", "appendonly", "yes", "save", "",
        ]  # fmt: skip
        mounts = {m["Destination"]: m for m in state["Mounts"]}
        assert mounts["/data"]["Name"] == f"{stack.project}_redis-data"

        # every replica ready on the host port Docker gave it, and the partitions shared 4/4/4
        ports = {index: stack.port(index) for index in replicas}

        def ready() -> bool:
            for index, port in ports.items():
                assert inspect(docker, replicas[index])["State"]["Running"], stack.logs()
                try:
                    if http_get(port, "/readyz")[0] != 200:
                        return False
                except (OSError, http.client.HTTPException):
                    return False
            return True

        await wait_for(ready, READY_S, what="3 replicas answering /readyz 200", interval_s=1)
        ready_s = time.monotonic() - started
        shares = await wait_for(lambda: shared_fairly(ports), 60, what="4 partitions each")
        hosts = stack.lease_hosts()
        assert sorted(hosts) == sorted(replicas[i] for i in replicas for _ in range(4))
        for index, partitions in shares.items():
            assert {p for p, h in enumerate(hosts) if h == replicas[index]} == partitions

        # the replay's symbols forecast, every one of them
        flowing = await wait_grown(stack, stack.forecasts(), "every symbol's forecasts growing")
        assert "Health" not in inspect(docker, replay)["State"]  # no check: it serves no /readyz

        # one replica killed: not restarted, and the two others take its partitions, 6 each
        victim = 2
        survivors = {i: p for i, p in ports.items() if i != victim}
        orphaned = [s for s in SYMBOLS if KEYS.partition(s) in shares[victim]]
        assert orphaned, f"no replayed symbol on partitions {shares[victim]}"
        run(docker, "kill", replicas[victim])
        killed = time.monotonic()
        after = await wait_for(
            lambda: shared_fairly(survivors), TAKEOVER_S, what="the survivors taking all 12"
        )
        takeover_s = time.monotonic() - killed
        victim_state = inspect(docker, replicas[victim])
        assert not victim_state["State"]["Running"] and victim_state["State"]["ExitCode"] == 137
        assert victim_state["RestartCount"] == 0  # unless-stopped: a kill is a user's stop
        assert sorted(stack.lease_hosts()) == sorted(
            replicas[i] for i in survivors for _ in range(6)
        )
        assert all(shares[i] <= after[i] for i in survivors)  # each kept its own and took more
        # the dead replica's symbols are forecast again, by their new owners
        flowing = await wait_grown(stack, stack.forecasts(), "forecasts after the takeover")

        # `up` again restores the scale: the killed replica rejoins and takes a share
        stack.up()
        assert inspect(docker, replicas[victim])["State"]["Running"]
        ports[victim] = stack.port(victim)
        restored = time.monotonic()
        final = await wait_for(lambda: shared_fairly(ports), READY_S, what="4 each again")
        rejoin_s = time.monotonic() - restored
        assert sorted(stack.lease_hosts()) == sorted(
            replicas[i] for i in replicas for _ in range(4)
        )
        await wait_grown(stack, flowing, "forecasts after the rejoin")

        # a clean stop: the replicas drain and exit 0 in their grace period; the replay stops
        # on the SIGTERM (143), not killed at the end of the grace period
        stopping = time.monotonic()
        stack("stop", timeout_s=180)
        stop_s = time.monotonic() - stopping
        exits = {
            cid: inspect(docker, cid)["State"]["ExitCode"] for cid in [*replicas.values(), redis]
        }
        assert exits == dict.fromkeys([*replicas.values(), redis], 0), stack.logs()
        assert inspect(docker, replay)["State"]["ExitCode"] == 143, stack.logs()
        assert stop_s < 30, f"stopped in {stop_s:.1f} s"
        print(
            f"ready in {ready_s:.0f} s; shares {_shares(shares)}; after the kill of replica "
            f"{victim} (partitions {sorted(shares[victim])}) the survivors held all 12 in "
            f"{takeover_s:.1f} s, {_shares(after)}; rejoined in {rejoin_s:.0f} s, "
            f"{_shares(final)}; stopped in {stop_s:.1f} s"
        )
    except BaseException:
        print(stack.logs())
        raise
    finally:
        stack("down", "--volumes", "--remove-orphans", timeout_s=180, check=False)
    assert not stack.containers("streamcast") and not stack.containers("redis")
    volumes = run(docker, "volume", "ls", "--quiet").stdout.split()
    assert f"{stack.project}_redis-data" not in volumes


def _shares(shares: dict[int, set[int]]) -> str:
    return ", ".join(f"#{i}: {sorted(p)}" for i, p in sorted(shares.items()))
