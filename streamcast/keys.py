"""Redis key names, all under one configurable prefix so deployments can share a server.

Ticks go to ``partitions`` partition streams; a symbol's partition is a stable hash of its name
(:func:`partition_of`). Every key one batch's transaction touches for a partition (its ticks
stream, its symbols' forecasts, paths and history, its dead letters, its acknowledged mark, its lease)
carries the partition's hash tag ``{p<n>}``, so on Redis Cluster they share one slot and the
publish stays one atomic script call. The registry's keys share the tag ``{models}`` for the same reason.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass


def partition_of(symbol: str, partitions: int) -> int:
    """Stable across processes and hosts (unlike ``hash()``, which is salted per process)."""
    return zlib.crc32(symbol.encode()) % partitions


@dataclass(frozen=True)
class Keys:
    prefix: str = "streamcast"
    partitions: int = 1  # fixed per deployment, like a Kafka topic's partition count

    def __post_init__(self) -> None:
        if self.partitions < 1:
            raise ValueError(f"partitions must be at least 1 (got {self.partitions})")

    def partition(self, symbol: str) -> int:
        return partition_of(symbol, self.partitions)

    def _p(self, partition: int) -> str:
        return f"{self.prefix}:{{p{partition}}}"

    # -- one partition's keys (one hash tag each) -----------------------------------------------

    def ticks(self, partition: int) -> str:
        return f"{self._p(partition)}:ticks"

    def ticks_for(self, symbol: str) -> str:
        """The ticks stream a producer writes ``symbol``'s ticks to."""
        return self.ticks(self.partition(symbol))

    def dead(self, partition: int) -> str:
        return f"{self._p(partition)}:dead"

    def symbols(self, partition: int) -> str:
        """A set of every symbol of the partition that has history (to rebuild windows)."""
        return f"{self._p(partition)}:symbols"

    def forecasts(self, symbol: str) -> str:
        return f"{self._p(self.partition(symbol))}:forecasts:{symbol}"

    def paths(self, symbol: str) -> str:
        """The symbol's multi-step paths, each entry keyed by the id of the tick it starts from
        (published apart from the 1-step forecasts, by the daemon's path lane)."""
        return f"{self._p(self.partition(symbol))}:paths:{symbol}"

    def history(self, symbol: str) -> str:
        return f"{self._p(self.partition(symbol))}:history:{symbol}"

    def acked(self, partition: int) -> str:
        """The newest tick id the group acknowledged on the partition: where to recreate it."""
        return f"{self._p(partition)}:acked"

    def lease(self, partition: int) -> str:
        """Held by the one replica consuming the partition (streamcast.lease); in the partition's
        slot, so the publish script can check it (the fence)."""
        return f"{self._p(partition)}:lease"

    def calibration(self, partition: int) -> str:
        """The partition's interval calibration (JSON, streamcast.daemon.calibration)."""
        return f"{self._p(partition)}:calibration"

    def all_ticks(self) -> list[str]:
        return [self.ticks(p) for p in range(self.partitions)]

    def all_dead(self) -> list[str]:
        return [self.dead(p) for p in range(self.partitions)]

    @property
    def group(self) -> str:
        """The consumer group of the forecasters on every partition stream."""
        return f"{self.prefix}:forecasters"

    # -- the deployment ---------------------------------------------------------------------------

    @property
    def members(self) -> str:
        """A sorted set of live replicas, scored by when each one's membership expires (ms)."""
        return f"{self.prefix}:members"

    @property
    def meta(self) -> str:
        """A hash: the deployment's partition count (a replica with another count refuses)."""
        return f"{self.prefix}:meta"

    # -- the model registry (streamcast.registry), one slot: {models} ------------------------

    def model(self, version: str) -> str:
        """A hash: the ``.keras`` bytes, the sidecar JSON and the sha256 of one version."""
        return f"{self.prefix}:{{models}}:model:{version}"

    @property
    def models(self) -> str:
        """A sorted set of every registered version, scored by registration time (ms)."""
        return f"{self.prefix}:{{models}}:versions"

    @property
    def model_current(self) -> str:
        """A hash: the version serving, when and why it was promoted."""
        return f"{self.prefix}:{{models}}:current"

    @property
    def model_promotions(self) -> str:
        """A list of promoted versions, newest first (``models rollback`` pops it)."""
        return f"{self.prefix}:{{models}}:promotions"

    @property
    def model_log(self) -> str:
        """A stream of registry events: retrain outcomes with scores, promotions, rollbacks."""
        return f"{self.prefix}:{{models}}:log"

    @property
    def model_channel(self) -> str:
        """Pub/sub channel announcing a new current version to every replica."""
        return f"{self.prefix}:models:events"

    @property
    def retrain_lock(self) -> str:
        return f"{self.prefix}:retrain:lock"
