"""Figures logged with every run: people read these faster than tables."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # no screen on batch machines

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402

from training.metrics import reliability_table  # noqa: E402

__all__ = ["reliability_figure", "importance_figure", "open_heatmap_figure", "churn_figure"]

_DAYS = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]


def reliability_figure(y: np.ndarray, curves: dict[str, np.ndarray], bins: int = 10) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(5, 5))
    top = 0.0
    for label, p in curves.items():
        table = reliability_table(y, p, bins)
        ax.plot(table["mean_predicted"], table["observed_rate"], marker="o", label=label)
        top = max(top, table["mean_predicted"].max(), table["observed_rate"].max())
    top = min(1.0, top * 1.1 + 1e-3)
    ax.plot([0, top], [0, top], "k--", linewidth=1, label="perfect")
    ax.set(xlim=(0, top), ylim=(0, top), xlabel="mean predicted probability",
           ylabel="observed rate", title="Reliability on the time holdout")
    ax.legend(loc="upper left")
    fig.tight_layout()
    return fig


def importance_figure(importance: pd.Series, top: int = 25) -> plt.Figure:
    data = importance.head(top)[::-1]
    fig, ax = plt.subplots(figsize=(7, 0.28 * len(data) + 1))
    ax.barh(data.index, data.to_numpy() / max(data.max(), 1e-12))
    ax.set(xlabel="relative gain", title="Feature importance (gain)")
    fig.tight_layout()
    return fig


def open_heatmap_figure(meta: pd.DataFrame, y: np.ndarray, p: np.ndarray) -> plt.Figure:
    """Observed and predicted open rate by local weekday x local hour of the send."""
    frame = pd.DataFrame({"dow": meta["local_dow"].to_numpy(), "hour": meta["local_hour"].to_numpy(),
                          "observed": y, "predicted": p})
    fig, axes = plt.subplots(1, 2, figsize=(13, 3.6), sharey=True)
    vmax = None
    for ax, column in zip(axes, ("observed", "predicted")):
        grid = frame.pivot_table(index="dow", columns="hour", values=column, aggfunc="mean")
        grid = grid.reindex(index=range(7), columns=range(24))
        vmax = vmax or np.nanpercentile(grid.to_numpy(), 98) if np.isfinite(grid.to_numpy()).any() else 1
        im = ax.imshow(grid.to_numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=vmax)
        ax.set(title=f"{column} open rate (holdout sends)", xlabel="local hour of send",
               xticks=range(0, 24, 2), yticks=range(7), yticklabels=_DAYS)
    fig.colorbar(im, ax=axes, shrink=0.9)
    return fig


def churn_figure(y: np.ndarray, p: np.ndarray) -> plt.Figure:
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    fpr, tpr, _ = roc_curve(y, p)
    left.plot(fpr, tpr)
    left.plot([0, 1], [0, 1], "k--", linewidth=1)
    left.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC on the time holdout")
    bins = np.linspace(0, 1, 31)
    right.hist(p[y == 0], bins=bins, alpha=0.6, label="stayed", density=True)
    right.hist(p[y == 1], bins=bins, alpha=0.6, label="churned", density=True)
    right.set(xlabel="predicted churn probability", title="Scores by outcome")
    right.legend()
    fig.tight_layout()
    return fig
