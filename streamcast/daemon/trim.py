"""Trimming the partition streams this replica owns to what some consumer group still needs."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from redis import exceptions as redis_errors
from redis.asyncio import Redis

from streamcast.daemon.faults import REDIS_DOWN
from streamcast.keys import Keys
from streamcast.metrics import Metrics
from streamcast.wire import id_key, text

log = logging.getLogger(__name__)


class Trimmer:
    """Deletes the ticks every consumer group of a partition stream has acknowledged, and only
    those, on the partitions this replica owns."""

    def __init__(self, redis: Redis, keys: Keys, metrics: Metrics) -> None:
        self.redis = redis
        self.keys = keys
        self.metrics = metrics
        self.rounds = 0  # times the trim ran (what it removed is in the metrics)

    async def run_forever(
        self, interval_s: float, redis_ok: Callable[[], bool], owned: Callable[[], list[int]]
    ) -> None:
        while True:
            await asyncio.sleep(interval_s)
            if not redis_ok():
                continue
            try:
                for partition in owned():
                    await self.trim(partition)
                self.rounds += 1
            except (*REDIS_DOWN, redis_errors.ResponseError) as exc:
                log.debug("trimming the ticks streams: %s", exc)

    async def trim(self, partition: int) -> None:
        """XTRIM MINID (approximate: never past the bound) to the oldest entry still pending in
        some group, or the first after what some group has read. If the forecasters' group is
        missing (not created yet, or destroyed and about to be recreated) its acknowledged mark
        bounds it, and it stops when there is none."""
        ticks = self.keys.ticks(partition)
        floor, present = await self._groups_floor(ticks)
        if self.keys.group not in present:
            mark = await self.redis.get(self.keys.acked(partition))
            try:
                acked = id_key(text(mark or ""))
            except ValueError:
                return  # none, or junk (a hand-made mark): nothing is known acknowledged
            floor = _lower(floor, (acked[0], acked[1] + 1))
        if floor is None or floor <= (0, 1):
            return
        trimmed = await self.redis.xtrim(ticks, minid=f"{floor[0]}-{floor[1]}", approximate=True)
        if trimmed:
            self.metrics.ticks_trimmed.inc(int(trimmed))

    async def _groups_floor(self, ticks: str) -> tuple[tuple[int, int] | None, set[str]]:
        """The oldest id some present group still needs, and the names of the groups present."""
        floor: tuple[int, int] | None = None
        present = set()
        for group in await self.redis.xinfo_groups(ticks):
            name = text(group.get("name", b""))
            present.add(name)
            last = id_key(text(group.get("last-delivered-id", b"0-0")))
            need = (last[0], last[1] + 1)
            if int(group.get("pending", 0) or 0):
                summary = await self.redis.xpending(ticks, name)
                lowest = summary.get("min") if isinstance(summary, dict) else None
                if lowest:
                    need = min(need, id_key(text(lowest)))
            floor = _lower(floor, need)
        return floor, present


def _lower(a: tuple[int, int] | None, b: tuple[int, int]) -> tuple[int, int]:
    return b if a is None else min(a, b)
