"""Holdout metrics: discrimination (AUC), probability quality (log loss, Brier) and
calibration (expected calibration error and the reliability table)."""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.metrics import brier_score_loss, log_loss, roc_auc_score

__all__ = ["binary_metrics", "reliability_table", "expected_calibration_error", "churn_baseline_aucs"]


def reliability_table(y: np.ndarray, p: np.ndarray, bins: int = 10) -> pd.DataFrame:
    """Equal-frequency bins of predicted probability with their observed rate."""
    order = np.argsort(p, kind="stable")
    groups = np.array_split(order, bins)
    return pd.DataFrame(
        {
            "mean_predicted": [p[g].mean() for g in groups if len(g)],
            "observed_rate": [y[g].mean() for g in groups if len(g)],
            "n": [len(g) for g in groups if len(g)],
        }
    )


def expected_calibration_error(y: np.ndarray, p: np.ndarray, bins: int = 10) -> float:
    table = reliability_table(y, p, bins)
    weights = table["n"] / table["n"].sum()
    return float((weights * (table["mean_predicted"] - table["observed_rate"]).abs()).sum())


def binary_metrics(y: np.ndarray, p: np.ndarray, bins: int = 10, prefix: str = "") -> dict[str, float]:
    y = np.asarray(y, dtype=float)
    p = np.clip(np.asarray(p, dtype=float), 1e-6, 1 - 1e-6)
    return {
        f"{prefix}auc": float(roc_auc_score(y, p)) if 0 < y.mean() < 1 else float("nan"),
        f"{prefix}log_loss": float(log_loss(y, p, labels=[0, 1])),
        f"{prefix}brier": float(brier_score_loss(y, p)),
        f"{prefix}ece": expected_calibration_error(y, p, bins),
        f"{prefix}mean_predicted": float(p.mean()),
        f"{prefix}observed_rate": float(y.mean()),
    }


def churn_baseline_aucs(rows: pd.DataFrame, y: np.ndarray, longest_window_days: int) -> dict[str, float]:
    """AUC of the one-number rules a CRM team would use without a model, on the same rows:
    days since the last engagement (recency) and active days in the longest window
    (frequency, fewer = riskier). Users never engaged rank as the most at risk."""
    y = np.asarray(y, dtype=float)
    if not 0 < y.mean() < 1:
        return {}
    recency = rows["days_since_engagement"].to_numpy(dtype=float, na_value=np.nan)
    recency = np.where(np.isnan(recency), np.nanmax(recency, initial=0.0) + 1.0, recency)
    frequency = -rows[f"active_days_{longest_window_days}d"].to_numpy(dtype=float, na_value=0.0)
    return {"baseline_recency_auc": float(roc_auc_score(y, recency)),
            "baseline_frequency_auc": float(roc_auc_score(y, frequency))}
