"""The image, built and run under a real Docker engine: `serve` on the host network against a
private redis-server (healthy by its own HEALTHCHECK, forecasting, not root, `docker stop` exits 0
in the grace period) and `demo` with no network at all.

No image can be pulled here: deploy/docker/base-image.sh makes the base from Debian's packages
first (a real base image of that name is used as it is). The image is tagged by a hash of what
goes into it and rebuilt only when that changes. Skipped only where no engine can run: not root,
or no dockerd and no apt-get to install Debian's docker.io. The tests without a mark check, in a
moment, what the image leaves out: matplotlib (the `plots` extra) and tensorflow's CUDA kernels.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from streamcast.demo import free_port
from streamcast.keys import Keys
from streamcast.replay import replay, symbol_names
from streamcast.wire import Forecast

from .helpers import feed, http_get, wait_for, wait_total

ROOT = Path(__file__).resolve().parents[1]
DOCKER_DIR = ROOT / "deploy" / "docker"
# what goes into the image (the build context of .dockerignore, and the base's recipe)
INPUTS = ("Dockerfile", ".dockerignore", "pyproject.toml", "README.md", "deploy/docker")
REPOSITORY = "streamcast"
TAG_PREFIX = "test-"
GRACE_S = 30  # docker stop's grace: over the daemon's 10 s shutdown timeout and TF's teardown
UID = 10001

# the first build downloads TensorFlow: minutes, over the suite's per-test timeout
BUILD_TIMEOUT_S = 1800


def run(*args: str, timeout_s: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(args, capture_output=True, text=True, timeout=timeout_s)
    if check:
        assert out.returncode == 0, f"{' '.join(args)}: exit {out.returncode}\n{out.stderr[-3000:]}"
    return out


def answers(docker: str) -> bool:
    return run(docker, "info", timeout_s=30, check=False).returncode == 0


@pytest.fixture(scope="module")
def docker(tmp_path_factory) -> Iterator[str]:
    """The docker client of an engine that answers; dockerd started here (and stopped after the
    module) when none runs."""
    client = shutil.which("docker")
    if client is not None and answers(client):
        yield client
        return
    if os.geteuid() != 0:
        pytest.skip("no Docker engine answers, and only root can start dockerd")
    if shutil.which("dockerd") is None or client is None:
        if shutil.which("apt-get") is None:
            pytest.skip("no dockerd, and no apt-get to install Debian's docker.io")
        pytest.fail("dockerd is not installed (apt-get install -y docker.io; .ci/run does it)")
    log_path = tmp_path_factory.mktemp("dockerd") / "dockerd.log"
    with open(log_path, "w") as log:
        daemon = subprocess.Popen(
            ["dockerd"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 90
        while not answers(client):
            tail = log_path.read_text()[-3000:]
            assert daemon.poll() is None, f"dockerd exited {daemon.returncode}:\n{tail}"
            assert time.monotonic() < deadline, f"dockerd did not answer in 90 s:\n{tail}"
            time.sleep(0.5)
        yield client
    finally:
        daemon.terminate()
        try:
            daemon.wait(60)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait(10)


def source_hash(base_id: str) -> str:
    """A hash of the base image and of every file the image is built from."""
    digest = hashlib.sha256(base_id.encode())
    for path in (ROOT / p for p in (*INPUTS, "streamcast")):
        for file in sorted(path.rglob("*")) if path.is_dir() else [path]:
            if file.is_file() and "__pycache__" not in file.parts:
                digest.update(str(file.relative_to(ROOT)).encode() + b"\0")
                digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


@pytest.fixture(scope="module")
def image(docker: str, tmp_path_factory) -> str:
    """streamcast:test-HASH, built now unless an image of that tag exists."""
    base = run(str(DOCKER_DIR / "base-image.sh"), timeout_s=900)  # no-op when up to date
    from_line = next(
        line for line in (ROOT / "Dockerfile").read_text().splitlines() if line.startswith("FROM ")
    )
    base_id = run(docker, "image", "inspect", "-f", "{{.Id}}", from_line.split()[1]).stdout
    tag = f"{REPOSITORY}:{TAG_PREFIX}{source_hash(base_id.strip())}"
    if run(docker, "image", "inspect", tag, check=False).returncode == 0:
        return tag
    log_path = tmp_path_factory.mktemp("build") / "build.log"
    with open(log_path, "w") as log:
        # the legacy builder: no buildx plugin needed, and --network host for pip's registry
        built = subprocess.run(
            [docker, "build", "--network", "host", "-t", tag, str(ROOT)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "DOCKER_BUILDKIT": "0"},
            timeout=BUILD_TIMEOUT_S - 300,
        )
    assert built.returncode == 0, f"{base.stdout}\ndocker build:\n{log_path.read_text()[-4000:]}"
    # earlier test builds: their layers under this one's are kept, the rest freed
    tags = run(docker, "image", "ls", REPOSITORY, "--format", "{{.Tag}}").stdout.split()
    stale = [f"{REPOSITORY}:{t}" for t in tags if t.startswith(TAG_PREFIX)]
    stale.remove(tag)
    if stale:
        run(docker, "image", "rm", *stale, check=False)
    return tag


def inspect(docker: str, container: str) -> dict:
    return json.loads(run(docker, "inspect", container).stdout)[0]


@pytest.mark.parametrize(
    ("variant", "tensorflow"),
    [("cpu", "tensorflow-cpu>=2.16; platform_machine == 'x86_64'"), ("gpu", "tensorflow>=2.16")],
)
def test_image_requirements_swap_in_the_cpu_wheel_and_leave_out_plots(variant, tensorflow):
    script = DOCKER_DIR / "requirements.py"
    out = subprocess.run(
        [sys.executable, str(script), variant, str(ROOT / "pyproject.toml")],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    lines = out.stdout.splitlines()
    assert tensorflow in lines
    assert not any(line.startswith("matplotlib") for line in lines)
    assert "fakeredis>=2.23" in lines  # the demo's embedded Redis
    if variant == "cpu":
        # elsewhere the plain wheel, never both
        assert "tensorflow>=2.16; platform_machine != 'x86_64'" in lines
    else:
        assert "tensorflow[and-cuda]>=2.16" in lines


def test_evaluate_without_matplotlib_names_the_plots_extra(tmp_path):
    """As in the image: one line saying what to install, no traceback, exit 2, nothing written."""
    data = tmp_path / "prices.csv"
    data.write_text("\n".join(f"{100 + math.sin(i / 10):.6f}" for i in range(600)) + "\n")
    code = (
        "import sys; sys.modules['matplotlib'] = None\n"  # makes `import matplotlib` fail
        "from streamcast.cli import main\n"
        f"sys.exit(main(['evaluate', '--data', {str(data)!r}, '--mode', 'point', "
        f"'--out', {str(tmp_path / 'out')!r}]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines()[-1] == (
        "streamcast evaluate: error: the figures need matplotlib: pip install 'streamcast[plots]'"
    )
    assert "Traceback" not in out.stderr and not (tmp_path / "out").exists()


@pytest.mark.docker
@pytest.mark.timeout(BUILD_TIMEOUT_S)
async def test_image_serves_forecasts_healthy_as_non_root_and_stops_with_0(
    docker, image, redis_server, redis_client, tmp_path
):
    port, name = free_port(), f"streamcast-test-{os.getpid()}-{time.monotonic_ns()}"
    # fmt: off
    run(
        docker, "run", "--detach", "--name", name, "--network", "host",
        "--stop-timeout", str(GRACE_S),
        "-e", f"STREAMCAST_REDIS_URL={redis_server.url}",
        "-e", f"STREAMCAST_HTTP_PORT={port}",
        "-e", "STREAMCAST_KEY_PREFIX=docker",
        image, "serve",
    )
    # fmt: on
    try:

        def logs() -> str:
            out = run(docker, "logs", name, check=False)
            return (out.stdout + out.stderr)[-4000:]

        def healthy() -> bool:
            state = inspect(docker, name)["State"]
            assert state["Running"], f"the container exited {state['ExitCode']}: {logs()}"
            return state["Health"]["Status"] == "healthy"

        # the image's own check: a 15 s interval after loading and compiling the model
        await wait_for(healthy, 240, what="the HEALTHCHECK reporting healthy", interval_s=1)
        assert http_get(port, "/readyz")[0] == 200  # on the host's network

        keys, names, paths = Keys("docker"), ["D0", "D1"], feed(2, 120)
        await replay(redis_client, keys, paths, names, rate=None)
        await wait_total(redis_client, keys, names, 2 * (120 - 49))
        for name_, prices in zip(names, paths, strict=True):
            entries = await redis_client.xrange(keys.forecasts(name_))
            forecasts = [Forecast.decode(fields) for _, fields in entries]
            assert [f.tick.price for f in forecasts] == pytest.approx(prices[49:].tolist())
            for f in forecasts:
                assert f.next is not None and math.isfinite(f.next) and f.model
                assert abs(f.next / f.tick.price - 1) < 0.2, f  # a price, not a normalised value

        # the process is not root: its uid and gid, and the image's user
        status = run(docker, "exec", name, "cat", "/proc/1/status").stdout
        ids = {line.split(":")[0]: line.split()[1:] for line in status.splitlines()}
        assert ids["Uid"] == [str(UID)] * 4 and ids["Gid"] == [str(UID)] * 4
        assert inspect(docker, name)["Config"]["User"] == "streamcast"
        # what the image leaves out to be smaller
        probe = "import importlib.util as u, importlib.metadata as m; "
        probe += "print(u.find_spec('matplotlib') is None, m.version('tensorflow-cpu'))"
        if platform.machine() == "x86_64":
            out = run(docker, "exec", name, "python", "-c", probe).stdout.split()
            assert out[0] == "True" and out[1][:1] == "2"

        started = time.monotonic()
        run(docker, "stop", name, timeout_s=GRACE_S + 30)
        stopped_s = time.monotonic() - started
        state = inspect(docker, name)["State"]
        log = logs()
        assert state["ExitCode"] == 0 and not state["OOMKilled"], log
        assert stopped_s < GRACE_S, f"stopped in {stopped_s:.1f} s"
        assert "SIGTERM: stopping" in log and "stopped: " in log and "Traceback" not in log
    finally:
        run(docker, "rm", "--force", name, check=False)


@pytest.mark.docker
@pytest.mark.timeout(BUILD_TIMEOUT_S)
def test_image_runs_the_demo_with_no_network_and_no_server(docker, image):
    name = f"streamcast-demo-{os.getpid()}-{time.monotonic_ns()}"
    try:
        out = run(
            docker, "run", "--name", name, "--network", "none", image, "demo", "--seconds", "20",
            timeout_s=300,
        )  # fmt: skip
    finally:
        run(docker, "rm", "--force", name, check=False)
    assert "demo: embedded redis at" in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]
    assert "Traceback" not in out.stdout + out.stderr
    # a line a forecast, for each of the demo's 8 symbols
    forecast = {line.split()[0] for line in out.stdout.splitlines() if " next " in line}
    assert forecast == set(symbol_names("SYN", 8)), out.stdout[-2000:]
