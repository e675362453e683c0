"""The Redis client every part of streamcast uses: one server, or any node of a Redis Cluster.

``make_redis`` returns a ``redis.asyncio.Redis`` for one server and a
``redis.asyncio.cluster.RedisCluster`` (which follows MOVED and ASK) when the URL names a node of
a cluster. Both speak the same commands; what differs is that a command or transaction may touch
keys of one slot only, which streamcast's key layout (streamcast.keys) guarantees for every write
it makes. Code that must read several partitions at once asks :func:`is_cluster`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable
from typing import Any, TypeVar, cast

import redis
from redis import exceptions as redis_errors
from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterPipeline, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

log = logging.getLogger(__name__)
T = TypeVar("T")

# the connection is down or slow, or a Redis Cluster is moving slots (redis-py gives up
# following redirections with a ClusterError, "TTL exhausted"; no node answering is a
# ConnectionError from ClusterClient): back off and retry, nothing is wrong with the data
REDIS_DOWN = (
    redis_errors.ConnectionError,
    redis_errors.TimeoutError,
    redis_errors.ClusterError,
    OSError,
)


def make_redis(
    url: str,
    timeout_s: float = 5.0,
    *,
    retries: int = 3,
    cluster: bool | None = None,
    **kwargs: Any,
) -> Redis:
    """A client with the protocol pinned (redis-py 8 changed its default) and retry/backoff
    (``retries=0``: none, for the publish transaction, which must not run twice).

    ``cluster``: None asks the server (``INFO cluster``) whether it is a cluster node; a server
    that cannot be reached is taken for a single server, so name it (``cluster=True``,
    ``STREAMCAST_REDIS_CLUSTER=true``) where a cluster may be down when a process starts.
    """
    if cluster is None:
        cluster = cluster_enabled(url, timeout_s)
    options: dict[str, Any] = {
        "protocol": 2,
        "socket_timeout": timeout_s,
        "socket_connect_timeout": timeout_s,
        "retry": Retry(ExponentialBackoff(cap=2.0, base=0.05), retries=retries),
        "retry_on_error": [redis_errors.ConnectionError, redis_errors.TimeoutError],
        "health_check_interval": 30,
        **kwargs,
    }
    if cluster:
        url = _without_db(url)  # a cluster has database 0 only
        # typed as Redis: the cluster client has the same command methods (a structural twin)
        return cast(Redis, ClusterClient.from_url(url, **options))
    return Redis.from_url(url, **options)


REDIS_PY = os.path.dirname(redis.__file__) + os.sep


def inside_redis_py(exc: BaseException) -> bool:
    """Whether ``exc`` was raised in redis-py's own code (its innermost frame)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_code.co_filename.startswith(REDIS_PY)


def cluster_outage(exc: BaseException) -> redis_errors.ConnectionError | None:
    """The lost connection ``exc`` stands for, where redis-py's cluster client says it otherwise.

    - An AttributeError in redis-py's own code: reconnecting lazily after a node failed or a
      slot moved, it can close a connection while another call is opening it, and that call
      fails on the closed connection's writer (None).
    - RedisClusterException "Redis Cluster cannot be connected" (no node it knows answers) and
      SlotNotCoveredError: not RedisErrors. Its other RedisClusterExceptions (keys of two slots
      in one command, say) are the caller's mistakes, bugs, and stay what they are.
    """
    if isinstance(exc, AttributeError) and inside_redis_py(exc):
        return redis_errors.ConnectionError(f"connection closed under the call ({exc})")
    if isinstance(exc, redis_errors.SlotNotCoveredError) or (
        type(exc) is redis_errors.RedisClusterException and "cannot be connected" in str(exc)
    ):
        return redis_errors.ConnectionError(f"no Redis Cluster node answers ({exc})")
    return None


async def _outages_said(call: Awaitable[T]) -> T:
    try:
        return await call
    except (AttributeError, redis_errors.RedisClusterException) as exc:
        lost = cluster_outage(exc)
        if lost is None:
            raise
        raise lost from exc


class ClusterClient(RedisCluster):
    """redis-py's cluster client, its outages said as lost connections (:func:`cluster_outage`)
    in every command, pipeline and transaction, so that whoever handles ConnectionError
    (REDIS_DOWN) backs off and retries instead of taking them for bugs."""

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        return await _outages_said(super().execute_command(*args, **kwargs))

    def pipeline(
        self, transaction: Any | None = None, shard_hint: Any | None = None
    ) -> ClusterPipeline:
        if shard_hint:
            return super().pipeline(transaction, shard_hint)  # which refuses it
        return ClusterClientPipeline(self, transaction)  # type: ignore[abstract]  # as redis-py does


class ClusterClientPipeline(ClusterPipeline):
    """The pipeline of :class:`ClusterClient`: its execute, and a transaction's WATCH and the
    commands run at once after it, say outages as lost connections too."""

    async def execute(self, raise_on_error: bool = True, allow_redirections: bool = True) -> Any:
        return await _outages_said(super().execute(raise_on_error, allow_redirections))

    async def watch(self, *names: Any) -> None:  # type: ignore[override]  # as redis-py's
        await _outages_said(super().watch(*names))

    def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        queued = super().execute_command(*args, **kwargs)
        # queued: the pipeline (itself awaitable); after WATCH a command runs at once: its call
        return queued if queued is self else _outages_said(queued)


def outage_behind(exc: redis_errors.WatchError) -> None:
    """redis-py reports a connection lost while watching (Redis died or restarted between WATCH
    and EXEC) as a WatchError raised while handling the connection error: that is an outage
    (back off, retry), not a watched key that changed. Raises it as one; returns otherwise."""
    if isinstance(exc.__context__, redis_errors.ConnectionError | redis_errors.TimeoutError):
        raise redis_errors.ConnectionError(f"connection lost while watching ({exc})") from exc


def is_cluster(client: Any) -> bool:
    return isinstance(client, RedisCluster)


def cluster_enabled(url: str, timeout_s: float = 5.0) -> bool:
    """Whether the server at ``url`` is a Redis Cluster node (False if it cannot be reached)."""
    wait_s = min(timeout_s, 2.0)
    probe = redis.Redis.from_url(
        _without_db(url), socket_timeout=wait_s, socket_connect_timeout=wait_s
    )
    try:
        info = probe.info("cluster")
        return bool(int(info.get("cluster_enabled", 0) or 0))
    except redis_errors.ResponseError:
        return False  # a server that does not know INFO cluster is not one
    except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError) as exc:
        log.warning(
            "could not ask %s whether it is a cluster node (%s): taking it for a single "
            "server; set STREAMCAST_REDIS_CLUSTER=true for a cluster",
            url.split("@")[-1],
            type(exc).__name__,
        )
        return False
    finally:
        probe.close()


def _without_db(url: str) -> str:
    head, sep, query = url.partition("?")
    scheme, rest = head.split("://", 1)
    host, _, _ = rest.partition("/")
    return f"{scheme}://{host}" + (sep + query if sep else "")
