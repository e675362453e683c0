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

    def group(self, shard_index: int, shard_count: int) -> str:
        """One consumer group per shard: replica i of N reads every tick, keeps its own."""
        return f"{self.prefix}:shard-{shard_index}-of-{shard_count}"


def shard_of(symbol: str, shard_count: int) -> int:
    """Stable across processes and hosts (unlike ``hash()``, which is salted per process)."""
    return zlib.crc32(symbol.encode()) % shard_count
