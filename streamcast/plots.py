"""The tutorial's figures, written to PNG files (never ``plt.show()``).

matplotlib is the ``plots`` extra: importing this module without it raises ModuleNotFoundError,
which the CLI reports as the extra to install. The daemon and the image never import it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

from streamcast.evaluate import Evaluation
from streamcast.intervals import level_key

TITLES = {
    "point": "Point by point: each forecast from a true window (1 step ahead)",
    "full": "Full sequence: one rollout from the first test window",
    "multiple": "Multiple sequences: a rollout from every {h}th test window",
}


def plot_evaluation(evaluation: Evaluation, path: str | Path, title: str = "") -> Path:
    """Draw the true series and the forecasts (paths from their own start points) to ``path``,
    with their bands shaded (``point`` and ``multiple``) and the bands' coverage in the title."""
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(12, 5), dpi=100)
    _shade_bands(ax, evaluation)
    ax.plot(evaluation.truth, color="#444444", linewidth=1.2, label="true")
    if evaluation.mode == "point":
        ax.plot(evaluation.paths[:, 0], color="#d62728", linewidth=1.0, label="forecast")
    else:
        for n, (start, forecast) in enumerate(
            zip(evaluation.starts, evaluation.paths, strict=True)
        ):
            xs = range(start, start + len(forecast))
            ax.plot(
                xs, forecast, color="#d62728", linewidth=1.0, label="forecast" if n == 0 else None
            )
    metrics = evaluation.metrics
    heading = TITLES[evaluation.mode].format(h=evaluation.paths.shape[1])
    ax.set_title(
        f"{title + ': ' if title else ''}{heading}\n"
        f"MSE {metrics['model']['mse']:.4g} vs naive {metrics['naive']['mse']:.4g}  "
        f"(skill {metrics['skill']:+.3f}){_coverage_text(evaluation)}",
        fontsize=10,
    )
    ax.set_xlabel("test step")
    ax.set_ylabel("value")
    ax.legend(loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _shade_bands(ax: Any, evaluation: Evaluation) -> None:
    """Each level's band around the forecasts, translucent: where they overlap (the narrower
    level) the shade is darker."""
    for level in sorted(evaluation.bands, reverse=True):
        lo, hi = evaluation.bands[level]
        if evaluation.mode == "point":  # one band along the whole span
            spans = [(np.arange(len(lo)), lo[:, 0], hi[:, 0])]
        else:  # a band along each path
            spans = [
                (np.arange(start, start + lo.shape[1]), lo[n], hi[n])
                for n, start in enumerate(evaluation.starts)
            ]
        for n, (xs, row_lo, row_hi) in enumerate(spans):
            label = f"{level_key(level)}% band" if n == 0 else None
            ax.fill_between(
                xs, row_lo, row_hi, color="#d62728", alpha=0.15, linewidth=0, label=label
            )


def _coverage_text(evaluation: Evaluation) -> str:
    """A line "80% band covers 79.1%, 95% band covers 94.8%" (all horizons), or nothing."""
    parts = []
    for level in sorted(evaluation.bands):
        lo, hi = evaluation.bands[level]
        truth = np.stack([evaluation.truth[s : s + lo.shape[1]] for s in evaluation.starts])
        covered = np.mean((lo <= truth) & (truth <= hi))
        parts.append(f"{level_key(level)}% band covers {covered:.1%}")
    return "\n" + ", ".join(parts) if parts else ""
