from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

# the shared helpers assert too: rewritten, their failures show the values compared
pytest.register_assert_rewrite("tests.helpers")

# imported now, not first at the end of the run by its plugin's summary: on CPython 3.11.7 a
# RecursionError caught earlier in the run (hostile nested input) can make that late import's
# ast.parse fail with "AST constructor recursion depth mismatch" (CPython gh-106905)
import hypothesis  # noqa: E402, F401

from .helpers import start_redis_server  # noqa: E402  (after the rewrite is registered)

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
