"""The engine's part of a batch, off the event loop: its 1-step forecasts (paths are the path
lane's, streamcast.daemon.paths)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any

import numpy as np

from streamcast.daemon.batch import Batch
from streamcast.daemon.calibration import Calibration
from streamcast.engine import Engine
from streamcast.metrics import Metrics
from streamcast.wire import DeadLetter, Forecast

log = logging.getLogger(__name__)


async def compute(
    batch: Batch,
    engine: Engine,
    *,
    executor: Executor | None,
    metrics: Metrics,
    clock: Callable[[], float] = time.time,
    calibration: Calibration | None = None,
) -> None:
    """Fill ``batch.forecasts`` (with their bands when ``calibration`` is given); a window the
    engine fails on makes its tick an ``unforecastable`` dead letter, and only that one."""
    if not batch.ready:
        return
    windows = np.stack(batch.windows)
    started = time.perf_counter()
    batch.version = engine.version
    batch.compute_started = clock()
    loop = asyncio.get_running_loop()
    next_prices, failed = await loop.run_in_executor(
        executor, rows_apart, engine.predict_next, windows, ()
    )
    batch.computed_at = clock()
    bands: list[dict[str, Any] | None] = [None] * len(batch.ready)
    if calibration is not None:
        bands, vols = calibration.bands(batch.ready, windows, next_prices, {})
        batch.vols = {(t.symbol, t.id): float(v) for t, v in zip(batch.ready, vols, strict=True)}
    _forecasts(batch, next_prices, failed, bands)
    seconds = time.perf_counter() - started
    metrics.engine_seconds.observe(seconds)
    metrics.stage_seconds.labels("wait").observe(max(0.0, batch.compute_started - batch.read_at))
    metrics.stage_seconds.labels("compute").observe(seconds)


def _forecasts(
    batch: Batch,
    next_prices: np.ndarray,
    failed: dict[int, str],
    bands: list[dict[str, Any] | None],
) -> None:
    for i, tick in enumerate(batch.ready):
        why = failed.get(i)
        if why is not None:
            letter = DeadLetter(tick.id, "unforecastable", why, {"symbol": tick.symbol})
            batch.dead_letter(tick.symbol, letter)
            continue
        batch.forecasts.append(Forecast.of(tick, batch.version, next_prices[i], None, bands[i]))


def rows_apart(
    compute: Callable[[np.ndarray], np.ndarray], windows: np.ndarray, row_shape: tuple[int, ...]
) -> tuple[np.ndarray, dict[int, str]]:
    """Run ``compute`` on the batch; if it raises, row by row, so one symbol's bad window fails
    only its own forecast (NaN, with the reason by row index), never the batch."""
    try:
        return compute(windows), {}
    except Exception:
        pass
    out = np.full((len(windows), *row_shape), np.nan)
    failed: dict[int, str] = {}
    for i in range(len(windows)):
        try:
            out[i] = np.asarray(compute(windows[i : i + 1]))[0]
        except Exception as exc:
            failed[i] = f"{type(exc).__name__}: {exc}"
    if failed:
        log.error(
            "the engine failed on %d of %d windows (first: %s); their ticks are dead letters",
            len(failed),
            len(windows),
            next(iter(failed.values())),
        )
    return out, failed
