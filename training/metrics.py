"""Holdout metrics: discrimination (AUC), probability quality (log loss, Brier) and
calibration (expected calibration error and the reliability table)."""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.metrics import brier_score_loss, log_loss, roc_auc_score

__all__ = ["binary_metrics", "reliability_table", "expected_calibration_error", "churn_baseline_aucs",
           "churn_baseline_scores"]


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


def churn_baseline_scores(rows: pd.DataFrame, longest_window_days: int) -> dict[str, np.ndarray]:
    """The one-number rules a CRM team would use without a model, as risk scores on ``rows``
    (higher = more at risk): days since the last engagement (recency), active days in the
    longest window and over the whole history (frequency, fewer = riskier), and the BG/NBD
    model's P(alive) and expected active days in the horizon (lower = riskier), each where
    its column is in ``rows`` and known for some of them. Users without a value (never
    engaged, no BG/NBD fit) rank as the most at risk."""
    risk = {"recency": ("days_since_engagement", 1.0),
            "frequency": (f"active_days_{longest_window_days}d", -1.0),
            "frequency_ever": ("active_days_ever", -1.0),
            "btyd_p_alive": ("btyd_p_alive", -1.0)}
    expected = sorted(c for c in rows.columns if c.startswith("btyd_expected_"))
    if expected:
        risk["btyd_expected"] = (expected[0], -1.0)
    out = {}
    for name, (column, sign) in risk.items():
        if column not in rows.columns:
            continue
        score = sign * rows[column].to_numpy(dtype=float, na_value=np.nan)
        known = np.isfinite(score)
        if known.any():
            out[name] = np.where(known, score, np.max(score[known]) + 1.0)
    return out


def churn_baseline_aucs(rows: pd.DataFrame, y: np.ndarray, longest_window_days: int) -> dict[str, float]:
    """AUC of each of :func:`churn_baseline_scores` on the same rows; ``baseline_best_auc`` is
    the highest of these: the bar a churn model has to clear."""
    y = np.asarray(y, dtype=float)
    if not 0 < y.mean() < 1:
        return {}
    out = {f"baseline_{name}_auc": float(roc_auc_score(y, score))
           for name, score in churn_baseline_scores(rows, longest_window_days).items()}
    if out:
        out["baseline_best_auc"] = max(out.values())
    return out
