"""The daemon's settings as one plain type: every default of the service is declared here once.

``streamcast.settings`` reads its defaults from these types and builds them by field name
(:func:`streamcast.settings.daemon_config`); tests build them directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from streamcast.wire import TickLimits

Assignment = Literal["lease", "static"]


@dataclass
class DaemonConfig:
    assignment: Assignment = "lease"  # how replicas share the partitions (or "static")
    shard_index: int = 0  # static assignment: this replica's ordinal ...
    shard_count: int = 1  # ... of this many; it owns the partitions p with p % count == index
    consumer: str = "replica-0"  # the base of the consumer name (each process adds its own part)
    batch_max_size: int = 512
    batch_max_wait_ms: int = 20  # the most a busy read waits for its batch to fill
    batch_fill_min: int = 32  # a read with fewer entries (a quiet stream) does not wait at all
    conflate: bool = False  # forecast only a symbol's newest tick of a read (the rest: counted)
    path_steps: int = 50
    path_refresh_s: float = 1.0  # least time between two paths of one symbol (0: every batch)
    paths_per_batch_max: int = 64  # paths the path lane computes together, stalest first
    path_gather_s: float = 0.25  # the most a due path waits for others to roll with (0: none)
    path_chunk_ms: float = 10.0  # about how long one step of the path lane holds the engine
    path_share: float = 0.5  # of the engine's time, the most the path lane takes while ticks flow
    history_maxlen: int = 10_000
    forecasts_maxlen: int = 10_000
    dead_maxlen: int = 100_000
    claim_idle_ms: int = 30_000
    claim_interval_s: float = 10.0
    read_block_ms: int = 500
    model_check_s: float = 30.0  # fallback poll of the registry when no announcement arrives
    retrain_interval_s: float = 3600.0  # 0: no timed retrain
    retrain_after_ticks: int = 0  # 0: no retrain by count of ticks accepted on this replica
    skill_horizons: tuple[int, ...] = (1, 10, 50)
    skill_window: int = 2000  # scored forecasts per (horizon, version) in the rolling scores
    skill_symbols: tuple[str, ...] = ()  # symbols that get a labelled skill series of their own
    interval_levels: tuple[float, ...] = (80.0, 95.0)  # coverage (%) of each forecast's bands
    # (): no bands
    limits: TickLimits = field(default_factory=TickLimits)  # the edge: price range, ts ahead
    read_max_bytes: int = 16 * 1024 * 1024  # about the most one read pulls in
    lease_ttl_s: float = 10.0  # one live consumer per partition; a dead one's lapses after this
    ticks_trim_interval_s: float = 10.0  # trim what every group has acknowledged (0: never)
    symbols_max: int = 100_000  # windows kept; the least recently ticked go first
    symbol_idle_s: float = 86_400.0  # forget a symbol after this long without a tick (0: never)
    shutdown_timeout_s: float = 10.0  # to finish the batch in flight at stop
