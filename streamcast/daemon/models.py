"""The model lifecycle inside the daemon: watch the registry, load a new current version off the
event loop, hand it to the consume loop for a swap between two batches; and the retrain schedule.

A version of the same architecture is staged as weights for the serving engine (no compile);
any other is loaded and warmed as a new engine. Each forecast carries the version that computed
it. A version that fails to load is refused (not retried) and the serving one goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from redis import exceptions as redis_errors

from streamcast.daemon.batch import Stats
from streamcast.daemon.config import DaemonConfig
from streamcast.daemon.faults import REDIS_DOWN
from streamcast.engine import Engine, Staged
from streamcast.keys import Keys
from streamcast.logs import RateLimitedLog
from streamcast.metrics import Metrics
from streamcast.model import ModelError

if TYPE_CHECKING:
    from streamcast.registry import Registry
    from streamcast.retrain import Retrainer

log = logging.getLogger(__name__)

LOAD_NICE = 10  # loading and compiling a new version yields the cores to serving


@dataclass
class Incoming:
    """A version ready to serve: weights staged for ``serving``, or a new engine."""

    version: str
    serving: Engine  # the engine that served when it was prepared
    staged: Staged | None = None
    engine: Engine | None = None

    def discard(self) -> None:
        if self.engine is not None:
            self.engine.close()


class ModelWatcher:
    """Loads each new current version of the registry (announced, or found by a periodic check)."""

    def __init__(
        self,
        registry: Registry,
        keys: Keys,
        loader: Callable[[Path], Engine],
        config: DaemonConfig,
        metrics: Metrics,
        serving: Callable[[], Engine],
    ) -> None:
        self.registry = registry
        self.keys = keys
        self.loader = loader
        self.metrics = metrics
        self.serving = serving
        self.check_s = config.model_check_s
        self.initial_model: Path | None = None  # registered when the registry has no version
        self.refused: str | None = None  # a version that failed to load: not retried
        self.promoted_at: float | None = None
        self.incoming: Incoming | None = None  # taken by the consume loop between two batches
        self._say = RateLimitedLog(log, every_s=60.0)

    def swap(self, serving: Engine) -> Engine:
        """Put the incoming version in service; return the engine to serve from now on."""
        incoming, self.incoming = self.incoming, None
        assert incoming is not None
        was = serving.version
        if incoming.staged is not None:
            # staged weights for the running engine: its compiled programs serve the new version
            if incoming.serving is not serving:
                log.warning("dropping weights staged for an engine no longer serving")
                return serving
            incoming.staged.apply()
            new = serving
        else:
            assert incoming.engine is not None
            serving.close()
            new = incoming.engine
        self.metrics.model_info.clear()
        self.metrics.model_info.labels(new.version).set(1)
        self.metrics.model_swaps.inc()
        log.info("serving model %s (was %s)", new.version, was)
        return new

    def close(self) -> None:
        if self.incoming is not None:
            self.incoming.discard()
            self.incoming = None

    async def watch_forever(self) -> None:
        pubsub: Any = None
        try:
            while True:
                try:
                    if pubsub is None:
                        pubsub = await self.registry.subscribe()
                    await self.check()
                    await pubsub.get_message(ignore_subscribe_messages=True, timeout=self.check_s)
                except (*REDIS_DOWN, redis_errors.RedisError) as exc:
                    await _close_quietly(pubsub)
                    pubsub = None
                    log.debug("model watcher: %s", exc)
                    await asyncio.sleep(min(5.0, self.check_s))
                except Exception:
                    log.exception("model watcher failed; checking again later")
                    await asyncio.sleep(self.check_s)
        finally:
            await _close_quietly(pubsub)

    async def check(self) -> None:
        """Prepare the registry's current version if it is new to this replica."""
        try:
            current = await self.registry.current()
        except ModelError as exc:  # a hand-edited entry: serve on until it is mended
            self._say(logging.WARNING, "current", "%s; serving %s on", exc, self.serving().version)
            return
        if current is None:
            if self.initial_model is not None:
                await self.registry.ensure_current(self.initial_model)
            return
        self.promoted_at = current.promoted_at
        serving = self.serving()
        waiting = self.incoming.version if self.incoming is not None else None
        version = current.version
        if version in (serving.version, waiting, self.refused):
            return
        log.info("model %s was promoted (%s): loading it", version, current.reason)
        started = time.perf_counter()
        incoming = await self._prepare(version, serving)
        if incoming is None:
            return
        if self.incoming is not None:
            self.incoming.discard()
        self.incoming = incoming
        how = "weights staged" if incoming.staged is not None else "loaded and warmed"
        log.info("model %s %s in %.1f s", version, how, time.perf_counter() - started)

    async def _prepare(self, version: str, serving: Engine) -> Incoming | None:
        loader = self.loader

        def prepare(path: Path) -> Incoming:
            # same architecture: only the weights change, no compile; else a new engine
            staged = serving.stage(path)
            if staged is not None:
                return Incoming(version, serving, staged=staged)
            return Incoming(version, serving, engine=loader(path))

        try:
            path = await self.registry.fetch(version)
            incoming = await _in_background(prepare, path)
        except ModelError as exc:
            self._refuse(version, "invalid", str(exc))
            return None
        except (*REDIS_DOWN, redis_errors.RedisError):
            raise
        except Exception as exc:
            log.exception("loading model %s failed", version)
            self._refuse(version, "error", f"{type(exc).__name__}: {exc}")
            return None
        if incoming.engine is not None and incoming.engine.seq_len != serving.seq_len:
            incoming.discard()
            self._refuse(
                version,
                "mismatch",
                f"window length {incoming.engine.seq_len}, but this replica keeps "
                f"{serving.seq_len}",
            )
            return None
        return incoming

    def _refuse(self, version: str, reason: str, detail: str) -> None:
        self.refused = version
        self.metrics.model_load_failures.labels(reason).inc()
        log.error(
            "refusing model %s, still serving %s: %s", version, self.serving().version, detail
        )


async def _close_quietly(pubsub: Any) -> None:
    if pubsub is not None:
        with contextlib.suppress(Exception):
            await pubsub.aclose()


async def _in_background(prepare: Callable[[Path], Incoming], path: Path) -> Incoming:
    """Load (and compile) a model on a fresh thread at a lower CPU priority.

    On Linux a thread has its own nice value and the threads it starts inherit it, so the compile
    and the engine's warm-up workers run behind serving. The warm-up workers are stopped afterwards
    (``close``); the engine starts new ones, at normal priority, from the thread that serves.
    """

    def run() -> Incoming:
        with contextlib.suppress(OSError, AttributeError):  # per-thread nice: Linux only
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), LOAD_NICE)
        incoming = prepare(path)
        if incoming.engine is not None:
            incoming.engine.close()
        return incoming

    executor = ThreadPoolExecutor(1, thread_name_prefix="model-load")
    try:
        return await asyncio.get_running_loop().run_in_executor(executor, run)
    finally:
        executor.shutdown(wait=False)


class RetrainSchedule:
    """Retrain every ``interval_s`` and/or after ``after_ticks`` ticks accepted on this replica."""

    def __init__(
        self,
        retrainer: Retrainer,
        stats: Stats,
        config: DaemonConfig,
        redis_ok: Callable[[], bool],
    ) -> None:
        self.retrainer = retrainer
        self.stats = stats
        self.interval_s = config.retrain_interval_s
        self.after_ticks = config.retrain_after_ticks
        self.redis_ok = redis_ok

    @property
    def enabled(self) -> bool:
        return self.interval_s > 0 or self.after_ticks > 0

    async def run_forever(self) -> None:
        last, counted_from = time.monotonic(), self.stats.accepted
        while True:
            await asyncio.sleep(1.0)
            timed = self.interval_s > 0 and time.monotonic() - last >= self.interval_s
            counted = (
                self.after_ticks > 0 and self.stats.accepted - counted_from >= self.after_ticks
            )
            if not (timed or counted) or not self.redis_ok():
                continue
            last, counted_from = time.monotonic(), self.stats.accepted
            try:
                await self.retrainer.run_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # run_once reports its own failures; this would be a bug
                log.exception("retrain schedule: unexpected failure")
