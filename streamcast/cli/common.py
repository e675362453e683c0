"""What every command shares: the user's errors, TensorFlow's start-up lines, argument types,
the settings."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class UserError(Exception):
    """A problem the user can fix; printed as one line, no traceback, exit status 2."""


def _tensorflow_logging(verbose: bool) -> None:
    """Before anything imports TensorFlow: its C++ log level, everything with ``-v``.

    Without ``-v`` TensorFlow's own lines (oneDNN, CUDA probing on machines without a GPU) are
    noise: our log says which device runs. A user who sets the variable keeps their choice.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if verbose else "3")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")


def _quiet_tensorflow() -> None:
    """Import TensorFlow, its start-up lines silenced unless TF_CPP_MIN_LOG_LEVEL is 0 (``-v``).

    TensorFlow writes them to file descriptor 2 before its log level applies (they come before
    absl::InitializeLog), so only pointing that descriptor elsewhere for the import stops them.
    """
    if "tensorflow" in sys.modules or os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0") == "0":
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        import tensorflow  # noqa: F401
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return value


def _layers(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected sizes like 1,50,100,1, got {text!r}") from None
    return sizes


def _settings(**overrides: Any) -> Any:
    from streamcast.settings import SettingsError, load_settings

    try:
        return load_settings(**overrides)
    except SettingsError as exc:
        raise UserError(str(exc)) from None


def _with_redis(settings: Any, work: Callable[[Any], Any]) -> Any:
    """Run ``await work(redis)`` with a checked connection from the settings, then close it."""
    import asyncio

    from streamcast.connect import make_redis
    from streamcast.settings import build

    async def run() -> Any:
        # STREAMCAST_REDIS_CLUSTER applies: the URL may name any node of a Redis Cluster
        redis = build(make_redis, settings, "redis_")
        try:
            await _check_redis(redis, settings.redis_url_redacted)
            return await work(redis)
        finally:
            await redis.aclose()

    return asyncio.run(run())


async def _check_redis(redis: Any, shown_url: str) -> None:
    from redis import exceptions

    try:
        await redis.ping()
    except exceptions.AuthenticationError:
        raise UserError(f"redis at {shown_url} refused the credentials") from None
    except exceptions.ResponseError as exc:
        raise UserError(f"redis at {shown_url}: {exc}") from None
    except (exceptions.ConnectionError, exceptions.TimeoutError, OSError) as exc:
        raise UserError(f"cannot reach redis at {shown_url} ({exc})") from None
    except exceptions.RedisClusterException as exc:  # not a RedisError (no node: ConnectionError)
        raise UserError(f"redis cluster at {shown_url}: {exc}") from None
