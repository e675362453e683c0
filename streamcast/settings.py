"""Settings from the environment (``STREAMCAST_*``) and ``.env``, and the one path from them to
the objects they configure.

Each setting of a part is named after that part's own parameter, with the part's prefix:
``STREAMCAST_BATCH_MAX_SIZE`` is ``DaemonConfig.batch_max_size``, ``STREAMCAST_RETRAIN_MARGIN``
is ``RetrainConfig.margin``, ``STREAMCAST_HTTP_MAX_CONNECTIONS`` is ``HttpServer``'s
``max_connections``. Defaults are declared once, by the part (read here with :func:`default`),
and :func:`build` makes a part from the settings by matching its parameters' names, as arq builds
its worker. A test fails if a default is written here again (tests/test_settings.py).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from streamcast.connect import make_redis
from streamcast.daemon.config import Assignment, DaemonConfig
from streamcast.forecaster import Batching, Forecaster
from streamcast.http import HttpServer
from streamcast.keys import Keys
from streamcast.lease import consumer_token
from streamcast.model import DEFAULT_MODEL_DIR
from streamcast.retrain import RetrainConfig
from streamcast.wire import TickLimits

ENV_PREFIX = "STREAMCAST_"


class SettingsError(ValueError):
    """Invalid settings; the text names each variable and what it allows."""


T = TypeVar("T")


def default(part: Callable[..., Any], name: str) -> Any:
    """The default ``part`` (a class or a function) declares for its parameter ``name``."""
    value = inspect.signature(part).parameters[name].default
    if value is inspect.Parameter.empty:
        raise TypeError(f"{part.__qualname__}({name}) has no default")
    return value


def _names(value: str) -> tuple[str, ...]:
    return tuple(s for s in value.split(",") if s)


def _listed(values: tuple[Any, ...]) -> str:
    return ",".join(format(v, "g") if isinstance(v, float) else str(v) for v in values)


# where each setting goes: (part, prefix); a setting named prefix + parameter is that parameter
PARTS: tuple[tuple[Callable[..., Any], str], ...] = (
    (DaemonConfig, ""),
    (TickLimits, ""),
    (RetrainConfig, "retrain_"),
    (HttpServer, "http_"),
    (Keys, "key_"),
    (make_redis, "redis_"),
)
# settings whose text becomes another type in the part
CONVERT: dict[str, Callable[[Any], Any]] = {
    "skill_horizons": lambda text: tuple(int(h) for h in text.split(",")),
    "skill_symbols": _names,
    "interval_levels": lambda text: tuple(float(v) for v in text.split(",") if v),
    "retrain_symbols": _names,
}
_D, _R, _L = DaemonConfig, RetrainConfig, TickLimits


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_file=".env", env_file_encoding="utf-8", extra="ignore"
    )

    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        description="redis:// or rediss:// (TLS) URL; carries the password when there is one",
    )
    redis_cluster: bool | None = Field(
        default(make_redis, "cluster"),
        description="the URL names a Redis Cluster node (unset: ask the server)",
    )
    # no braces: each partition's keys carry their own hash tag ({p3}), which a tag in the
    # prefix would override (every key in one slot)
    key_prefix: str = Field(default(Keys, "prefix"), pattern=r"^[A-Za-z0-9._:-]{1,64}$")
    partitions: int = Field(
        default(Keys, "partitions"),
        ge=1,
        le=4096,
        description="partition streams of ticks; fixed per deployment (docs: how to change it)",
    )
    assignment: Assignment = Field(
        default(_D, "assignment"),
        description="lease: replicas share the partitions by lease and rebalance; static: "
        "replica STREAMCAST_SHARD_INDEX of STREAMCAST_SHARD_COUNT owns the partitions p with "
        "p % count == index (a StatefulSet's ordinal)",
    )
    model_path: Path = Field(DEFAULT_MODEL_DIR, description="a saved model directory")
    http_host: str = "127.0.0.1"
    http_port: int = Field(8000, ge=0, le=65535)
    http_header_timeout_s: float = Field(
        default(HttpServer, "header_timeout_s"),
        gt=0,
        le=600,
        description="a request head must arrive within this (slow clients)",
    )
    http_keepalive_timeout_s: float = Field(
        default(HttpServer, "keepalive_timeout_s"), gt=0, le=3600
    )
    http_max_connections: int = Field(default(HttpServer, "max_connections"), ge=1, le=100_000)
    shard_index: int = Field(default(_D, "shard_index"), ge=0)
    shard_count: int = Field(default(_D, "shard_count"), ge=1, le=1024)
    consumer_name: str = Field("", pattern=r"^[A-Za-z0-9._:-]{0,64}$")
    batch_max_size: int = Field(default(_D, "batch_max_size"), ge=1, le=65536)
    batch_max_wait_ms: int = Field(
        default(_D, "batch_max_wait_ms"),
        ge=0,
        le=10_000,
        description="the most a busy read waits for its batch to fill (0: never waits)",
    )
    batch_fill_min: int = Field(
        default(_D, "batch_fill_min"),
        ge=1,
        le=1_000_000,
        description="a read that found fewer ticks than this does not wait to fill its batch",
    )
    conflate: bool = Field(
        default(_D, "conflate"),
        description="under load, forecast only each symbol's newest tick of a read (the others "
        "are acknowledged, kept in history and counted as conflated); off: every tick forecast",
    )
    path_steps: int = Field(default(_D, "path_steps"), ge=1, le=1000)
    path_refresh_s: float = Field(
        default(_D, "path_refresh_s"),
        ge=0,
        le=3600,
        description="least time between two paths of one symbol (0: as often as the lane can)",
    )
    paths_per_batch_max: int = Field(
        default(_D, "paths_per_batch_max"),
        ge=1,
        le=65536,
        description="paths the path lane computes together (the stalest first)",
    )
    path_gather_s: float = Field(
        default(_D, "path_gather_s"),
        ge=0,
        le=60,
        description="the most a due path waits for others to come due and roll with it (one "
        "path alone costs several times its share of a group's rollout); 0: no wait",
    )
    path_share: float = Field(
        default(_D, "path_share"),
        gt=0,
        le=1,
        description="while ticks flow, the most of the engine's time the path lane takes (1: "
        "no limit)",
    )
    path_chunk_ms: float = Field(
        default(_D, "path_chunk_ms"),
        gt=0,
        le=10_000,
        description="about how long one step of the path lane holds the engine: the most a "
        "1-step batch waits for a path computation",
    )
    history_maxlen: int = Field(default(_D, "history_maxlen"), ge=50, le=100_000_000)
    forecasts_maxlen: int = Field(default(_D, "forecasts_maxlen"), ge=10, le=100_000_000)
    dead_maxlen: int = Field(default(_D, "dead_maxlen"), ge=10, le=100_000_000)
    # -- the edge: what a tick may be (streamcast.wire.TickLimits) -----------------------
    price_min: float = Field(
        default(_L, "price_min"),
        gt=0,
        allow_inf_nan=False,
        description="smallest price a normalised model accepts (and > 0)",
    )
    price_max: float = Field(
        default(_L, "price_max"),
        gt=0,
        allow_inf_nan=False,
        description="largest price (absolute value)",
    )
    ts_max_ahead_ms: int = Field(
        default(_L, "ts_max_ahead_ms"),
        ge=0,
        description="how far a tick's ts may be ahead of its arrival in Redis",
    )
    read_max_bytes: int = Field(
        default(_D, "read_max_bytes"),
        ge=65_536,
        description="about the most one read of the ticks stream pulls in (entries shrink it)",
    )
    # -- one live consumer per partition, housekeeping -------------------------------------
    lease_ttl_s: float = Field(
        default(_D, "lease_ttl_s"),
        ge=1,
        le=300,
        description="a dead replica's partitions are taken over after this long (plus a round)",
    )
    ticks_trim_interval_s: float = Field(
        default(_D, "ticks_trim_interval_s"),
        ge=0,
        description="trim ticks every group has acknowledged this often (0: never)",
    )
    symbols_max: int = Field(
        default(_D, "symbols_max"), ge=1, description="symbols a replica keeps windows for"
    )
    symbol_idle_s: float = Field(
        default(_D, "symbol_idle_s"),
        ge=0,
        description="forget a symbol's window after this long without a tick (0: never)",
    )
    claim_idle_ms: int = Field(default(_D, "claim_idle_ms"), ge=100)
    claim_interval_s: float = Field(default(_D, "claim_interval_s"), gt=0)
    shutdown_timeout_s: float = Field(default(_D, "shutdown_timeout_s"), gt=0, le=600)
    redis_timeout_s: float = Field(default(make_redis, "timeout_s"), gt=0, le=120)
    engine_workers: int = Field(0, ge=0, le=256, description="0: one per CPU core")
    # the engine is not in PARTS (its workers=None, one per core, is the 0 above): load_engine
    # passes these two to Forecaster.load
    engine_batching: Batching = Field(
        default(Forecaster, "batching"),
        description="auto: one_call on a GPU, else chunked (per-core chunks)",
    )
    skill_horizons: str = Field(
        _listed(default(_D, "skill_horizons")),
        pattern=r"^\d{1,4}(,\d{1,4})*$",
        description="horizons scored online",
    )
    skill_window: int = Field(default(_D, "skill_window"), ge=10, le=1_000_000)
    interval_levels: str = Field(
        _listed(default(_D, "interval_levels")),
        pattern=r"^(\d{1,2}(\.\d{1,3})?(,\d{1,2}(\.\d{1,3})?)*)?$",
        description="coverage levels in % of the bands on every forecast (empty: no bands)",
    )
    skill_symbols: str = Field(
        _listed(default(_D, "skill_symbols")),
        pattern=r"^[A-Za-z0-9._:,-]*$",
        description="symbols with their own skill series",
    )
    # -- the model lifecycle ---------------------------------------------------------------
    model_cache_dir: Path | None = Field(
        None, description="file cache of registry versions (default ~/.cache/streamcast/models)"
    )
    model_check_s: float = Field(default(_D, "model_check_s"), gt=0, le=3600)
    retrain_interval_s: float = Field(
        default(_D, "retrain_interval_s"), ge=0, description="0: no timed retrain"
    )
    retrain_after_ticks: int = Field(
        default(_D, "retrain_after_ticks"), ge=0, description="0: no retrain by tick count"
    )
    retrain_symbols: str = Field(
        _listed(default(_R, "symbols")),
        pattern=r"^[A-Za-z0-9._:,-]*$",
        description="comma list (default: all)",
    )
    retrain_max_points: int = Field(default(_R, "max_points"), ge=102, le=10_000_000)
    retrain_holdout_fraction: float = Field(default(_R, "holdout_fraction"), gt=0, lt=1)
    retrain_margin: float = Field(default(_R, "margin"), ge=0, lt=1)
    retrain_epochs: int = Field(default(_R, "epochs"), ge=1, le=1000)
    retrain_batch_size: int = Field(default(_R, "batch_size"), ge=1, le=65536)
    retrain_residual: bool | None = Field(default(_R, "residual"))
    retrain_min_windows: int = Field(default(_R, "min_windows"), ge=1)
    retrain_time_limit_s: float = Field(default(_R, "time_limit_s"), gt=0, le=86_400)
    retrain_threads: int = Field(
        default(_R, "threads"), ge=0, le=256, description="0: TensorFlow's default"
    )

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str) -> str:
        scheme = urlsplit(value).scheme
        if scheme not in ("redis", "rediss", "unix"):
            raise ValueError("must start with redis://, rediss:// (TLS) or unix://")
        return value

    @field_validator("interval_levels")
    @classmethod
    def _levels_in_range(cls, value: str) -> str:
        levels = [float(v) for v in value.split(",") if v]
        if any(not 0 < level < 100 for level in levels) or len(set(levels)) != len(levels):
            raise ValueError("levels must be distinct, each above 0 and below 100")
        return value

    @field_validator("skill_horizons")
    @classmethod
    def _horizons_positive(cls, value: str) -> str:
        if any(int(h) < 1 for h in value.split(",")):
            raise ValueError("horizons must be at least 1")
        return value

    @model_validator(mode="after")
    def _shard_in_range(self) -> Settings:
        if self.shard_index >= self.shard_count:
            raise ValueError(
                f"STREAMCAST_SHARD_INDEX={self.shard_index} must be below "
                f"STREAMCAST_SHARD_COUNT={self.shard_count}"
            )
        if self.price_min >= self.price_max:
            raise ValueError(
                f"STREAMCAST_PRICE_MIN={self.price_min:g} must be below "
                f"STREAMCAST_PRICE_MAX={self.price_max:g}: every tick would be refused"
            )
        if self.assignment == "static" and self.shard_count > self.partitions:
            raise ValueError(
                f"STREAMCAST_SHARD_COUNT={self.shard_count} replicas cannot share "
                f"STREAMCAST_PARTITIONS={self.partitions} partitions statically: some would own "
                "none (raise the partitions, or use STREAMCAST_ASSIGNMENT=lease)"
            )
        return self

    @property
    def keys(self) -> Keys:
        return Keys(self.key_prefix, self.partitions)

    @property
    def consumer(self) -> str:
        """The base of the consumer name; each process adds its host, pid and a random part."""
        return self.consumer_name or f"replica-{self.shard_index}"

    @property
    def redis_url_redacted(self) -> str:
        return redact_url(self.redis_url)


def redact_url(url: str) -> str:
    """The URL with any password replaced by ``***`` (for logs and errors)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def build(part: Callable[..., T], settings: Settings, prefix: str = "", **given: Any) -> T:
    """``part`` made from the settings named ``prefix`` + each of its parameters (converted
    where :data:`CONVERT` says), and ``given`` values."""
    values = dict(given)
    for name in inspect.signature(part).parameters:
        key = prefix + name
        if name not in values and key in Settings.model_fields:
            value = getattr(settings, key)
            values[name] = CONVERT[key](value) if key in CONVERT else value
    return part(**values)


def daemon_config(settings: Settings) -> DaemonConfig:
    # the consumer name is unique per process: two processes with one name would share (and
    # split) its entries
    consumer = consumer_token(settings.consumer)
    return build(DaemonConfig, settings, consumer=consumer, limits=build(TickLimits, settings))


def retrain_config(settings: Settings, **overrides: Any) -> RetrainConfig:
    """The retrain's config; ``overrides`` that are not None win (the CLI's flags)."""
    given = {name: value for name, value in overrides.items() if value is not None}
    given.setdefault("limits", build(TickLimits, settings))
    return build(RetrainConfig, settings, "retrain_", **given)


def load_settings(**overrides: object) -> Settings:
    """Read settings; raise :class:`SettingsError` naming each bad variable and what it allows."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            field = ".".join(str(p) for p in error["loc"]) or "settings"
            name = f"{ENV_PREFIX}{field.upper()}" if error["loc"] else "settings"
            given = error.get("input")
            shown = "" if isinstance(given, dict) else f" (got {str(given)[:60]!r})"
            if field == "redis_url" and isinstance(given, str):
                shown = f" (got {redact_url(given)!r})"
            lines.append(f"{name}: {error['msg']}{shown}")
        raise SettingsError("invalid settings:\n  " + "\n  ".join(lines)) from None
