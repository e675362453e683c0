"""Online skill: every published forecast is scored when its truth arrives.

For each symbol the daemon remembers the last 1-step forecast (scored against the symbol's next
tick) and, for every published path, its values at the tracked horizons (step 10 is scored
against the 10th tick after the path's origin, and so on). The naive forecast ("no change from
the origin price") is scored on exactly the same ticks. Errors are relative to the origin price, so
symbols at different price levels weigh alike; the arithmetic is :mod:`streamcast.scoring`'s.

Exported per horizon and model version (bounded: the newest ``keep_versions`` versions only):
running sums of squared and absolute errors (for ``rate()`` in Prometheus), the rolling MSE and
MAE over the last ``window`` scored forecasts, and the skill ``1 - MSE_model / MSE_naive`` over
that window. Per-symbol skill only for a configured short list of symbols.
"""

from __future__ import annotations

import contextlib
import math
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from streamcast.metrics import Metrics
from streamcast.scoring import RollingErrors, relative_errors
from streamcast.wire import Forecast, Tick

DEFAULT_HORIZONS = (1, 10, 50)


@dataclass
class _Path:
    values: np.ndarray  # forecast at each tracked horizon (NaN where the path is shorter)
    origin: float
    version: str
    elapsed: int = 0


class SkillTracker:
    """Scores forecasts of one replica's symbols as the ticks that are their truth arrive."""

    def __init__(
        self,
        metrics: Metrics,
        *,
        horizons: Sequence[int] = DEFAULT_HORIZONS,
        window: int = 2000,
        keep_versions: int = 3,
        symbols: Iterable[str] = (),
    ) -> None:
        if not horizons or min(horizons) < 1:
            raise ValueError(f"horizons must be positive, got {list(horizons)}")
        self.metrics = metrics
        self.horizons = tuple(sorted(set(horizons)))
        self.path_horizons = tuple(h for h in self.horizons if h > 1)
        self.window_size = window  # scored forecasts per rolling score
        self.keep_versions = keep_versions
        self.watched = set(symbols)
        self._next: dict[str, tuple[float, float, str]] = {}
        self._paths: dict[str, deque[_Path]] = {}
        # the rolling errors of each (version, horizon), and of each (watched symbol, horizon)
        self._errors: dict[tuple[str, int], RollingErrors] = {}
        self._symbol_errors: dict[tuple[str, int], RollingErrors] = {}
        self._versions: list[str] = []  # oldest first

    # -- feeding -----------------------------------------------------------------------------

    def record(self, ticks: Iterable[Tick], forecasts: Iterable[Forecast]) -> None:
        """Score pending forecasts against ``ticks`` (in stream order), then remember the new
        ``forecasts`` made from them."""
        # by symbol and id: partition streams hand out ids independently
        made = {(f.tick.symbol, f.tick.id): f for f in forecasts}
        for tick in ticks:
            self.observe(tick.symbol, tick.price)
            f = made.get((tick.symbol, tick.id))
            if f is not None:
                nxt = float("nan") if f.next is None else f.next
                self.forecast(tick.symbol, tick.price, nxt, f.path, f.model)

    def observe(self, symbol: str, price: float) -> None:
        """A new tick of ``symbol``: the truth for its pending forecasts."""
        pending = self._next.pop(symbol, None)
        if pending is not None:
            forecast, origin, version = pending
            self._score(symbol, version, 1, forecast, origin, price)
        paths = self._paths.get(symbol)
        if not paths:
            return
        for path in paths:
            self._step(symbol, path, price)
        last = self.path_horizons[-1]
        while paths and paths[0].elapsed >= last:
            paths.popleft()

    def _step(self, symbol: str, path: _Path, price: float) -> None:
        """One more tick of ``symbol`` after ``path``'s origin: scored at a tracked horizon."""
        path.elapsed += 1
        if path.elapsed in self.path_horizons:
            k = self.path_horizons.index(path.elapsed)
            value = float(path.values[k])
            if value == value:  # not NaN: the path reached this horizon
                self._score(symbol, path.version, path.elapsed, value, path.origin, price)

    def forecast(
        self,
        symbol: str,
        price: float,
        next_value: float,
        path: Sequence[float] | None,
        version: str,
    ) -> None:
        """A forecast published from a window ending at ``price``."""
        self._see_version(version)
        if 1 in self.horizons:
            self._next[symbol] = (next_value, price, version)
        if path is not None and self.path_horizons:
            values = np.array(
                [path[h - 1] if h <= len(path) else np.nan for h in self.path_horizons]
            )
            self._paths.setdefault(symbol, deque()).append(_Path(values, price, version))

    def path(
        self,
        symbol: str,
        price: float,
        path: Sequence[float],
        version: str,
        after: Sequence[float] = (),
    ) -> None:
        """A path from the window ending at ``price``, published (by the path lane) when the
        prices ``after`` had already followed it: those are scored at once, the rest as ticks
        arrive."""
        self._see_version(version)
        if not self.path_horizons:
            return
        values = np.array([path[h - 1] if h <= len(path) else np.nan for h in self.path_horizons])
        pending = _Path(values, price, version)
        for truth in after:
            self._step(symbol, pending, truth)
        if pending.elapsed < self.path_horizons[-1]:
            self._paths.setdefault(symbol, deque()).append(pending)

    def forget(self, symbols: Iterable[str]) -> None:
        for symbol in symbols:
            self._next.pop(symbol, None)
            self._paths.pop(symbol, None)

    # -- reading -----------------------------------------------------------------------------

    def skill(self, version: str, horizon: int) -> float:
        errors = self._errors.get((version, horizon))
        scores = errors.scores() if errors is not None else None
        return scores.skill if scores is not None else float("nan")

    def snapshot(self) -> dict[str, dict[int, dict[str, float]]]:
        """{version: {horizon: {skill, mse, naive_mse, mae, naive_mae, n}}}, rolling."""
        out: dict[str, dict[int, dict[str, float]]] = {}
        for (version, horizon), errors in self._errors.items():
            scores = errors.scores()
            if scores is None:
                continue
            out.setdefault(version, {})[horizon] = {
                "skill": scores.skill,
                "mse": scores.mse,
                "naive_mse": scores.naive_mse,
                "mae": scores.mae,
                "naive_mae": scores.naive_mae,
                "n": float(scores.n),
            }
        return out

    def publish(self) -> None:
        """Set the rolling gauges (the daemon calls this about once a second)."""
        m = self.metrics
        for (version, horizon), errors in self._errors.items():
            scores = errors.scores()
            if scores is None:
                continue
            h = str(horizon)
            m.skill.labels(h, version).set(scores.skill)
            m.rolling_mse.labels(h, version, "model").set(scores.mse)
            m.rolling_mse.labels(h, version, "naive").set(scores.naive_mse)
            m.rolling_mae.labels(h, version, "model").set(scores.mae)
            m.rolling_mae.labels(h, version, "naive").set(scores.naive_mae)
        for (symbol, horizon), errors in self._symbol_errors.items():
            scores = errors.scores()
            if scores is not None:
                m.symbol_skill.labels(symbol, str(horizon)).set(scores.skill)

    # -- internals ---------------------------------------------------------------------------

    def _score(
        self, symbol: str, version: str, horizon: int, forecast: float, origin: float, truth: float
    ) -> None:
        model_err, naive_err = relative_errors(forecast, truth, origin)
        if not (math.isfinite(model_err * model_err) and math.isfinite(naive_err * naive_err)):
            return  # a forecast that was withheld (not finite) or absurd: one can't poison all
        key = (version, horizon)
        errors = self._errors.get(key)
        if errors is None:
            errors = self._errors[key] = RollingErrors(self.window_size)
        errors.add(model_err, naive_err)
        m, h = self.metrics, str(horizon)
        m.squared_error.labels(h, version, "model").inc(model_err * model_err)
        m.squared_error.labels(h, version, "naive").inc(naive_err * naive_err)
        m.absolute_error.labels(h, version, "model").inc(abs(model_err))
        m.absolute_error.labels(h, version, "naive").inc(abs(naive_err))
        m.scored.labels(h, version).inc()
        if symbol in self.watched:
            key_s = (symbol, horizon)
            symbol_errors = self._symbol_errors.get(key_s)
            if symbol_errors is None:
                symbol_errors = self._symbol_errors[key_s] = RollingErrors(self.window_size)
            symbol_errors.add(model_err, naive_err)

    def _see_version(self, version: str) -> None:
        if version in self._versions:
            return
        self._versions.append(version)
        while len(self._versions) > self.keep_versions:
            self._drop_version(self._versions.pop(0))

    def _drop_version(self, version: str) -> None:
        """Forget an old version's rolling errors and label sets, so cardinality stays bounded."""
        m = self.metrics
        for horizon in self.horizons:
            self._errors.pop((version, horizon), None)
            h = str(horizon)
            for metric, extra in (
                (m.skill, ()),
                (m.scored, ()),
                (m.rolling_mse, ("model", "naive")),
                (m.rolling_mae, ("model", "naive")),
                (m.squared_error, ("model", "naive")),
                (m.absolute_error, ("model", "naive")),
            ):
                label_sets: list[tuple[str, ...]] = [(h, version, e) for e in extra]
                for labels in label_sets or [(h, version)]:
                    with contextlib.suppress(KeyError):
                        metric.remove(*labels)
