"""One read's worth of entries on its way through plan -> compute -> publish, and the counts."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from streamcast.wire import DeadLetter, Forecast, Tick


@dataclass
class Batch:
    ack_ids: list[str] = field(default_factory=list)  # every entry read: acknowledged together
    dead: list[DeadLetter] = field(default_factory=list)
    accepted: list[Tick] = field(default_factory=list)  # appended to history
    ready: list[Tick] = field(default_factory=list)  # with a full window: forecast
    windows: list[np.ndarray] = field(default_factory=list)  # one per ready tick
    due: list[int] = field(default_factory=list)  # indices into ready that get a path
    forecasts: list[Forecast] = field(default_factory=list)  # computed: one per ready tick
    version: str = ""  # of the model that computed the forecasts
    read_at: float = 0.0  # wall-clock times of the stages, for the per-stage latency
    compute_started: float = 0.0
    computed_at: float = 0.0


@dataclass
class Stats:
    """What one daemon did since it started (logged at stop)."""

    batches: int = 0
    forecasts: int = 0
    paths: int = 0
    dead: int = 0
    duplicates: int = 0
    accepted: int = 0  # ticks appended to history (the retrain schedule counts them)

    def __str__(self) -> str:
        return (
            f"{self.batches} batches, {self.forecasts} forecasts, {self.paths} paths, "
            f"{self.dead} dead letters, {self.duplicates} duplicates skipped"
        )
