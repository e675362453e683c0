"""One live consumer per partition: a renewable lease in Redis.

Two processes reading one partition would split its ticks between them, and each would keep
half of every symbol's window: forecasts from wrong windows, ticks missing from history, and no
error anywhere. So a replica holds ``{prefix}:{p<n>}:lease`` (SET NX PX, renewed well inside its
time to live) while it consumes the partition, and another replica takes it over when the holder
dies or gives it up (streamcast.daemon.ownership shares the partitions out).

The holder's token is its consumer name, ``{base}:{host}:{pid}:{random}``, unique per process;
``host`` is the host name with a short hash of the boot id and the pid namespace, so two
containers sharing a host name (host networking) or two cloned machines never look like one. A
lease left by a process of this host and pid namespace that no longer runs (kill -9, then a
restart) is taken at once rather than after its time to live.

Plain commands and WATCH transactions only (no Lua). The publish script checks the same keys
(streamcast.daemon.sink: the fence).
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
        """The holder's token; None if the key is free or not a string (no holder's)."""
        try:
            return _text(await self.redis.get(self.key))
        except redis_errors.ResponseError as exc:
            if not _wrong_type(exc):
                raise
            return None

    async def acquire(self) -> bool:
        """Take the lease if it is free, ours, left by a dead process of this host, or not a
        lease at all (a key of another type, or one that never expires or outlasts any lease:
        no holder sets those, and they would keep the partition unconsumed)."""
        if await self.redis.set(self.key, self.token, nx=True, px=self.ttl_ms):
            return True
        holder, junk = await self._look()
        if holder == self.token:
            return await self.renew()
        if junk and await self._swap(holder, junk=True):
            log.warning(
                "took over the lease %s: it held %r of another type or without a lease's "
                "expiry, which no replica sets",
                self.key,
                (holder or "")[:80],
            )
            return True
        if holder is not None and holder_is_dead(holder) and await self._swap(holder):
            log.warning(
                "took over the lease %s from %s, which is no longer running", self.key, holder
            )
            return True
        return False

    async def _look(self) -> tuple[str | None, bool]:
        """The holder's token, and whether the key is no lease (:func:`_not_a_lease`)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.get(self.key)
        pipe.pttl(self.key)
        value, ttl = await pipe.execute(raise_on_error=False)
        if isinstance(value, Exception):
            if not _wrong_type(value):
                raise value
            return None, True
        return _text(value), value is not None and _lasting(ttl)

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

    async def _swap(self, expected: str | None, *, junk: bool = False) -> bool:
        """Set the lease to our token for ttl_ms if it holds ``expected`` now (with ``junk``: if
        it is not a lease, see :func:`_not_a_lease`), atomically."""
        async with self.redis.pipeline(transaction=True) as pipe:
            try:
                await pipe.watch(self.key)
                if junk:
                    same = await _not_a_lease(pipe, self.key)
                else:
                    same = _text(await pipe.get(self.key)) == expected
                if not same:
                    await pipe.unwatch()
                    return False
                pipe.multi()
                pipe.set(self.key, self.token, px=self.ttl_ms)
                await pipe.execute()
                return True
            except redis_errors.WatchError:
                return False
            except redis_errors.ResponseError as exc:
                if not _wrong_type(exc):
                    raise
                return False  # a key of another type: not ours


def _wrong_type(exc: Exception) -> bool:
    return "WRONGTYPE" in str(exc)


# longer than any replica's lease (or membership) lasts, whatever its settings (STREAMCAST_
# LEASE_TTL_S is at most 300 s), twice over, by Redis's clock: what outlasts it was written by hand
LONGEST_MS = 600_000


def _lasting(pttl: int) -> bool:
    return pttl == -1 or pttl > LONGEST_MS


async def _not_a_lease(client: Any, key: str) -> bool:
    """Whether ``key`` exists but is no lease: of another type than a string, or without expiry
    or lasting longer than any holder sets (``LONGEST_MS``), so it would keep its partition
    unconsumed for ever, or for hours."""
    kind = _text(await client.type(key))
    if kind == "string":
        return _lasting(await client.pttl(key))
    return kind != "none"
