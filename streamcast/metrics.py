"""Prometheus metrics of the daemon, in a collector registry passed in (tests build a private one)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from streamcast.wire import REASONS

# label values known in advance: each series exists at 0 from the start, so a dashboard panel
# shows 0 rather than "No data" and increase() sees the first event
TICK_OUTCOMES = ("forecast", "filling", "dead", "duplicate", "conflated", "deleted")
FORECAST_KINDS = ("next", "path")
STAGES = ("ingest", "wait", "compute", "publish", "path_wait", "path_compute", "path_publish")
RETRAIN_RESULTS = ("promoted", "rejected", "failed", "skipped")
LOAD_FAILURES = ("invalid", "mismatch", "error")
HOLDOUT_MODELS = ("candidate", "current", "naive")
RECOVERIES = ("group_recreated", "lease_lost", "start_fallback")
REFUSALS = ("OOM", "READONLY", "MISCONF", "BUSY", "NOSCRIPT", "EXECABORT", "MASTERDOWN", "ERR")
WRITES = ("forecast", "history", "symbols", "dead", "acked", "ack", "path")

# Tick-to-forecast latency: milliseconds to seconds, finer where the objective (250 ms) lies.
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.35, 0.5,
    0.75, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


class Metrics:
    """Every metric the daemon exports, named ``streamcast_*``."""

    def __init__(self, prometheus: CollectorRegistry) -> None:
        self.prometheus = prometheus
        self.ticks = Counter(
            "streamcast_ticks",
            "Ticks read, by outcome: forecast, filling (window not full yet), dead, duplicate "
            "(already forecast before a restart), conflated (STREAMCAST_CONFLATE: a newer tick "
            "of its symbol in the same read was forecast instead), deleted (XDEL or XTRIM of an "
            "entry while it was pending: acknowledged, nothing to forecast)",
            ["outcome"],
            registry=prometheus,
        )
        self.dead_letters = Counter(
            "streamcast_dead_letters",
            "Ticks sent to the dead-letter stream, by reason",
            ["reason"],
            registry=prometheus,
        )
        self.forecasts = Counter(
            "streamcast_forecasts",
            "Forecasts published, by kind (next, path)",
            ["kind"],
            registry=prometheus,
        )
        self.latency = Histogram(
            "streamcast_tick_to_forecast_seconds",
            "From the tick's arrival in Redis (its stream id) to its forecast being published",
            buckets=LATENCY_BUCKETS,
            registry=prometheus,
        )
        self.batch_size = Histogram(
            "streamcast_batch_size",
            "Ticks per batch read and published together",
            buckets=BATCH_BUCKETS,
            registry=prometheus,
        )
        self.engine_seconds = Histogram(
            "streamcast_engine_seconds",
            "Time in the forecasting engine per batch",
            buckets=LATENCY_BUCKETS,
            registry=prometheus,
        )
        self.queue_depth = Gauge(
            "streamcast_queue_depth", "Ticks read but not yet published", registry=prometheus
        )
        self.stream_lag = Gauge(
            "streamcast_stream_lag",
            "Entries of the partitions this replica owns not yet read by the group",
            registry=prometheus,
        )
        self.partition_lag = Gauge(
            "streamcast_partition_lag",
            "Entries of a partition stream not yet read by the group (partitions owned here)",
            ["partition"],
            registry=prometheus,
        )
        self.intervals = IntervalMetrics(prometheus)
        self.partitions_owned = Gauge(
            "streamcast_partitions_owned",
            "Partitions this replica holds the lease of and consumes",
            registry=prometheus,
        )
        self.partition_owned = Gauge(
            "streamcast_partition_owned",
            "1 for each partition this replica consumes (0 once it gave it up)",
            ["partition"],
            registry=prometheus,
        )
        self.partitions_share = Gauge(
            "streamcast_partitions_share",
            "The partitions this replica should own: its fair share of the live replicas",
            registry=prometheus,
        )
        self.members = Gauge(
            "streamcast_members",
            "Live replicas of the deployment, as this replica sees them",
            registry=prometheus,
        )
        self.rebalances = Counter(
            "streamcast_partition_moves",
            "Partitions taken (acquired, incl. a dead replica's) or given up (released, lost)",
            ["how"],
            registry=prometheus,
        )
        self.path_age = Gauge(
            "streamcast_path_age_max_seconds",
            "Of symbols waiting for a new path (they ticked since their last one was due): the "
            "longest wait since their last path was published",
            registry=prometheus,
        )
        self.symbols = Gauge(
            "streamcast_symbols", "Symbols with a window on this replica", registry=prometheus
        )
        self.redis_errors = Counter(
            "streamcast_redis_errors",
            "Redis calls that failed and were retried",
            registry=prometheus,
        )
        self.model_info = Gauge(
            "streamcast_model_info",
            "The model version serving (value 1)",
            ["version"],
            registry=prometheus,
        )
        self.ready = Gauge(
            "streamcast_ready", "1 when /readyz would answer 200", registry=prometheus
        )
        # -- the model lifecycle ---------------------------------------------------------------
        self.model_swaps = Counter(
            "streamcast_model_swaps",
            "Model versions loaded, warmed and swapped in while serving",
            registry=prometheus,
        )
        self.model_load_failures = Counter(
            "streamcast_model_load_failures",
            "Promoted versions this replica refused or failed to load (it kept serving), by reason",
            ["reason"],
            registry=prometheus,
        )
        self.model_age = Gauge(
            "streamcast_model_age_seconds",
            "Time since the current version was promoted in the registry",
            registry=prometheus,
        )
        self.retrains = Counter(
            "streamcast_retrains",
            "Retrains this replica started, by result: promoted, rejected, failed, skipped "
            "(another replica held the lock, or too little history)",
            ["result"],
            registry=prometheus,
        )
        self.retrain_seconds = Histogram(
            "streamcast_retrain_seconds",
            "Duration of a retrain: history read, training child, scoring, promotion",
            buckets=(1, 5, 10, 30, 60, 120, 300, 600, 1200, 3600),
            registry=prometheus,
        )
        self.retrain_holdout_mse = Gauge(
            "streamcast_retrain_holdout_mse",
            "Held-out 1-step MSE (relative to the last price for normalised models) in the last "
            "retrain, by model: candidate, current, naive",
            ["model"],
            registry=prometheus,
        )
        # -- online skill (streamcast.skill) ---------------------------------------------------
        scored_labels = ["horizon", "version", "forecaster"]
        self.squared_error = Counter(
            "streamcast_forecast_squared_error",
            "Sum of squared relative errors of scored forecasts (forecaster: model or naive); "
            "rate() over rate(streamcast_forecast_scored_total) is the MSE over any window",
            scored_labels,
            registry=prometheus,
        )
        self.absolute_error = Counter(
            "streamcast_forecast_absolute_error",
            "Sum of absolute relative errors of scored forecasts (forecaster: model or naive)",
            scored_labels,
            registry=prometheus,
        )
        self.scored = Counter(
            "streamcast_forecast_scored",
            "Forecasts scored against the tick that is their truth, by horizon and version",
            ["horizon", "version"],
            registry=prometheus,
        )
        self.rolling_mse = Gauge(
            "streamcast_forecast_rolling_mse",
            "MSE (relative to the origin price) over the last scored forecasts",
            scored_labels,
            registry=prometheus,
        )
        self.rolling_mae = Gauge(
            "streamcast_forecast_rolling_mae",
            "MAE (relative to the origin price) over the last scored forecasts",
            scored_labels,
            registry=prometheus,
        )
        self.skill = Gauge(
            "streamcast_skill",
            "1 - MSE_model / MSE_naive over the last scored forecasts, by horizon and version "
            "(above 0: better than no change)",
            ["horizon", "version"],
            registry=prometheus,
        )
        self.symbol_skill = Gauge(
            "streamcast_symbol_skill",
            "Skill of the symbols listed in STREAMCAST_SKILL_SYMBOLS (others are not labelled)",
            ["symbol", "horizon"],
            registry=prometheus,
        )
        # -- per-stage latency ----------------------------------------------------------------
        self.stage_seconds = Histogram(
            "streamcast_stage_seconds",
            "Time per stage: ingest (tick in Redis until its batch's first read), wait (first "
            "read until compute starts: the batch fill wait and validation, per batch), compute "
            "(per batch), publish (compute end until written, per batch); the path lane's: "
            "path_wait (a path's tick published until its path computation starts), "
            "path_compute (per group of paths), path_publish (computed until written)",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=prometheus,
        )
        self.event_latency = Histogram(
            "streamcast_event_to_forecast_seconds",
            "From the tick's event time (its ts field, when it has one) to its forecast published",
            buckets=LATENCY_BUCKETS,
            registry=prometheus,
        )
        # -- hostile input and operators -------------------------------------------------------
        self.standby = Gauge(
            "streamcast_standby",
            "1 while this replica owns no partition (others hold them all): it waits to take one",
            registry=prometheus,
        )
        self.recoveries = Counter(
            "streamcast_recoveries",
            "Recoveries: group_recreated (the group or stream was deleted), lease_lost (another "
            "process took this shard), start_fallback (the current model would not load at start)",
            ["what"],
            registry=prometheus,
        )
        self.redis_refusals = Counter(
            "streamcast_redis_refusals",
            "Commands Redis refused (OOM at maxmemory, READONLY replica, ...): backed off, retried",
            ["reason"],
            registry=prometheus,
        )
        self.write_errors = Counter(
            "streamcast_write_errors",
            "Commands of the publish transaction Redis refused, by what was written and why "
            "(duplicate_id: already there); what=publish_failed: the dead letter of a forecast "
            "that was not written, refused too or Redis unreachable (the log names the ticks)",
            ["what", "reason"],
            registry=prometheus,
        )
        self.forecasts_withheld = Counter(
            "streamcast_forecasts_withheld",
            "Forecast values not published because the model's output was not finite, by kind",
            ["kind"],
            registry=prometheus,
        )
        self.history_skipped = Counter(
            "streamcast_history_skipped",
            "History entries breaking the edge's rules, skipped when rebuilding windows",
            registry=prometheus,
        )
        self.ticks_trimmed = Counter(
            "streamcast_ticks_trimmed",
            "Entries trimmed from the ticks stream after every group acknowledged them",
            registry=prometheus,
        )
        self.symbols_evicted = Counter(
            "streamcast_symbols_evicted",
            "Symbols forgotten (idle past STREAMCAST_SYMBOL_IDLE_S, or beyond _SYMBOLS_MAX)",
            ["why"],
            registry=prometheus,
        )
        self._zero_known_labels()

    def _zero_known_labels(self) -> None:
        for counter, values in (
            (self.ticks, TICK_OUTCOMES),
            (self.dead_letters, REASONS),
            (self.forecasts, FORECAST_KINDS),
            (self.retrains, RETRAIN_RESULTS),
            (self.model_load_failures, LOAD_FAILURES),
            (self.recoveries, RECOVERIES),
            (self.redis_refusals, REFUSALS),
            (self.forecasts_withheld, FORECAST_KINDS),
            (self.symbols_evicted, ("idle", "cap")),
            (self.rebalances, ("acquired", "released", "lost")),
        ):
            for value in values:
                counter.labels(value)
        for stage in STAGES:
            self.stage_seconds.labels(stage)
        for what in WRITES:
            self.write_errors.labels(what, "duplicate_id")
        for model in HOLDOUT_MODELS:
            # no retrain yet: NaN, not a made-up 0
            self.retrain_holdout_mse.labels(model).set(float("nan"))


class IntervalMetrics:
    """The prediction intervals' metrics (streamcast.daemon.calibration), by horizon, level (80,
    95) and model version."""

    def __init__(self, prometheus: CollectorRegistry) -> None:
        interval_labels = ["horizon", "level", "version"]
        self.resolved = Counter(
            "streamcast_interval_resolved",
            "Published bands whose truth arrived, by horizon, level (80, 95) and model version",
            interval_labels,
            registry=prometheus,
        )
        self.misses = Counter(
            "streamcast_interval_misses",
            "Of those, the truths outside the band (coverage = 1 - misses / resolved)",
            interval_labels,
            registry=prometheus,
        )
        self.coverage = Gauge(
            "streamcast_interval_coverage",
            "Share of the last resolved bands (rolling window) that held their truth",
            interval_labels,
            registry=prometheus,
        )
        self.width = Gauge(
            "streamcast_interval_width",
            "Mean width of those bands relative to the price they were made at",
            interval_labels,
            registry=prometheus,
        )
        self.score = Gauge(
            "streamcast_interval_score",
            "Mean interval (Winkler) score of those bands, relative to the price: the width plus "
            "2 / (1 - level) times the miss; lower is better",
            interval_labels,
            registry=prometheus,
        )
