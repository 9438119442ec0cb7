"""Churn snapshot selection: as many training snapshots as the span allows, and the warning
when the training customers are much younger than the holdout's; the baselines' scores that
benchmarks/retail_churn_ceiling.py resamples."""

import logging
from datetime import datetime, timedelta

import numpy as np
import pandas as pd
import pydantic
import pytest
from sklearn.metrics import roc_auc_score

from training.datasets import MIN_HISTORY_DAYS, Split, build_dataset, churn_snapshots, history_mismatch
from training.metrics import churn_baseline_aucs, churn_baseline_scores

# Online Retail's span (the imported log's first and last purchase, UTC)
FIRST, LAST = datetime(2010, 12, 1, 8, 26), datetime(2011, 12, 9, 12, 50)


def test_zero_training_snapshots_means_every_step_the_span_allows(cfg):
    retail = cfg.with_overrides(labels={"churn_horizon_days": 90},
                                datasets={"churn_snapshot_every_days": 7, "churn_train_snapshots": 0})
    train, valid, holdout = churn_snapshots(LAST, FIRST, retail)
    assert (valid, holdout) == (datetime(2011, 6, 12), datetime(2011, 9, 10))
    assert len(train) == 13 and train[0] == datetime(2010, 12, 20) and train[-1] == datetime(2011, 3, 14)
    assert all(b - a == timedelta(days=7) for a, b in zip(train, train[1:]))
    # the earliest has its 14 days of history, one step earlier would not
    assert train[0] - timedelta(days=7) < FIRST + timedelta(days=MIN_HISTORY_DAYS) <= train[0]
    assert train[-1] + timedelta(days=90) <= valid
    # a fixed count beyond what fits gives the same snapshots; a smaller one, the latest of them
    more = retail.with_overrides(datasets={"churn_train_snapshots": 40})
    assert churn_snapshots(LAST, FIRST, more)[0] == train
    fewer = retail.with_overrides(datasets={"churn_train_snapshots": 5})
    assert churn_snapshots(LAST, FIRST, fewer)[0] == train[-5:]


def test_one_training_snapshot_is_refused(cfg):
    with pytest.raises(pydantic.ValidationError, match="0 \\(as many as the log's span allows\\) or at least 2"):
        cfg.with_overrides(datasets={"churn_train_snapshots": 1})


def _split(history_days: list[float]) -> Split:
    rows = pd.DataFrame({"days_since_first_engagement": history_days})
    return Split(rows=rows, label=np.zeros(len(rows), np.int8), meta=pd.DataFrame({"user_id": range(len(rows))}))


def test_history_mismatch_names_both_medians():
    young, old = _split([10, 39, 60, np.nan]), _split([100, 185, 250])
    reason = history_mismatch(young, old)
    assert reason is not None and "39 days against 185" in reason
    assert history_mismatch(_split([80, 100, 120]), old) is None          # 100 >= half of 185
    assert history_mismatch(old, young) is None
    no_column = Split(rows=pd.DataFrame({"x": [1.0]}), label=np.zeros(1, np.int8), meta=pd.DataFrame())
    assert history_mismatch(no_column, old) is None


@pytest.mark.integration
def test_build_dataset_warns_when_training_customers_are_young(trained, caplog):
    """The small simulated log (120 days, three 30-day horizons) leaves training snapshots
    in its first month: their customers are young beside the holdout's."""
    cfg, log = trained["cfg"], trained["log"]
    with caplog.at_level(logging.WARNING, logger="training.datasets"):
        ds = build_dataset(log, "churn", None, cfg, progress=False)
    trained_days = ds.train.rows["days_since_first_engagement"].median()
    measured_days = ds.holdout.rows["days_since_first_engagement"].median()
    assert trained_days < 0.5 * measured_days
    assert any("median history" in r.getMessage() for r in caplog.records)


def test_baseline_scores_are_the_risks_the_aucs_measure():
    rows = pd.DataFrame({"days_since_engagement": [5.0, 50.0, 20.0, np.nan],
                         "active_days_180d": [6.0, 1.0, 3.0, 0.0],
                         "active_days_ever": [9.0, 1.0, np.nan, 0.0]})
    y = np.array([0, 1, 0, 1])
    scores = churn_baseline_scores(rows, 180)
    assert set(scores) == {"recency", "frequency", "frequency_ever"}
    assert scores["recency"][3] > 50.0                                   # never engaged: riskiest
    assert scores["frequency_ever"][2] > scores["frequency_ever"][3] == 0.0   # unknown: riskier than the known
    aucs = churn_baseline_aucs(rows, y, 180)
    assert all(aucs[f"baseline_{k}_auc"] == roc_auc_score(y, v) for k, v in scores.items())
