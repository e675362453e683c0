"""Beside the consume loop, once a second: the heartbeat, the owned partitions' lag and the
gauges (skill, model age, path age, readiness, symbols); every ``claim_interval_s``, reclaiming
entries of dead consumers; every ``SAVE_S``, storing the interval calibration (a restart, or the
replica that takes a partition, goes on from it: at most that much of its updates is lost)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from redis import exceptions as redis_errors

from streamcast.daemon.calibration import Calibration
from streamcast.daemon.config import DaemonConfig
from streamcast.daemon.faults import REDIS_DOWN
from streamcast.daemon.paths import PathLane
from streamcast.daemon.plan import Planner
from streamcast.daemon.source import Source
from streamcast.metrics import Metrics
from streamcast.skill import SkillTracker

log = logging.getLogger(__name__)

SAVE_S = 5.0  # how often the interval calibration is stored (a restart goes on from it)


class Housekeeping:
    def __init__(
        self,
        source: Source,
        planner: Planner,
        skill: SkillTracker,
        paths: PathLane,
        config: DaemonConfig,
        metrics: Metrics,
        *,
        calibration: Calibration | None = None,
        ready: Callable[[], bool],
        owned: Callable[[], list[int]],
        promoted_at: Callable[[], float | None],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.source = source
        self.planner = planner
        self.skill = skill
        self.paths = paths
        self.config = config
        self.metrics = metrics
        self.ready = ready
        self.calibration = calibration
        self.owned = owned
        self.promoted_at = promoted_at
        self.clock = clock
        self.heartbeat = 0.0  # monotonic time of the last round: /healthz goes stale without it

    async def run_forever(self) -> None:
        last_claim = last_save = 0.0
        while True:
            self.heartbeat = time.monotonic()
            try:
                if time.monotonic() - last_claim >= self.config.claim_interval_s and self.ready():
                    last_claim = time.monotonic()
                    await self.source.reclaim(self.owned())
                if self.calibration is not None and time.monotonic() - last_save >= SAVE_S:
                    last_save = time.monotonic()
                    await self.calibration.save()
                await self.source.measure_lag(self.owned())
            except REDIS_DOWN:
                pass
            except redis_errors.ResponseError as exc:
                log.debug("housekeeping: %s", exc)
            except Exception:
                # keep the heartbeat and metrics going, but make the fault visible
                log.exception("housekeeping failed")
            self.gauges()
            await asyncio.sleep(1.0)

    def gauges(self) -> None:
        m = self.metrics
        self.skill.publish()
        if self.calibration is not None:
            self.calibration.publish()
        promoted_at = self.promoted_at()
        if promoted_at is not None:
            m.model_age.set(max(0.0, time.time() - promoted_at))
        m.path_age.set(self.paths.path_age(self.clock()))
        m.ready.set(1 if self.ready() else 0)
        m.symbols.set(len(self.planner.windows))
