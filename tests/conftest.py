from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

# the shared helpers assert too: rewritten, their failures show the values compared
pytest.register_assert_rewrite("tests.helpers", "tests.dockerlib")

# imported now, not first at the end of the run by its plugin's summary: on CPython 3.11.7 a
# RecursionError caught earlier in the run (hostile nested input) can make that late import's
# ast.parse fail with "AST constructor recursion depth mismatch" (CPython gh-106905)
import hypothesis  # noqa: E402, F401

from .dockerlib import answers, build_image  # noqa: E402  (after the rewrite is registered)
from .helpers import start_redis_server  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session", autouse=True)
def _private_model_cache(tmp_path_factory):
    """Registry versions fetched by tests (and the daemons they start) go to a temporary cache."""
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "sp500.csv").is_file():
        pytest.fail(f"the tutorial's data sets are expected in {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_model():
    """The tutorial's architecture at a small size, random weights, seeded."""
    from streamcast.model import ModelConfig, build_model

    return build_model(ModelConfig.from_sizes([1, 8, 16, 1]), seed=1)


@pytest.fixture(scope="session")
def default_model():
    """The tutorial's [1, 50, 100, 1] architecture, random weights, seeded."""
    from streamcast.model import build_model

    return build_model(seed=2)


@pytest.fixture(scope="session")
def shipped_engine():
    """The shipped model (streamcast/models/default) as an engine, loaded once for the run.

    Shared: a test that swaps weights into its engine, or closes it, loads its own.
    """
    from streamcast import Forecaster

    with Forecaster.load() as engine:
        yield engine


# -- Redis -------------------------------------------------------------------------------------


@pytest.fixture
def redis_server(tmp_path):
    """A private redis-server on a free port; never the one a user runs on 6379."""
    server = start_redis_server(tmp_path)
    yield server
    server.process.terminate()
    server.process.wait(10)


@pytest.fixture
async def redis_client(redis_server):
    from streamcast.connect import make_redis

    client = make_redis(redis_server.url)
    yield client
    await client.aclose()


# -- Docker (tests/test_docker.py, tests/test_compose.py; helpers in tests/dockerlib.py) ---------


@pytest.fixture(scope="session")
def docker(tmp_path_factory) -> Iterator[str]:
    """The docker client of an engine that answers; dockerd started here (and stopped at the end
    of the run) when none runs. Skipped only where no engine can run: not root, or no dockerd and
    no apt-get to install Debian's docker.io."""
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


@pytest.fixture(scope="session")
def image(docker: str, tmp_path_factory) -> str:
    """streamcast:test-HASH, built from this tree now unless an image of that tag exists (the
    first build downloads TensorFlow: minutes; a test using it is marked with dockerlib's
    BUILD_TIMEOUT_S)."""
    return build_image(docker, tmp_path_factory.mktemp("build") / "build.log")
