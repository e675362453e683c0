from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

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


# -- Redis -------------------------------------------------------------------------------------

import shutil  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402

from streamcast.demo import free_port  # noqa: E402


@dataclass
class RedisServer:
    port: int
    process: subprocess.Popen
    directory: Path

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


def start_redis_server(directory: Path, *extra: str, port: int | None = None) -> RedisServer:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail(
            "redis-server is not installed (apt-get install -y redis-server; .ci/run does it)"
        )
    port = port or free_port()
    process = subprocess.Popen(
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
            str(directory),
            *extra,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(64).startswith((b"+PONG", b"-NOAUTH")):
                    return RedisServer(port, process, directory)
        except OSError:
            time.sleep(0.02)
    process.kill()
    pytest.fail(f"redis-server did not start on port {port}")


@pytest.fixture
def redis_server(tmp_path):
    """A private redis-server on a free port; never the one a user runs on 6379."""
    server = start_redis_server(tmp_path)
    yield server
    server.process.terminate()
    server.process.wait(10)


@pytest.fixture
async def redis_client(redis_server):
    from streamcast.service import make_redis

    client = make_redis(redis_server.url)
    yield client
    await client.aclose()
