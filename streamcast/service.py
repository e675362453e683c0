"""Wiring for ``streamcast serve``: settings -> Redis client, engine, daemon, HTTP, signals.

Signals are handled here alone (and can be switched off for tests): the first SIGTERM or SIGINT
stops reading, finishes the batch in flight, publishes, acks and exits 0; a second SIGINT exits
at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from redis import exceptions as redis_errors
from redis.asyncio import Redis

from streamcast.connect import make_redis
from streamcast.daemon import Daemon
from streamcast.daemon.config import DaemonConfig
from streamcast.daemon.paths import lane_steps
from streamcast.daemon.source import read_cap
from streamcast.engine import Engine
from streamcast.http import HttpServer
from streamcast.keys import Keys
from streamcast.live import LivePage, MetricsStatus
from streamcast.metrics import Metrics
from streamcast.model import ModelError
from streamcast.registry import Registry
from streamcast.retrain import Retrainer
from streamcast.settings import Settings, build, daemon_config, retrain_config
from streamcast.tasks import within

log = logging.getLogger(__name__)


def most_rows(settings: Settings) -> int:
    """The most windows one engine call of the daemon holds: a read's (up to one more per
    partition: COUNT is per stream), conflating reads included, or a group of the path lane."""
    read = read_cap(build(DaemonConfig, settings)) + settings.partitions
    return max(read, settings.paths_per_batch_max)


class ServeError(RuntimeError):
    """The daemon cannot start as configured (the text says which setting and why)."""


def load_engine(settings: Settings, path: Path | None = None) -> Any:
    """Load a model and compile the shapes the daemon uses, so no tick waits for a compile."""
    from streamcast.forecaster import Forecaster

    path = path or settings.model_path
    engine = Forecaster.load(
        path, workers=settings.engine_workers or None, batching=settings.engine_batching
    )
    started = time.perf_counter()
    # every bucket a batch or its chunks can round to, for 1-step forecasts and the path lane's
    # steps: a compile in the middle of serving would stall every tick behind it for seconds
    sizes = engine.bucket_sizes(most_rows(settings))
    engine.warmup(batch_sizes=sizes, steps=lane_steps(settings.path_steps))
    # the engine's objects live as long as it does: out of the collector's sight. With TensorFlow
    # loaded a full collection walks ~4e5 objects (~0.3 s on this project's CI machine), a stall
    # of the event loop and so of every tick in flight (bench/latency.py found it)
    gc.freeze()
    log.info(
        "model %s on %s (%s, chunk %d x %d workers), %d programs compiled in %.1f s",
        engine.version,
        engine.device,
        engine.batching,
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
        version = await within(
            models.ensure_current(settings.model_path), settings.redis_timeout_s * 2
        )
        if version is None:
            raise TimeoutError("no reply in time")
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


@dataclass
class _Wiring:
    """What one ``serve`` opens: the clients and the registries, closed together."""

    settings: Settings
    redis: Redis
    publisher: Redis  # the publish script's and the reads' client: it never retries by itself
    keys: Keys
    models: Registry
    prometheus: CollectorRegistry
    metrics: Metrics
    daemon: Daemon | None = None

    @classmethod
    def open(cls, settings: Settings) -> _Wiring:
        redis = build(make_redis, settings, "redis_")
        keys = settings.keys  # the prefix and the partition count
        prometheus = CollectorRegistry()
        return cls(
            settings,
            redis,
            build(make_redis, settings, "redis_", retries=0),
            keys,
            Registry(redis, keys, settings.model_cache_dir),
            prometheus,
            Metrics(prometheus),
        )

    async def close(self) -> None:
        await self.redis.aclose()
        await self.publisher.aclose()

    def http_server(self) -> HttpServer:
        def daemon_ready() -> bool:
            return self.daemon is not None and self.daemon.ready

        def heartbeat() -> float:
            return self.daemon.heartbeat if self.daemon is not None else time.monotonic()

        def skill() -> dict[str, Any]:
            return self.daemon.skill.snapshot() if self.daemon is not None else {}

        return build(
            HttpServer,
            self.settings,
            "http_",
            prometheus=self.prometheus,
            ready=daemon_ready,
            heartbeat=heartbeat,
            redis_ping=self.redis.ping,
            page=LivePage(
                self.redis, self.keys, skill=skill, status=MetricsStatus(self.prometheus)
            ),
        )

    def make_daemon(self, engine: Engine, refused: str | None) -> Daemon:
        settings = self.settings
        retrainer = Retrainer(
            self.redis,
            self.keys,
            self.models,
            retrain_config(settings),
            metrics=self.metrics,
            initial_model=settings.model_path,
            history_url=settings.redis_url,  # the trainer child reads the history itself
        )
        self.daemon = Daemon(
            self.redis,
            engine,
            self.metrics,
            keys=self.keys,
            config=daemon_config(settings),
            registry=self.models,
            loader=partial(load_engine, settings),
            initial_model=settings.model_path,
            retrainer=retrainer,
            refused=refused,
            publisher=self.publisher,
        )
        return self.daemon


async def serve(
    settings: Settings,
    *,
    install_signals: bool = True,
    engine: Engine | None = None,
    stop: asyncio.Event | None = None,
) -> int:
    """Run the daemon and its HTTP server until a signal (or ``stop``); return the exit status."""
    stop = stop or asyncio.Event()
    log.info("redis %s, key prefix %r", settings.redis_url_redacted, settings.key_prefix)
    wiring = _Wiring.open(settings)
    try:
        with _signals(stop, install_signals):
            http = wiring.http_server()
            await _bind(http, settings)
            try:
                refused: str | None = None
                if engine is None:
                    engine, refused = await start_engine(wiring.models, settings, wiring.metrics)
                return await _run(wiring.make_daemon(engine, refused), stop)
            finally:
                await http.stop()
    finally:
        await wiring.close()
        serving = wiring.daemon.engine if wiring.daemon is not None else engine
        if serving is not None:
            serving.close()


async def _bind(http: HttpServer, settings: Settings) -> None:
    """Bind first: a port in use or a host that does not resolve is one line, not a traceback
    after seconds of compiling."""
    try:
        await http.start()
    except OSError as exc:
        raise ServeError(
            f"cannot serve HTTP on {settings.http_host}:{settings.http_port} "
            f"(STREAMCAST_HTTP_HOST/_PORT): {exc.strerror or exc}"
        ) from None


async def _run(daemon: Daemon, stop: asyncio.Event) -> int:
    """Run the daemon until ``stop``; 1 if its consume loop ended by itself. The daemon is
    stopped however this ends (a cancelled serve too: its clients are closed next)."""
    status = 0
    await daemon.start()
    consume = asyncio.ensure_future(daemon.wait_stopped())
    stopped = asyncio.ensure_future(stop.wait())
    try:
        done, _ = await asyncio.wait({consume, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if consume in done and not stop.is_set():
            log.error("the consume loop ended unexpectedly")
            status = 1
    finally:
        stopped.cancel()
        await daemon.stop()  # drains the batch in flight: `consume` must not be cancelled first
        consume.cancel()
    return status


@contextlib.contextmanager
def _signals(stop: asyncio.Event, install: bool) -> Iterator[None]:
    """The first SIGTERM/SIGINT sets ``stop``; a second SIGINT exits at once. After, the handlers
    from before (the command line's: a SIGTERM while closing ends the process, ``terminated``)."""
    if not install:
        yield
        return
    loop = asyncio.get_running_loop()
    interrupts = 0

    def on_signal(signum: int) -> None:
        nonlocal interrupts
        interrupts += 1
        if interrupts > 1 and signum == signal.SIGINT:
            log.warning("second interrupt: exiting now")
            os._exit(130)
        log.info("%s: stopping (finishing the batch in flight)", signal.Signals(signum).name)
        stop.set()

    before = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    for signum in before:
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        yield
    finally:
        for signum, handler in before.items():
            loop.remove_signal_handler(signum)  # which leaves the default, not what was before
            if handler is not None:
                signal.signal(signum, handler)
