"""Figures logged with every expert run (matplotlib Agg; no MLflow here — the stage logs them)."""

from __future__ import annotations

from typing import Any

import numpy as np


def _figure() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(4.5, 3.5))


def calibration_curve(labels: np.ndarray, probs: np.ndarray, title: str, bins: int = 10) -> Any:
    """Mean label vs mean prediction per prediction-quantile bin; returns the matplotlib Figure."""
    fig, ax = _figure()
    order = np.argsort(probs)
    for chunk in np.array_split(order, min(bins, max(len(order), 1))):
        if len(chunk):
            ax.plot(probs[chunk].mean(), labels[chunk].mean(), "o", color="tab:blue")
    top = float(max(probs.max(initial=0.0), labels.mean() if len(labels) else 0.0, 1e-3))
    ax.plot([0, top], [0, top], "--", color="gray", lw=1)
    ax.set(xlabel="mean prediction", ylabel="mean label", title=title)
    fig.tight_layout()
    return fig


def ne_by_day(series: dict[str, dict[str, float]], title: str) -> Any:
    """NE per day of each named series ({name: {ds: NE}}: the variant, base, the FM); returns the Figure.

    Days are the union of the series' days, in order; a series is drawn on the days it has.
    """
    fig, ax = _figure()
    days = sorted({ds for values in series.values() for ds in values})
    at = {ds: i for i, ds in enumerate(days)}
    for name, values in series.items():
        shown = sorted(values)
        ax.plot([at[ds] for ds in shown], [values[ds] for ds in shown], marker="o", label=name)
    ax.set_xticks(range(len(days)), days)
    ax.set(xlabel="window", ylabel="NE", title=title)
    ax.tick_params(axis="x", labelrotation=45)
    if series:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def close_figure(fig: Any) -> None:
    import matplotlib.pyplot as plt

    plt.close(fig)
