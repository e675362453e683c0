"""One read's worth of entries on its way through plan -> compute -> publish, and the counts."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from streamcast.wire import DeadLetter, Forecast, Tick


@dataclass
class Part:
    """One partition's share of a batch: its entries are acknowledged, and its dead letters
    written, in that partition's transaction."""

    ack_ids: list[str] = field(default_factory=list)
    dead: list[DeadLetter] = field(default_factory=list)


def _one_partition(symbol: str) -> int:
    return 0


@dataclass
class Batch:
    parts: dict[int, Part] = field(default_factory=dict)  # by partition
    partition_of: Callable[[str], int] = _one_partition  # a symbol's partition (Keys.partition)
    accepted: list[Tick] = field(default_factory=list)  # appended to history
    ready: list[Tick] = field(default_factory=list)  # with a full window: forecast
    windows: list[np.ndarray] = field(default_factory=list)  # one per ready tick
    forecasts: list[Forecast] = field(default_factory=list)  # computed: one per ready tick
    version: str = ""  # of the model that computed the forecasts
    tenure: dict[int, int | None] = field(default_factory=dict)  # each partition's, when read
    # each band's volatility, by symbol and tick id (partitions' ids are not unique in a batch)
    vols: dict[tuple[str, str], float] = field(default_factory=dict)
    read_at: float = 0.0  # wall-clock times of the stages, for the per-stage latency
    compute_started: float = 0.0
    computed_at: float = 0.0

    def part(self, partition: int) -> Part:
        return self.parts.setdefault(partition, Part())

    def dead_letter(self, symbol: str, letter: DeadLetter) -> None:
        """A dead letter for a tick of ``symbol`` (read from its own partition's stream)."""
        self.part(self.partition_of(symbol)).dead.append(letter)

    @property
    def ack_ids(self) -> list[str]:
        return [i for part in self.parts.values() for i in part.ack_ids]

    @property
    def dead(self) -> list[DeadLetter]:
        return [letter for part in self.parts.values() for letter in part.dead]

    def drop(self, partitions: set[int]) -> None:
        """Forget the share of ``partitions`` (lost after compute, before it was published): it
        is neither published nor acknowledged here; whoever holds them now reads it again."""
        if not partitions:
            return
        partition_of = self.partition_of
        for p in partitions:
            self.parts.pop(p, None)
        self.accepted = [t for t in self.accepted if partition_of(t.symbol) not in partitions]
        self.forecasts = [
            f for f in self.forecasts if partition_of(f.tick.symbol) not in partitions
        ]
        kept = [i for i, t in enumerate(self.ready) if partition_of(t.symbol) not in partitions]
        self.ready = [self.ready[i] for i in kept]
        self.windows = [self.windows[i] for i in kept]

    def withdraw(self, ticks: set[tuple[str, str]]) -> None:
        """Forget the forecasts of ``ticks`` (symbol, id): they were not published."""
        self.forecasts = [f for f in self.forecasts if (f.tick.symbol, f.tick.id) not in ticks]

    def newest(self) -> dict[str, tuple[Tick, np.ndarray]]:
        """Each symbol's newest forecast tick and its window (where its path starts)."""
        made = {(f.tick.symbol, f.tick.id) for f in self.forecasts if f.next is not None}
        return {
            t.symbol: (t, w)
            for t, w in zip(self.ready, self.windows, strict=True)
            if (t.symbol, t.id) in made
        }


@dataclass
class Stats:
    """What one daemon did since it started (logged at stop)."""

    batches: int = 0
    forecasts: int = 0
    paths: int = 0
    dead: int = 0
    duplicates: int = 0
    conflated: int = 0  # ticks not forecast: a newer tick of their symbol was (conflation)
    accepted: int = 0  # ticks appended to history (the retrain schedule counts them)

    def __str__(self) -> str:
        return (
            f"{self.batches} batches, {self.forecasts} forecasts, {self.paths} paths, "
            f"{self.dead} dead letters, {self.duplicates} duplicates skipped"
            + (f", {self.conflated} conflated" if self.conflated else "")
        )
