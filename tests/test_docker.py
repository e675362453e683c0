"""The image, built and run under a real Docker engine: `serve` on the host network against a
private redis-server (healthy by its own HEALTHCHECK, forecasting, not root, `docker stop` exits 0
in the grace period) and `demo` with no network at all.

No image can be pulled here: deploy/docker/base-image.sh makes the base from Debian's packages
first (a real base image of that name is used as it is). The image is tagged by a hash of what
goes into it and rebuilt only when that changes (tests/dockerlib.py; the fixtures `docker` and
`image` are in tests/conftest.py). Skipped only where no engine can run: not root, or no dockerd
and no apt-get to install Debian's docker.io. The tests without a mark check, in a
moment, what the image leaves out: matplotlib (the `plots` extra) and tensorflow's CUDA kernels.
"""

from __future__ import annotations

import math
import os
import platform
import subprocess
import sys
import time

import pytest

from streamcast.demo import free_port
from streamcast.keys import Keys
from streamcast.replay import replay, symbol_names
from streamcast.wire import Forecast

from .dockerlib import BUILD_TIMEOUT_S, DOCKER_DIR, ROOT, inspect, run
from .helpers import feed, http_get, wait_for, wait_total

GRACE_S = 30  # docker stop's grace: over the daemon's 10 s shutdown timeout and TF's teardown
UID = 10001


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
    # the demo's embedded Redis, with Lua (lupa) for the publish script
    assert "fakeredis[lua]>=2.23" in lines
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
