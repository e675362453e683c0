"""Trimming the ticks stream to what some consumer group still needs."""

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
    """Deletes the ticks every consumer group of the stream has acknowledged, and only those."""

    def __init__(self, redis: Redis, keys: Keys, shard_count: int, metrics: Metrics) -> None:
        self.redis = redis
        self.keys = keys
        self.shard_count = shard_count
        self.metrics = metrics
        self.rounds = 0  # times the trim ran (what it removed is in the metrics)

    async def run_forever(self, interval_s: float, redis_ok: Callable[[], bool]) -> None:
        while True:
            await asyncio.sleep(interval_s)
            if not redis_ok():
                continue
            try:
                await self.trim()
            except (*REDIS_DOWN, redis_errors.ResponseError) as exc:
                log.debug("trimming the ticks stream: %s", exc)

    async def trim(self) -> None:
        """XTRIM MINID (approximate: never past the bound) to the oldest entry still pending in
        some group, or the first after what some group has read. A shard group of this
        deployment that is missing (not created yet, or destroyed and about to be recreated)
        bounds it by its acknowledged mark, and stops it when it has none."""
        self.rounds += 1
        floor = await self._groups_floor()
        for shard in range(self.shard_count):
            name = self.keys.group(shard, self.shard_count)
            if name in floor[1]:
                continue
            mark = await self.redis.get(self.keys.acked(name))
            if not mark:
                return
            acked = id_key(text(mark))
            floor = (_lower(floor[0], (acked[0], acked[1] + 1)), floor[1])
        low = floor[0]
        if low is None or low <= (0, 1):
            return
        trimmed = await self.redis.xtrim(
            self.keys.ticks, minid=f"{low[0]}-{low[1]}", approximate=True
        )
        if trimmed:
            self.metrics.ticks_trimmed.inc(int(trimmed))

    async def _groups_floor(self) -> tuple[tuple[int, int] | None, set[str]]:
        """The oldest id some present group still needs, and the names of the groups present."""
        ticks = self.keys.ticks
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
