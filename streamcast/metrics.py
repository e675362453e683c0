"""Prometheus metrics of the daemon, on a registry passed in (tests build a private one)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Tick-to-forecast latency: milliseconds to seconds, finer where the objective (250 ms) lies.
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.35, 0.5,
    0.75, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


class Metrics:
    """Every metric the daemon exports, named ``streamcast_*``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.ticks = Counter(
            "streamcast_ticks",
            "Ticks read, by outcome: forecast, filling (window not full yet), dead, duplicate "
            "(already forecast before a restart), foreign (another shard's symbol)",
            ["outcome"],
            registry=registry,
        )
        self.dead_letters = Counter(
            "streamcast_dead_letters",
            "Ticks sent to the dead-letter stream, by reason",
            ["reason"],
            registry=registry,
        )
        self.forecasts = Counter(
            "streamcast_forecasts",
            "Forecasts published, by kind (next, path)",
            ["kind"],
            registry=registry,
        )
        self.latency = Histogram(
            "streamcast_tick_to_forecast_seconds",
            "From the tick's arrival in Redis (its stream id) to its forecast being published",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.batch_size = Histogram(
            "streamcast_batch_size",
            "Ticks per batch read and published together",
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.engine_seconds = Histogram(
            "streamcast_engine_seconds",
            "Time in the forecasting engine per batch",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.queue_depth = Gauge(
            "streamcast_queue_depth", "Ticks read but not yet published", registry=registry
        )
        self.stream_lag = Gauge(
            "streamcast_stream_lag",
            "Entries in the ticks stream not yet read by this shard's group",
            registry=registry,
        )
        self.path_age = Gauge(
            "streamcast_path_age_max_seconds",
            "Age of the stalest 50-step path among symbols with a full window",
            registry=registry,
        )
        self.symbols = Gauge(
            "streamcast_symbols", "Symbols with a window on this replica", registry=registry
        )
        self.redis_errors = Counter(
            "streamcast_redis_errors", "Redis calls that failed and were retried", registry=registry
        )
        self.model_info = Gauge(
            "streamcast_model_info",
            "The model version serving (value 1)",
            ["version"],
            registry=registry,
        )
        self.ready = Gauge("streamcast_ready", "1 when /readyz would answer 200", registry=registry)
        # -- the model lifecycle ---------------------------------------------------------------
        self.model_swaps = Counter(
            "streamcast_model_swaps",
            "Model versions loaded, warmed and swapped in while serving",
            registry=registry,
        )
        self.model_load_failures = Counter(
            "streamcast_model_load_failures",
            "Promoted versions this replica refused or failed to load (it kept serving), by reason",
            ["reason"],
            registry=registry,
        )
        self.model_age = Gauge(
            "streamcast_model_age_seconds",
            "Time since the current version was promoted in the registry",
            registry=registry,
        )
        self.retrains = Counter(
            "streamcast_retrains",
            "Retrains this replica started, by result: promoted, rejected, failed, skipped "
            "(another replica held the lock, or too little history)",
            ["result"],
            registry=registry,
        )
        self.retrain_seconds = Histogram(
            "streamcast_retrain_seconds",
            "Duration of a retrain: history read, training child, scoring, promotion",
            buckets=(1, 5, 10, 30, 60, 120, 300, 600, 1200, 3600),
            registry=registry,
        )
        self.retrain_holdout_mse = Gauge(
            "streamcast_retrain_holdout_mse",
            "Held-out 1-step MSE (relative to the last price for normalised models) in the last "
            "retrain, by model: candidate, current, naive",
            ["model"],
            registry=registry,
        )
