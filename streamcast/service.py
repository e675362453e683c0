"""Wiring for ``streamcast serve``: settings -> Redis client, engine, daemon, HTTP, signals.

Signals are handled here alone (and can be switched off for tests): the first SIGTERM or SIGINT
stops reading, finishes the batch in flight, publishes, acks and exits 0; a second SIGINT exits
at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from functools import partial
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from redis import exceptions as redis_errors
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from streamcast.daemon import Daemon, DaemonConfig
from streamcast.http import HttpServer
from streamcast.keys import Keys
from streamcast.lease import consumer_token
from streamcast.live import LivePage
from streamcast.metrics import Metrics
from streamcast.model import ModelError
from streamcast.registry import Registry
from streamcast.retrain import RetrainConfig, Retrainer
from streamcast.settings import Settings
from streamcast.wire import TickLimits

log = logging.getLogger(__name__)


class ServeError(RuntimeError):
    """The daemon cannot start as configured (the text says which setting and why)."""


def make_redis(url: str, timeout_s: float = 5.0, *, retries: int = 3, **kwargs: Any) -> Redis:
    """A client with the protocol pinned (redis-py 8 changed its default) and retry/backoff
    (``retries=0``: none, for the publish transaction, which must not run twice)."""
    return Redis.from_url(
        url,
        protocol=2,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(ExponentialBackoff(cap=2.0, base=0.05), retries=retries),
        retry_on_error=[redis_errors.ConnectionError, redis_errors.TimeoutError],
        health_check_interval=30,
        **kwargs,
    )


def daemon_config(settings: Settings) -> DaemonConfig:
    return DaemonConfig(
        shard_index=settings.shard_index,
        shard_count=settings.shard_count,
        # unique per process: two processes with one name would share (and split) its entries
        consumer=consumer_token(settings.consumer),
        batch_max_size=settings.batch_max_size,
        batch_max_wait_ms=settings.batch_max_wait_ms,
        path_steps=settings.path_steps,
        path_refresh_s=settings.path_refresh_s,
        paths_per_batch_max=settings.paths_per_batch_max,
        history_maxlen=settings.history_maxlen,
        forecasts_maxlen=settings.forecasts_maxlen,
        dead_maxlen=settings.dead_maxlen,
        claim_idle_ms=settings.claim_idle_ms,
        claim_interval_s=settings.claim_interval_s,
        model_check_s=settings.model_check_s,
        retrain_interval_s=settings.retrain_interval_s,
        retrain_after_ticks=settings.retrain_after_ticks,
        skill_horizons=tuple(int(h) for h in settings.skill_horizons.split(",")),
        skill_window=settings.skill_window,
        skill_symbols=tuple(s for s in settings.skill_symbols.split(",") if s),
        limits=TickLimits(
            price_min=settings.price_min,
            price_max=settings.price_max,
            ts_max_ahead_ms=settings.ts_max_ahead_ms,
        ),
        read_max_bytes=settings.read_max_bytes,
        lease_ttl_s=settings.lease_ttl_s,
        ticks_trim_interval_s=settings.ticks_trim_interval_s,
        symbols_max=settings.symbols_max,
        symbol_idle_s=settings.symbol_idle_s,
    )


def retrain_config(settings: Settings, **overrides: Any) -> RetrainConfig:
    symbols = tuple(s for s in settings.retrain_symbols.split(",") if s)
    config = RetrainConfig(
        symbols=symbols,
        max_points=settings.retrain_max_points,
        holdout_fraction=settings.retrain_holdout_fraction,
        margin=settings.retrain_margin,
        epochs=settings.retrain_epochs,
        batch_size=settings.retrain_batch_size,
        residual=settings.retrain_residual,
        min_windows=settings.retrain_min_windows,
        time_limit_s=settings.retrain_time_limit_s,
        threads=settings.retrain_threads,
        limits=TickLimits(price_min=settings.price_min, price_max=settings.price_max),
    )
    for name, value in overrides.items():
        if value is not None:
            setattr(config, name, value)
    return config


def load_engine(settings: Settings, path: Path | None = None) -> Any:
    """Load a model and compile the shapes the daemon uses, so no tick waits for a compile."""
    from streamcast.forecaster import Forecaster

    path = path or settings.model_path
    engine = Forecaster.load(path, workers=settings.engine_workers or None)
    started = time.perf_counter()
    # every bucket a batch or its chunks can round to, for 1-step forecasts and for paths:
    # a compile in the middle of serving would stall every tick behind it for seconds
    sizes = engine.bucket_sizes(settings.batch_max_size)
    engine.warmup(batch_sizes=sizes, steps=(1, settings.path_steps))
    log.info(
        "model %s on %s (chunk %d x %d workers), %d programs compiled in %.1f s",
        engine.version,
        engine.device,
        engine.chunk_size,
        engine.workers,
        len(engine.compiled_shapes),
        time.perf_counter() - started,
    )
    return engine


async def initial_model_path(models: Registry, settings: Settings) -> Path:
    """The registry's current version (registering the configured model if there is none yet);
    the configured model when Redis cannot be reached now (the watcher catches up later)."""
    try:
        version = await asyncio.wait_for(
            models.ensure_current(settings.model_path), settings.redis_timeout_s * 2
        )
        return await models.fetch(version)
    except (redis_errors.RedisError, OSError, TimeoutError) as exc:
        log.warning(
            "model registry unavailable (%s): starting on %s",
            type(exc).__name__,
            settings.model_path,
        )
    except ModelError as exc:
        log.error(
            "the registry's current model is unusable (%s): starting on %s",
            exc,
            settings.model_path,
        )
    return settings.model_path


async def start_engine(
    models: Registry, settings: Settings, metrics: Metrics
) -> tuple[Any, str | None]:
    """Load and compile the model to serve first: the registry's current version, else the
    newest earlier promotion that loads, else the configured (packaged) model. A current version
    that will not load must not stop a restarted replica (a rolling restart would stop them
    all): say so loudly, count it, and return it as refused so the watcher does not retry it."""
    loop = asyncio.get_running_loop()
    path = await initial_model_path(models, settings)
    try:
        return await loop.run_in_executor(None, load_engine, settings, path), None
    except Exception as exc:
        if path == settings.model_path:
            raise  # the configured model itself: nothing else to fall back to
        refused = path.name
        metrics.model_load_failures.labels("invalid").inc()
        metrics.recoveries.labels("start_fallback").inc()
        log.error("the registry's current model %s does not load (%s)", refused, _short(exc))
    for version in await _earlier_versions(models, refused):
        try:
            engine = await loop.run_in_executor(
                None, load_engine, settings, await models.fetch(version)
            )
        except Exception as exc:
            log.error("the earlier version %s does not load either (%s)", version, _short(exc))
            continue
        log.warning(
            "STARTED ON %s, NOT THE CURRENT %s: fix or roll back the registry", version, refused
        )
        return engine, refused
    engine = await loop.run_in_executor(None, load_engine, settings, settings.model_path)
    log.warning(
        "STARTED ON THE CONFIGURED MODEL %s, NOT THE CURRENT %s: fix or roll back the registry",
        settings.model_path,
        refused,
    )
    return engine, refused


async def _earlier_versions(models: Registry, refused: str) -> list[str]:
    try:
        return [v for v in await models.previous_versions() if v != refused]
    except (redis_errors.RedisError, OSError):
        return []


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"


async def serve(
    settings: Settings,
    *,
    install_signals: bool = True,
    engine: Any = None,
    stop: asyncio.Event | None = None,
) -> int:
    """Run the daemon and its HTTP server until a signal (or ``stop``); return the exit status."""
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    interrupts = 0

    def on_signal(signum: int) -> None:
        nonlocal interrupts
        interrupts += 1
        if interrupts > 1 and signum == signal.SIGINT:
            log.warning("second interrupt: exiting now")
            os._exit(130)
        log.info("%s: stopping (finishing the batch in flight)", signal.Signals(signum).name)
        stop.set()

    if install_signals:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, on_signal, signum)

    log.info("redis %s, key prefix %r", settings.redis_url_redacted, settings.key_prefix)
    redis = make_redis(settings.redis_url, settings.redis_timeout_s)
    publisher = make_redis(settings.redis_url, settings.redis_timeout_s, retries=0)
    keys = Keys(settings.key_prefix)
    models = Registry(redis, keys, settings.model_cache_dir)
    prometheus = CollectorRegistry()
    metrics = Metrics(prometheus)
    daemon: Daemon | None = None
    http = HttpServer(
        prometheus,
        host=settings.http_host,
        port=settings.http_port,
        ready=lambda: daemon is not None and daemon.ready,
        heartbeat=lambda: daemon.heartbeat if daemon is not None else time.monotonic(),
        redis_ping=redis.ping,
        page=LivePage(redis, keys, skill=lambda: daemon.skill.snapshot() if daemon else {}),
        header_timeout_s=settings.http_header_timeout_s,
        keepalive_timeout_s=settings.http_keepalive_timeout_s,
        max_connections=settings.http_max_connections,
    )
    try:
        # bind first: a port in use or a host that does not resolve is one line, not a
        # traceback after seconds of compiling
        await http.start()
    except OSError as exc:
        await redis.aclose()
        await publisher.aclose()
        raise ServeError(
            f"cannot serve HTTP on {settings.http_host}:{settings.http_port} "
            f"(STREAMCAST_HTTP_HOST/_PORT): {exc.strerror or exc}"
        ) from None
    refused: str | None = None
    try:
        if engine is None:
            engine, refused = await start_engine(models, settings, metrics)
    except BaseException:
        await http.stop()
        await redis.aclose()
        await publisher.aclose()
        raise
    retrainer = Retrainer(
        redis,
        keys,
        models,
        retrain_config(settings),
        metrics=metrics,
        initial_model=settings.model_path,
    )
    daemon = Daemon(
        redis,
        engine,
        metrics,
        keys=keys,
        config=daemon_config(settings),
        registry=models,
        loader=partial(load_engine, settings),
        initial_model=settings.model_path,
        retrainer=retrainer,
        refused=refused,
        publisher=publisher,
    )
    status = 0
    try:
        await daemon.start()
        consume = asyncio.ensure_future(daemon.wait_stopped())
        stopped = asyncio.ensure_future(stop.wait())
        done, _ = await asyncio.wait({consume, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if consume in done and not stop.is_set():
            log.error("the consume loop ended unexpectedly")
            status = 1
        stopped.cancel()
        await daemon.stop(settings.shutdown_timeout_s)
    finally:
        await http.stop()
        await redis.aclose()
        await publisher.aclose()
        close = getattr(engine, "close", None)
        if close is not None:
            close()
        if install_signals:
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)
    return status
