"""Judge tags against a simulator's truth: how much of the best slot's open probability
the chosen slots capture, how close the probabilities are to the true ones, and how well
churn is ranked, beside the baselines a marketer already has."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from configs import Config, resolve_as_of
from features.events import EventLog
from features.matrix import build_matrix
from serving.core import unreachable

__all__ = ["EvaluationReport", "evaluate_against_truth", "expected_log_loss", "slot_capture"]


def expected_log_loss(p_true: np.ndarray, q: np.ndarray) -> float:
    """Mean log loss of predictions q when outcomes are Bernoulli(p_true)."""
    q = np.clip(q, 1e-6, 1 - 1e-6)
    return float(np.mean(-(p_true * np.log(q) + (1 - p_true) * np.log(1 - q))))


def slot_capture(p_true: np.ndarray, chosen: np.ndarray) -> float:
    """Mean true probability at the chosen slot over the mean at each user's true best.
    A negative slot means no send (the tags' best slot of a user no message reaches): it
    captures nothing."""
    chosen = np.asarray(chosen)
    picked = np.where(chosen >= 0, p_true[np.arange(len(p_true)), np.maximum(chosen, 0)], 0.0)
    return float(picked.mean() / p_true.max(axis=1).mean())


@dataclass
class EvaluationReport:
    table: pd.DataFrame         # one row per method
    n_users: int
    n_churn_population: int

    def to_text(self) -> str:
        return (f"{self.n_users} users with truth; churn population {self.n_churn_population}\n"
                + self.table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))


def evaluate_against_truth(tags: pd.DataFrame, truth: pd.DataFrame, cfg: Config,
                           log: EventLog | None = None, as_of: datetime | None = None) -> EvaluationReport:
    merged = truth.merge(tags, on="user_id", how="inner", suffixes=("_truth", ""))
    if merged.empty:
        raise ValueError("tags and truth share no user_id")
    p_true = np.vstack(merged["true_open_probs"].to_numpy()).astype(float)
    rows = []
    oracle_ll = expected_log_loss(p_true, p_true)
    has_open = merged["slot_open_probs"].notna().all()
    churn_pop = merged["active_at_snapshot"].to_numpy(bool)
    y_churn = merged["churned"].to_numpy(bool)[churn_pop]

    def churn_auc(score: np.ndarray) -> float:
        s = score[churn_pop]
        ok = ~np.isnan(s)
        if ok.sum() < 2 or len(np.unique(y_churn[ok])) < 2:
            return float("nan")
        return float(roc_auc_score(y_churn[ok], s[ok]))

    if has_open:
        q = np.vstack(merged["slot_open_probs"].to_numpy()).astype(float)
        rows.append({"method": "sendtime model", "slot_capture": slot_capture(p_true, q.argmax(axis=1)),
                     "expected_log_loss": expected_log_loss(p_true, q),
                     "log_loss_vs_oracle": expected_log_loss(p_true, q) / oracle_ll - 1,
                     "churn_auc": churn_auc(merged["churn_prob"].to_numpy(float))})
    elif "churn_prob" in merged:
        rows.append({"method": "sendtime model", "churn_auc": churn_auc(merged["churn_prob"].to_numpy(float))})
    rows.append({"method": "oracle (true probabilities)", "slot_capture": 1.0,
                 "expected_log_loss": oracle_ll, "log_loss_vs_oracle": 0.0,
                 "churn_auc": churn_auc(merged["true_churn_prob"].to_numpy(float))
                 if "true_churn_prob" in merged else float("nan")})
    if log is not None:
        matrix, priors = build_matrix(log, resolve_as_of(as_of, log.max_ts), cfg,
                                      user_ids=pd.Index(merged["user_id"]))
        pos = matrix.user_ids.get_indexer(merged["user_id"])
        n = len(merged)
        # what a marketer does: one golden hour for everyone, at the population's rate per slot
        global_q = np.tile(priors.slot_rate, (n, 1))
        global_best = np.full(n, int(np.argmax(priors.slot_rate)))
        # or each user's most frequent open hour (the golden hour where they never opened)
        opens_at = matrix.slots["open_at_share"][pos]
        never = matrix.scalars["opens_90d"].to_numpy()[pos] == 0
        user_best = np.where(never, global_best, opens_at.argmax(axis=1))
        user_q = np.tile(matrix.scalars["user_open_rate"].to_numpy()[pos][:, None], (1, p_true.shape[1]))
        # the tags' rule for users no message reaches (0 in every slot, no best slot) holds
        # for the baselines too: without it they pay for predicting opens of users who cannot
        # open, a loss the model is spared by the rule, not by what it learned
        gone = unreachable(matrix.scalars, pos)
        global_q[gone], user_q[gone] = 0.0, 0.0
        global_best[gone], user_best[gone] = -1, -1
        recency = matrix.scalars["days_since_engagement"].to_numpy()[pos]
        recency = np.where(np.isnan(recency), 1e6, recency)
        frequency = -matrix.scalars[f"active_days_{max(cfg.features.frequency_windows_days)}d"].to_numpy()[pos]
        rows += [
            {"method": "baseline: global best hour", "slot_capture": slot_capture(p_true, global_best),
             "expected_log_loss": expected_log_loss(p_true, global_q),
             "log_loss_vs_oracle": expected_log_loss(p_true, global_q) / oracle_ll - 1},
            {"method": "baseline: user's most frequent open hour", "slot_capture": slot_capture(p_true, user_best),
             "expected_log_loss": expected_log_loss(p_true, user_q),
             "log_loss_vs_oracle": expected_log_loss(p_true, user_q) / oracle_ll - 1},
            {"method": "baseline: churn by recency alone", "churn_auc": churn_auc(recency)},
            {"method": "baseline: churn by frequency alone", "churn_auc": churn_auc(frequency.astype(float))},
        ]
    table = pd.DataFrame(rows, columns=["method", "slot_capture", "expected_log_loss",
                                        "log_loss_vs_oracle", "churn_auc"])
    return EvaluationReport(table=table, n_users=len(merged), n_churn_population=int(churn_pop.sum()))
