"""One live consumer per consumer group: a renewable lease in Redis.

Two processes reading one shard's group would split its ticks between them, and each would keep
half of every symbol's window: forecasts from wrong windows, ticks missing from history, and no
error anywhere. So a replica holds ``{prefix}:lease:{group}`` (SET NX PX, renewed well inside its
time to live) while it consumes, and a second process with the same settings waits as a standby,
loudly, and takes over when the holder dies or stops.

The holder's token is its consumer name, ``{base}:{host}:{pid}:{random}``, unique per process;
``host`` is the host name with a short hash of the boot id and the pid namespace, so two
containers sharing a host name (host networking) or two cloned machines never look like one. A
lease left by a process of this host and pid namespace that no longer runs (kill -9, then a
restart) is taken at once rather than after its time to live.

Plain commands and WATCH transactions only (no Lua), so the embedded demo server supports it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import socket
from typing import Any

from redis import exceptions as redis_errors
from redis.asyncio import Redis

from streamcast.wire import text

log = logging.getLogger(__name__)


def host_identity() -> str:
    """This host and pid namespace: the host name and a hash of the boot id and the namespace."""
    name = "".join(c if c.isalnum() or c in "._-" else "-" for c in socket.gethostname())[:32]
    marks = []
    for path in ("/proc/sys/kernel/random/boot_id", "/proc/self/ns/pid"):
        try:
            if path.endswith("/pid"):
                marks.append(os.readlink(path))
            else:
                with open(path) as file:
                    marks.append(file.read().strip())
        except OSError:
            marks.append("")
    digest = hashlib.sha256("|".join(marks).encode()).hexdigest()[:6]
    return f"{name or 'host'}-{digest}"


def consumer_token(base: str) -> str:
    """A consumer name unique to this process: ``base:host:pid:random``."""
    return f"{base}:{host_identity()}:{os.getpid()}:{secrets.token_hex(3)}"


def holder_is_dead(token: str, *, host: str | None = None) -> bool:
    """Whether ``token`` names a process of this host and pid namespace that is gone."""
    parts = token.rsplit(":", 3)
    if len(parts) != 4 or not parts[2].isdigit():
        return False
    _, holder_host, holder_pid, _ = parts
    if holder_host != (host_identity() if host is None else host):
        return False
    holder = int(holder_pid)
    if holder == os.getpid():
        return False  # our own pid in our own namespace: that token is this process's
    try:
        os.kill(holder, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, another user's
    return False


def _text(value: Any) -> str | None:
    return None if value is None else text(value)


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
        if await self._swap(self.token):
            return True
        # redis-py reports a connection lost under WATCH as a WatchError: look again (an
        # outage raises here), so a blip is not taken for a lost lease
        return await self.holder() == self.token and await self._swap(self.token)

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
