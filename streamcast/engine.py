"""What the daemon and the evaluation call on a model: one protocol, swap included.

An engine turns raw price windows (B, seq_len), newest last, into forecasts in price space.
:class:`streamcast.forecaster.Forecaster` is the engine the project ships; a new model kind is a
new class with these members (the daemon, the evaluation and the hot swap need nothing else).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np


class Staged(Protocol):
    """A new version's weights, loaded and checked, waiting to be written into the engine that
    staged them (between two batches: no compile, no new engine)."""

    version: str

    def apply(self) -> None:
        """Write the weights into the engine; its ``version`` becomes this one's."""
        ...


class Engine(Protocol):
    seq_len: int  # prices per window
    normalise: bool  # windows are divided by their first price: prices must be > 0
    version: str  # carried by every forecast it computes

    def predict_next(self, prices: np.ndarray) -> np.ndarray:
        """Next-value forecasts (B,) from price windows (B, seq_len)."""
        ...

    def rollout(self, prices: np.ndarray, steps: int = 50) -> np.ndarray:
        """Forecast paths (B, steps): each step feeds the previous forecast back in."""
        ...

    def stage(self, path: Path) -> Staged | None:
        """Load a saved version for a weights-only swap into this engine; None when it is not
        the same architecture (the caller loads a new engine instead)."""
        ...

    def close(self) -> None:
        """Release worker threads; idempotent, and a later forecast may start them again."""
        ...
