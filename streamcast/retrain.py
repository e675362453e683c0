"""Retraining from the history store and gated promotion; the trainer child process it runs is
``streamcast.trainer``.

One retrain (``Retrainer.run_once``), from ``streamcast retrain`` or the daemon's schedule:

1. take the cluster-wide lock (``SET NX PX``; renewed while the trainer runs, released by token),
   so at most one retrain runs across all replicas;
2. fetch the current version from the registry and write the trainer's job: what to read and
   where (the Redis URL, password included, in a file only this user can read);
3. run the trainer in a child process (``python -m streamcast.trainer JOB_DIR``: never on the
   event loop, at a lower CPU priority, one TensorFlow thread by default, killed past the time
   limit or when the parent dies). With a Redis client of its own it reads the newest
   ``max_points`` of each symbol's history (paged, bounded: the daemon's event loop never
   waits on it), skips when too little is usable, scores the current model on the most recent
   ``holdout_fraction`` of each symbol's windows, trains the candidate on the rest
   (warm-started from the current weights), scores it on the same windows, and saves it;
4. promote the candidate only if its held-out MSE beats the current one's by ``margin``; record
   the outcome, both scores, the naive forecast's and the reason in the log, the metrics and the
   registry's event stream, whatever happened.

Every failure (a crashing, hanging or NaN-producing trainer, too little history, Redis gone)
ends as outcome ``failed`` or ``skipped`` with a reason; serving never notices. The child
reports what it read in ``read.json`` and its outcome in ``result.json``: a candidate, or a
``skipped``/``failed`` outcome and its reason (too little history, Redis unreachable).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import secrets
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from redis import exceptions as redis_errors
from redis.asyncio import Redis

from streamcast.connect import REDIS_DOWN
from streamcast.history import HistorySource
from streamcast.keys import Keys
from streamcast.metrics import Metrics
from streamcast.model import ModelError
from streamcast.registry import PromotionConflict, Registry, check_version
from streamcast.wire import TickLimits

log = logging.getLogger(__name__)

OUTCOMES = ("promoted", "rejected", "failed", "skipped")

_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('del', KEYS[1])
end
return 0
"""


@dataclass
class RetrainConfig:
    """How a retrain runs, with the defaults the service runs it with.

    The setting ``STREAMCAST_RETRAIN_<NAME>`` is the field ``<name>`` (``margin`` is
    ``STREAMCAST_RETRAIN_MARGIN``); fields without a setting keep their default in the service.
    When to retrain (``STREAMCAST_RETRAIN_INTERVAL_S``, ``..._AFTER_TICKS``) is the daemon's.
    """

    symbols: tuple[str, ...] = ()  # empty: every symbol with history
    max_points: int = 5_000  # newest prices read per symbol
    holdout_fraction: float = 0.1  # most recent windows of each symbol, never trained on
    margin: float = 0.01  # promote when candidate MSE < current MSE * (1 - margin)
    epochs: int = 2
    batch_size: int = 32
    learning_rate: float | None = None
    residual: bool | None = None  # None: as the current model
    warm_start: bool = True  # start from the current weights when the architecture allows
    min_windows: int = 200  # fewer training windows than this: skipped
    time_limit_s: float = 900.0
    lock_ttl_s: float = 30.0
    threads: int = 1  # TensorFlow threads in the trainer (0: TensorFlow's default)
    nice: int = 19  # the trainer's CPU priority: the lowest, so that serving comes first
    seed: int = 0
    # the live edge's price rules, applied again to what is read from the history (positive:
    # set from whether the current model is normalised)
    limits: TickLimits = field(default_factory=TickLimits)


@dataclass
class RetrainResult:
    outcome: str  # one of OUTCOMES
    reason: str
    current: str | None = None
    candidate: str | None = None
    candidate_mse: float | None = None
    current_mse: float | None = None
    naive_mse: float | None = None
    windows: int = 0
    seconds: float = 0.0
    skipped: dict[str, int] = field(default_factory=dict)  # bad prices left out, by symbol

    def event(self) -> dict[str, Any]:
        out = asdict(self)
        out["event"] = "retrain"
        out["skipped"] = ",".join(f"{k}:{v}" for k, v in self.skipped.items()) or None
        return out


class RetrainLock:
    """A lock with an expiry, renewed by its holder, released only by the token that took it."""

    def __init__(self, redis: Redis, key: str, ttl_s: float) -> None:
        self.redis = redis
        self.key = key
        self.ttl_ms = max(1000, int(ttl_s * 1000))
        self.token = secrets.token_hex(16)
        self._renew = redis.register_script(_RENEW)
        self._release = redis.register_script(_RELEASE)

    async def acquire(self) -> bool:
        return bool(await self.redis.set(self.key, self.token, nx=True, px=self.ttl_ms))

    async def renew(self) -> bool:
        return bool(await self._renew(keys=[self.key], args=[self.token, self.ttl_ms]))

    async def release(self) -> bool:
        return bool(await self._release(keys=[self.key], args=[self.token]))


def worker_command() -> list[str]:
    return [sys.executable, "-m", "streamcast.trainer"]


class Retrainer:
    """Runs retrains for one deployment; ``run_once`` never raises but for cancellation."""

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        registry: Registry,
        config: RetrainConfig | None = None,
        *,
        metrics: Metrics | None = None,
        initial_model: Path | None = None,
        command: Sequence[str] | None = None,
        history_url: str | None = None,
    ) -> None:
        """``history_url``: where the trainer child reads the history (it carries the password;
        default: rebuilt from ``redis``'s own connection settings)."""
        self.redis = redis
        self.keys = keys
        self.registry = registry
        self.config = config or RetrainConfig()
        self.metrics = metrics
        self.initial_model = initial_model
        self.command = list(command) if command is not None else worker_command()
        self.history_url = history_url

    async def run_once(self) -> RetrainResult:
        started = time.monotonic()
        lock = RetrainLock(self.redis, self.keys.retrain_lock, self.config.lock_ttl_s)
        try:
            if not await lock.acquire():
                result = RetrainResult("skipped", "another replica holds the retrain lock")
                result.seconds = time.monotonic() - started
                self._count(result)
                log.info("retrain skipped: %s", result.reason)
                return result
        except REDIS_DOWN as exc:
            result = RetrainResult("failed", f"redis unavailable ({type(exc).__name__})")
            result.seconds = time.monotonic() - started
            self._count(result)
            log.warning("retrain failed: %s", result.reason)
            return result
        try:
            result = await self._run(lock)
        except REDIS_DOWN as exc:
            result = RetrainResult(
                "failed", f"redis unavailable mid-retrain ({type(exc).__name__})"
            )
        except ModelError as exc:
            result = RetrainResult("failed", str(exc))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("retrain failed")
            result = RetrainResult("failed", f"{type(exc).__name__}: {exc}")
        finally:
            with contextlib.suppress(*REDIS_DOWN, redis_errors.RedisError):
                await lock.release()
        result.seconds = time.monotonic() - started
        await self._report(result)
        return result

    # -- one retrain ---------------------------------------------------------------------------

    async def _run(self, lock: RetrainLock) -> RetrainResult:
        cfg = self.config
        current = await self.registry.current()
        if current is None:
            if self.initial_model is None:
                return RetrainResult("skipped", "no current model in the registry")
            await self.registry.ensure_current(self.initial_model)
            current = await self.registry.current()
            assert current is not None
        current_dir = await self.registry.fetch(current.version)
        info = await self.registry.info(current.version)
        task = TrainerJob(
            replace(cfg, limits=replace(cfg.limits, positive=info.normalise)),
            current_dir,
            HistorySource.of(self.redis, self.keys, self.history_url),
            info.seq_len,
        )
        log.info(
            "retraining %s: the trainer reads the history of %s",
            current.version,
            ", ".join(cfg.symbols) or "every symbol",
        )
        base = RetrainResult("skipped", "", current=current.version)
        # mkdtemp's directory is its user's alone (0700), and the job in it too (0600)
        with tempfile.TemporaryDirectory(prefix="streamcast-retrain-") as tmp:
            job = Path(tmp)
            task.write(job)
            failure = await self._spawn(job, lock)
            notes = _histories_read(job, base)
            if failure is not None:
                base.outcome, base.reason = "failed", _with_notes(failure, notes)
                return base
            result = await self._decide(job, base)
        result.reason = _with_notes(result.reason, notes)
        return result

    async def _spawn(self, job: Path, lock: RetrainLock) -> str | None:
        """Run the trainer; None when it exited 0, else why it failed (it is killed if need be)."""
        cfg = self.config
        log_path = job / "trainer.log"
        with log_path.open("wb") as out:
            proc = await asyncio.create_subprocess_exec(
                *self.command, str(job), stdout=out, stderr=asyncio.subprocess.STDOUT
            )
        deadline = time.monotonic() + cfg.time_limit_s
        renew_every = lock.ttl_ms / 3000
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    return (
                        f"trainer exceeded its time limit of {cfg.time_limit_s:g} s and was killed"
                    )
                try:
                    await asyncio.wait_for(proc.wait(), min(renew_every, left))
                    break
                except TimeoutError:
                    pass
                try:
                    if not await lock.renew():
                        return "lost the retrain lock while training (expired); trainer killed"
                except REDIS_DOWN as exc:
                    return f"redis unavailable mid-retrain ({type(exc).__name__}); trainer killed"
        finally:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        rc = await proc.wait()
        if rc != 0:
            tail = _tail(log_path)
            how = f"killed by signal {-rc}" if rc < 0 else f"exited with status {rc}"
            return f"trainer {how}" + (f": {tail}" if tail else "")
        return None

    async def _decide(self, job: Path, result: RetrainResult) -> RetrainResult:
        try:
            raw = json.loads((job / "result.json").read_text(encoding="utf-8"))
            if "outcome" in raw:  # the trainer stopped before training: too little history, ...
                if raw["outcome"] not in ("skipped", "failed"):
                    raise ValueError(f"outcome {raw['outcome']!r}")
                result.outcome, result.reason = raw["outcome"], str(raw["reason"])
                return result
            candidate_dir = Path(raw["candidate_dir"])
            scores = {k: float(raw[k]) for k in ("candidate_mse", "current_mse", "naive_mse")}
            result.candidate = check_version(raw["version"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            result.outcome, result.reason = "failed", f"trainer left no usable result ({exc})"
            return result
        result.candidate_mse = scores["candidate_mse"]
        result.current_mse = scores["current_mse"]
        result.naive_mse = scores["naive_mse"]
        if not all(math.isfinite(v) for v in scores.values()):
            result.outcome = "failed"
            result.reason = "the candidate's held-out MSE is not finite (NaN or inf): not promoted"
            return result
        cand, cur, margin = scores["candidate_mse"], scores["current_mse"], self.config.margin
        gain = 1 - cand / cur if cur > 0 else 0.0
        if cand < cur * (1 - margin):
            result.outcome = "promoted"
            result.reason = (
                f"held-out MSE {cand:.4g} beats the current {cur:.4g} by {gain:.1%} "
                f"(margin {margin:.1%})"
            )
            try:
                await self.registry.register(candidate_dir)
                await self.registry.promote(
                    result.candidate, reason=result.reason, expect=result.current
                )
            except PromotionConflict as exc:
                result.outcome, result.reason = "failed", f"not promoted: {exc}"
        else:
            result.outcome = "rejected"
            result.reason = (
                f"held-out MSE {cand:.4g} does not beat the current {cur:.4g} by the margin "
                f"{margin:.1%} (change {gain:+.1%})"
            )
        return result

    # -- reporting -----------------------------------------------------------------------------

    def _count(self, result: RetrainResult) -> None:
        if self.metrics is not None:
            self.metrics.retrains.labels(result.outcome).inc()

    async def _report(self, result: RetrainResult) -> None:
        self._count(result)
        level = logging.WARNING if result.outcome == "failed" else logging.INFO
        log.log(
            level,
            "retrain %s in %.1f s: %s (candidate %s, current %s, naive %s)",
            result.outcome,
            result.seconds,
            result.reason,
            _fmt(result.candidate_mse),
            _fmt(result.current_mse),
            _fmt(result.naive_mse),
        )
        if self.metrics is not None:
            m = self.metrics
            if result.outcome != "skipped":
                m.retrain_seconds.observe(result.seconds)
            for name, value in (
                ("candidate", result.candidate_mse),
                ("current", result.current_mse),
                ("naive", result.naive_mse),
            ):
                if value is not None and math.isfinite(value):
                    m.retrain_holdout_mse.labels(name).set(value)
        if result.outcome == "skipped":
            return
        try:
            await self.registry.add_event(result.event())
        except REDIS_DOWN:
            log.warning("could not record the retrain outcome in the registry (redis down)")


def _histories_read(job: Path, result: RetrainResult) -> list[str]:
    """What the trainer read (``read.json``) into ``result``; its notes, one per symbol with a
    problem. A trainer that read nothing (it crashed first, or is a stand-in) leaves it as is."""
    try:
        raw = json.loads((job / "read.json").read_text(encoding="utf-8"))
        windows, notes = int(raw["windows"]), [str(note) for note in raw["notes"]]
        skipped = {str(name): int(n) for name, n in raw["skipped"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []
    result.windows, result.skipped = windows, skipped
    return notes


def _with_notes(reason: str, notes: list[str]) -> str:
    return reason + "".join(f"; {note}" for note in notes)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _tail(path: Path, lines: int = 3) -> str:
    """The trainer's own last word (a ``trainer:`` line), else the last lines of its output."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
    except OSError:
        return ""
    own = [line for line in text if line.startswith("trainer:")]
    if own:
        return own[-1].removeprefix("trainer:").strip()[-500:]
    return " | ".join(line.strip() for line in text[-lines:])[-500:]


# -- the job the trainer child process is handed (streamcast.trainer) ---------------------------


@dataclass
class TrainerJob:
    """What the parent hands the trainer child: ``job.json`` in JOB_DIR.

    The file holds the Redis URL, password included: it is created readable by its user only,
    in a directory that is its user's alone, and the child's command line names the directory.
    """

    config: RetrainConfig  # its limits as the current model needs them (positive if normalised)
    current_dir: Path  # the current model, fetched from the registry
    source: HistorySource  # where the child reads the histories
    seq_len: int  # the current model's window

    @property
    def min_points(self) -> int:
        """A symbol needs held-out and training windows: 2 x (window + 1) prices at least."""
        return 2 * (self.seq_len + 1)

    def write(self, job: Path) -> None:
        spec = {
            **asdict(self.config),
            "current_dir": str(self.current_dir),
            "seq_len": self.seq_len,
            "history": self.source.as_dict(),
        }
        fd = os.open(job / "job.json", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump(spec, out)

    @classmethod
    def read(cls, job: Path) -> TrainerJob:
        """The job in ``job``; a setting missing from its JSON takes RetrainConfig's default."""
        spec = json.loads((job / "job.json").read_text(encoding="utf-8"))
        names = {f.name for f in fields(RetrainConfig)}
        values = {k: v for k, v in spec.items() if k in names}
        if "symbols" in values:
            values["symbols"] = tuple(values["symbols"])
        if "limits" in values:
            values["limits"] = TickLimits(**values["limits"])
        return cls(
            RetrainConfig(**values),
            Path(spec["current_dir"]),
            HistorySource.from_dict(spec["history"]),
            int(spec["seq_len"]),
        )
