"""The tutorial's figures, written to PNG files (never ``plt.show()``).

matplotlib is the ``plots`` extra: importing this module without it raises ModuleNotFoundError,
which the CLI reports as the extra to install. The daemon and the image never import it.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

from streamcast.evaluate import Evaluation

TITLES = {
    "point": "Point by point: each forecast from a true window (1 step ahead)",
    "full": "Full sequence: one rollout from the first test window",
    "multiple": "Multiple sequences: a rollout from every {h}th test window",
}


def plot_evaluation(evaluation: Evaluation, path: str | Path, title: str = "") -> Path:
    """Draw the true series and the forecasts (paths from their own start points) to ``path``."""
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(12, 5), dpi=100)
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
        f"(skill {metrics['skill']:+.3f})",
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
