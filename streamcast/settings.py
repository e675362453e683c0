"""Settings from the environment (``STREAMCAST_*``) and ``.env``, for the daemon and the CLI."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from streamcast.model import DEFAULT_MODEL_DIR

ENV_PREFIX = "STREAMCAST_"


class SettingsError(ValueError):
    """Invalid settings; the text names each variable and what it allows."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_file=".env", env_file_encoding="utf-8", extra="ignore"
    )

    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        description="redis:// or rediss:// (TLS) URL; carries the password when there is one",
    )
    # braces allowed: a hash tag ({sc0}) keeps a shard's keys in one Redis Cluster slot
    key_prefix: str = Field("streamcast", pattern=r"^[A-Za-z0-9._:{}-]{1,64}$")
    model_path: Path = Field(DEFAULT_MODEL_DIR, description="a saved model directory")
    http_host: str = "127.0.0.1"
    http_port: int = Field(8000, ge=0, le=65535)
    http_header_timeout_s: float = Field(
        10.0, gt=0, le=600, description="a request head must arrive within this (slow clients)"
    )
    http_keepalive_timeout_s: float = Field(75.0, gt=0, le=3600)
    http_max_connections: int = Field(1000, ge=1, le=100_000)
    shard_index: int = Field(0, ge=0)
    shard_count: int = Field(1, ge=1, le=1024)
    consumer_name: str = Field("", pattern=r"^[A-Za-z0-9._:-]{0,64}$")
    batch_max_size: int = Field(512, ge=1, le=65536)
    batch_max_wait_ms: int = Field(20, ge=0, le=10_000)
    path_steps: int = Field(50, ge=1, le=1000)
    path_refresh_s: float = Field(
        1.0,
        ge=0,
        le=3600,
        description="least time between two paths of one symbol (0: every batch)",
    )
    paths_per_batch_max: int = Field(16, ge=1, le=65536)
    history_maxlen: int = Field(10_000, ge=50, le=100_000_000)
    forecasts_maxlen: int = Field(10_000, ge=10, le=100_000_000)
    dead_maxlen: int = Field(100_000, ge=10, le=100_000_000)
    # -- the edge: what a tick may be (streamcast.wire.TickLimits) -----------------------
    price_min: float = Field(
        1e-6, gt=0, description="smallest price a normalised model accepts (and > 0)"
    )
    price_max: float = Field(1e9, gt=0, description="largest price (absolute value)")
    ts_max_ahead_ms: int = Field(
        300_000, ge=0, description="how far a tick's ts may be ahead of its arrival in Redis"
    )
    read_max_bytes: int = Field(
        16 * 1024 * 1024,
        ge=65_536,
        description="about the most one read of the ticks stream pulls in (entries shrink it)",
    )
    # -- one live consumer per shard, housekeeping -----------------------------------------
    lease_ttl_s: float = Field(
        10.0, ge=1, le=300, description="a dead replica's shard is taken over after this long"
    )
    ticks_trim_interval_s: float = Field(
        10.0, ge=0, description="trim ticks every group has acknowledged this often (0: never)"
    )
    symbols_max: int = Field(100_000, ge=1, description="symbols a replica keeps windows for")
    symbol_idle_s: float = Field(
        86_400.0,
        ge=0,
        description="forget a symbol's window after this long without a tick (0: never)",
    )
    claim_idle_ms: int = Field(30_000, ge=100)
    claim_interval_s: float = Field(10.0, gt=0)
    shutdown_timeout_s: float = Field(10.0, gt=0, le=600)
    redis_timeout_s: float = Field(5.0, gt=0, le=120)
    engine_workers: int = Field(0, ge=0, le=256, description="0: one per CPU core")
    skill_horizons: str = Field(
        "1,10,50", pattern=r"^\d{1,4}(,\d{1,4})*$", description="horizons scored online"
    )
    skill_window: int = Field(2000, ge=10, le=1_000_000)
    skill_symbols: str = Field(
        "", pattern=r"^[A-Za-z0-9._:,-]*$", description="symbols with their own skill series"
    )
    # -- the model lifecycle ---------------------------------------------------------------
    model_cache_dir: Path | None = Field(
        None, description="file cache of registry versions (default ~/.cache/streamcast/models)"
    )
    model_check_s: float = Field(30.0, gt=0, le=3600)
    retrain_interval_s: float = Field(3600.0, ge=0, description="0: no timed retrain")
    retrain_after_ticks: int = Field(0, ge=0, description="0: no retrain by tick count")
    retrain_symbols: str = Field(
        "", pattern=r"^[A-Za-z0-9._:,-]*$", description="comma list (default: all)"
    )
    retrain_max_points: int = Field(5_000, ge=102, le=10_000_000)
    retrain_holdout_fraction: float = Field(0.1, gt=0, lt=1)
    retrain_margin: float = Field(0.01, ge=0, lt=1)
    retrain_epochs: int = Field(2, ge=1, le=1000)
    retrain_batch_size: int = Field(32, ge=1, le=65536)
    retrain_residual: bool | None = None
    retrain_min_windows: int = Field(200, ge=1)
    retrain_time_limit_s: float = Field(900.0, gt=0, le=86_400)
    retrain_threads: int = Field(1, ge=0, le=256, description="0: TensorFlow's default")

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str) -> str:
        scheme = urlsplit(value).scheme
        if scheme not in ("redis", "rediss", "unix"):
            raise ValueError("must start with redis://, rediss:// (TLS) or unix://")
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
        return self

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
