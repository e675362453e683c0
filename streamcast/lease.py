"""One live consumer per consumer group: a renewable lease in Redis.

Two processes reading one shard's group would split its ticks between them, and each would keep
half of every symbol's window: forecasts from wrong windows, ticks missing from history, and no
error anywhere. So a replica holds ``{prefix}:lease:{group}`` (SET NX PX, renewed well inside its
time to live) while it consumes, and a second process with the same settings waits as a standby,
loudly, and takes over when the holder dies or stops.

The holder's token is its consumer name, ``{base}:{host}:{pid}:{random}``, unique per process. A
lease left by a process of this host that no longer runs (kill -9, then a restart) is taken at
once rather than after its time to live; so is one left by this very pid (a container restarted
with the same hostname and pid 1).

Plain commands and WATCH transactions only (no Lua), so the embedded demo server supports it.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
from typing import Any

from redis import exceptions as redis_errors
from redis.asyncio import Redis

log = logging.getLogger(__name__)


def consumer_token(base: str) -> str:
    """A consumer name unique to this process: ``base:host:pid:random``."""
    host = "".join(c if c.isalnum() or c in "._-" else "-" for c in socket.gethostname())[:40]
    return f"{base}:{host or 'host'}:{os.getpid()}:{secrets.token_hex(3)}"


def holder_is_dead(token: str, *, host: str | None = None, pid: int | None = None) -> bool:
    """Whether ``token`` names a process of this host that is gone (or was this pid before)."""
    parts = token.rsplit(":", 3)
    if len(parts) != 4 or not parts[2].isdigit():
        return False
    _, holder_host, holder_pid, _ = parts
    mine = consumer_token("x").rsplit(":", 3)[1] if host is None else host
    if holder_host != mine:
        return False
    holder = int(holder_pid)
    if holder == (os.getpid() if pid is None else pid):
        return True  # a previous process with our pid: this one restarted in its container
    try:
        os.kill(holder, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, another user's
    return False


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


class Lease:
    """``acquire`` / ``renew`` / ``release`` a key held by ``token`` for ``ttl_ms``."""

    def __init__(self, redis: Redis, key: str, token: str, ttl_ms: int) -> None:
        self.redis = redis
        self.key = key
        self.token = token
        self.ttl_ms = ttl_ms

    async def holder(self) -> str | None:
        return _text(await self.redis.get(self.key))

    async def acquire(self) -> bool:
        """Take the lease if it is free, ours, or left by a dead process of this host."""
        if await self.redis.set(self.key, self.token, nx=True, px=self.ttl_ms):
            return True
        holder = await self.holder()
        if holder == self.token:
            return await self.renew()
        if holder is not None and holder_is_dead(holder) and await self._swap(holder):
            log.warning(
                "took over the lease %s from %s, which is no longer running", self.key, holder
            )
            return True
        return False

    async def renew(self) -> bool:
        """Extend the lease; False if another process holds it now (or it lapsed)."""
        return await self._swap(self.token)

    async def release(self) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            try:
                await pipe.watch(self.key)
                if _text(await pipe.get(self.key)) == self.token:
                    pipe.multi()
                    pipe.delete(self.key)
                    await pipe.execute()
            except redis_errors.WatchError:
                pass

    async def _swap(self, expected: str) -> bool:
        """Set the lease to our token for ttl_ms if it holds ``expected`` now (atomically)."""
        async with self.redis.pipeline(transaction=True) as pipe:
            try:
                await pipe.watch(self.key)
                if _text(await pipe.get(self.key)) != expected:
                    await pipe.unwatch()
                    return False
                pipe.multi()
                pipe.set(self.key, self.token, px=self.ttl_ms)
                await pipe.execute()
                return True
            except redis_errors.WatchError:
                return False
