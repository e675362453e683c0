"""Holding the shard's lease while consuming: standing by, renewing, and a local deadline.

The lease itself (``streamcast.lease.Lease``) is a key in Redis; this keeps it. A replica that
stalled (a GC pause, a stopped container) past its lease may have lost it without hearing so,
so before every read and publish the daemon checks a local deadline (:meth:`LeaseKeeper.check`):
past it, the replica neither reads nor publishes until it holds the lease again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from redis import exceptions as redis_errors
from redis.asyncio import Redis

from streamcast.daemon.config import DaemonConfig
from streamcast.daemon.faults import REDIS_DOWN, LeaseLost
from streamcast.keys import Keys
from streamcast.lease import Lease
from streamcast.metrics import Metrics
from streamcast.tasks import within

log = logging.getLogger(__name__)


class LeaseKeeper:
    """One live consumer per group: ``hold`` (as a standby while another process holds it),
    ``keep_forever`` (renew), ``check`` (before reads and publishes), ``release``."""

    def __init__(
        self, redis: Redis, keys: Keys, group: str, config: DaemonConfig, metrics: Metrics
    ) -> None:
        ttl_ms = int(config.lease_ttl_s * 1000)
        self.lease = Lease(redis, keys.lease(group), config.consumer, ttl_ms)
        self.group = group
        self.metrics = metrics
        self.ttl_s = config.lease_ttl_s
        self.read_block_ms = config.read_block_ms
        self.held = False
        self.standby = False  # another live process consumes this shard; we wait to take over
        self._lost = False
        self._until = 0.0  # monotonic: past this, the lease may have lapsed unseen
        self._epoch = 0  # bumped at each acquisition: a renewal of an older one is void

    async def hold(self, stopping: asyncio.Event) -> bool:
        """Acquire the lease, waiting as a standby while another live process holds it; False
        if ``stopping`` was set meanwhile."""
        last_said = -1e9
        while not stopping.is_set():
            asked = time.monotonic()
            if await self.lease.acquire():
                self._epoch += 1
                self._until = asked + self._valid_s()
                self.held, self._lost = True, False
                if self.standby:
                    log.warning("took over %s: this replica consumes it now", self.group)
                self.standby = False
                self.metrics.standby.set(0)
                return True
            self.held = False
            holder = await self.lease.holder()
            if time.monotonic() - last_said >= 60.0:
                last_said = time.monotonic()
                log.warning(
                    "another process (%s) consumes %s with these settings: standing by, not "
                    "ready; this one takes over within %.0f s of that one stopping or dying",
                    holder,
                    self.group,
                    self.ttl_s,
                )
            self.standby = True
            self.metrics.standby.set(1)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), self.ttl_s / 3)
        return False

    def check(self) -> None:
        """Raise LeaseLost unless the lease is surely ours: before every read and publish, so a
        process that stalled past its lease neither reads nor publishes for the shard."""
        if self._lost or time.monotonic() > self._until:
            raise LeaseLost(f"the lease of {self.group} is lost or may have lapsed")

    def drop(self) -> None:
        """The consume loop gave the shard up (LeaseLost): hold again before consuming."""
        self.held = False

    async def keep_forever(self) -> None:
        """Renew the lease well inside its time to live; losing it stops publishing at once."""
        while True:
            await asyncio.sleep(self.ttl_s / 3)
            if self.held:
                await self._renew()

    async def release(self) -> None:
        """Give the lease up (at stop): a standby takes over at once, not after the TTL."""
        if self.held:
            with contextlib.suppress(Exception):
                # bounded even if the call swallows its cancellation (a reply that never comes)
                await within(self.lease.release(), 2.0)
            self.held = False

    async def _renew(self) -> None:
        epoch, asked = self._epoch, time.monotonic()
        try:
            kept = await self.lease.renew()
        except (*REDIS_DOWN, redis_errors.RedisError):
            return  # the consume loop sees the outage too; it rebuilds and re-acquires
        except Exception:
            log.exception("renewing the lease of %s failed", self.group)
            return
        if epoch != self._epoch:
            return  # re-acquired meanwhile: this renewal was of the old one
        if kept:
            self._until = asked + self._valid_s()
            return
        self.held, self._lost = False, True
        self.metrics.recoveries.labels("lease_lost").inc()
        log.error(
            "lost the lease of %s (another process holds it now, or it lapsed while this "
            "process stalled): reading and publishing nothing until it is held again",
            self.group,
        )

    def _valid_s(self) -> float:
        """How long after a renewal was asked for the lease is surely still ours: its time to
        live less a margin for a blocking read that started just before."""
        return self.ttl_s - min(self.ttl_s / 3, self.read_block_ms / 1000 + 0.5)
