"""Redis key names, all under one configurable prefix so deployments can share a server."""

from __future__ import annotations

import zlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Keys:
    prefix: str = "streamcast"

    @property
    def ticks(self) -> str:
        return f"{self.prefix}:ticks"

    @property
    def dead(self) -> str:
        return f"{self.prefix}:dead"

    @property
    def symbols(self) -> str:
        """A set of every symbol that has history (to rebuild windows on start)."""
        return f"{self.prefix}:symbols"

    def forecasts(self, symbol: str) -> str:
        return f"{self.prefix}:forecasts:{symbol}"

    def history(self, symbol: str) -> str:
        return f"{self.prefix}:history:{symbol}"

    # -- the model registry (streamcast.registry) ---------------------------------------------

    def model(self, version: str) -> str:
        """A hash: the ``.keras`` bytes, the sidecar JSON and the sha256 of one version."""
        return f"{self.prefix}:model:{version}"

    @property
    def models(self) -> str:
        """A sorted set of every registered version, scored by registration time (ms)."""
        return f"{self.prefix}:models"

    @property
    def model_current(self) -> str:
        """A hash: the version serving, when and why it was promoted."""
        return f"{self.prefix}:models:current"

    @property
    def model_promotions(self) -> str:
        """A list of promoted versions, newest first (``models rollback`` pops it)."""
        return f"{self.prefix}:models:promotions"

    @property
    def model_log(self) -> str:
        """A stream of registry events: retrain outcomes with scores, promotions, rollbacks."""
        return f"{self.prefix}:models:log"

    @property
    def model_channel(self) -> str:
        """Pub/sub channel announcing a new current version to every replica."""
        return f"{self.prefix}:models:events"

    @property
    def retrain_lock(self) -> str:
        return f"{self.prefix}:retrain:lock"

    def lease(self, group: str) -> str:
        """Held by the one process consuming ``group`` (streamcast.lease)."""
        return f"{self.prefix}:lease:{group}"

    def acked(self, group: str) -> str:
        """The newest tick id ``group`` has acknowledged: where to recreate it if it is lost."""
        return f"{self.prefix}:acked:{group}"

    def group(self, shard_index: int, shard_count: int) -> str:
        """One consumer group per shard: replica i of N reads every tick, keeps its own."""
        return f"{self.prefix}:shard-{shard_index}-of-{shard_count}"


def shard_of(symbol: str, shard_count: int) -> int:
    """Stable across processes and hosts (unlike ``hash()``, which is salted per process)."""
    return zlib.crc32(symbol.encode()) % shard_count
