"""The Redis client every part of streamcast uses."""

from __future__ import annotations

from typing import Any

from redis import exceptions as redis_errors
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff


def make_redis(url: str, timeout_s: float = 5.0, *, retries: int = 3, **kwargs: Any) -> Redis:
    """A client with the protocol pinned (redis-py 8 changed its default) and retry/backoff
    (``retries=0``: none, for the publish transaction, which must not run twice)."""
    return Redis.from_url(
        url,
        protocol=2,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(ExponentialBackoff(cap=2.0, base=0.05), retries=retries),
        retry_on_error=[redis_errors.ConnectionError, redis_errors.TimeoutError],
        health_check_interval=30,
        **kwargs,
    )
