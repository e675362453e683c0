"""Log lines that anyone outside can trigger, folded so that they cannot flood the log."""

from __future__ import annotations

import logging
import time


class RateLimitedLog:
    """At most one line per key every ``every_s``, saying how many were folded into it."""

    def __init__(self, logger: logging.Logger, every_s: float = 10.0) -> None:
        self.logger = logger
        self.every_s = every_s
        self._last: dict[str, float] = {}
        self._folded: dict[str, int] = {}

    def __call__(self, level: int, key: str, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last.get(key, -1e9) < self.every_s:
            self._folded[key] = self._folded.get(key, 0) + 1
            return
        folded = self._folded.pop(key, 0)
        self._last[key] = now
        suffix = f" (and {folded} more like it since the last such line)" if folded else ""
        self.logger.log(level, msg + suffix, *args)
