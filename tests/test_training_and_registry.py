"""A real train -> register -> promote round trip against a real MLflow SQLite store."""

import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from training.datasets import build_dataset, churn_snapshots
from training.registry import PromotionRefused, promote_champion, rollback_champion

pytestmark = pytest.mark.integration


def test_time_split_never_overlaps(trained):
    cfg, log = trained["cfg"], trained["log"]
    ds = build_dataset(log, "open", None, cfg, progress=False)
    train_end = ds.train.meta["ts"].max()
    valid_start, valid_end = ds.valid.meta["ts"].min(), ds.valid.meta["ts"].max()
    hold_start = ds.holdout.meta["ts"].min()
    window = pd.Timedelta(hours=cfg.labels.open_attribution_hours)
    # every training label is settled before the validation rows start, and so on
    assert train_end + window <= valid_start + pd.Timedelta(days=cfg.datasets.open_snapshot_every_days)
    assert valid_end + window <= hold_start + pd.Timedelta(hours=1) or valid_end < hold_start
    assert ds.train.meta["snapshot"].max() < ds.valid.meta["snapshot"].min() < ds.holdout.meta["snapshot"].min()
    train_t, valid_t, hold_t = churn_snapshots(log.max_ts(), log.min_ts(), cfg)
    assert valid_t + pd.Timedelta(days=cfg.labels.churn_horizon_days) <= hold_t
    assert max(train_t) < valid_t


def test_runs_logged_with_metrics_plots_and_versions(trained):
    cfg = trained["cfg"]
    client = MlflowClient(tracking_uri=cfg.tracking.resolved_uri())
    for (task, library), result in trained["results"].items():
        run = client.get_run(result.run_id)
        for metric in ("holdout_auc", "holdout_log_loss", "holdout_brier", "holdout_ece"):
            assert np.isfinite(run.data.metrics[metric]), metric
        artifacts = {a.path for a in client.list_artifacts(result.run_id, "plots")}
        assert "plots/reliability.png" in artifacts and "plots/feature_importance.png" in artifacts
        if task == "open":
            assert "plots/open_rate_by_weekday_hour.png" in artifacts
        mv = client.get_model_version(result.model_name, result.version)
        assert mv.tags["library"] == library
    # models beat the base rate on the time holdout
    for (task, _), result in trained["results"].items():
        assert result.metrics["holdout_auc"] > 0.6, (task, result.metrics["holdout_auc"])
        if task == "churn":   # the one-number rules are measured on the same holdout rows
            assert 0.5 < result.metrics["holdout_baseline_recency_auc"] < 1
            assert result.metrics["holdout_auc"] > result.metrics["holdout_baseline_frequency_auc"]


def test_promote_picks_best_and_gate_and_rollback(trained):
    cfg = trained["cfg"]
    client = MlflowClient(tracking_uri=cfg.tracking.resolved_uri())
    name = cfg.tracking.model_name("open")
    versions = {r.library: r for (t, _), r in trained["results"].items() if t == "open"}
    best = min(versions.values(), key=lambda r: r.metrics["holdout_log_loss"])
    worst = max(versions.values(), key=lambda r: r.metrics["holdout_log_loss"])
    assert str(client.get_model_version_by_alias(name, "champion").version) == best.version
    gap = worst.metrics["holdout_log_loss"] / best.metrics["holdout_log_loss"] - 1
    if gap > cfg.tracking.gate_relative_margin:
        with pytest.raises(PromotionRefused, match="worse than champion"):
            promote_champion(cfg, "open", version=worst.version)
    forced = promote_champion(cfg, "open", version=worst.version, force=True)
    assert forced.version == worst.version and forced.previous == best.version
    back = rollback_champion(cfg, "open")
    assert back.version == best.version
    assert str(client.get_model_version_by_alias(name, "champion").version) == best.version


def test_open_task_refused_on_purchase_only_logs(cfg):
    from features.events import from_frames
    from tests.conftest import make_events
    from training.datasets import TaskNotTrainable

    log = from_frames(make_events([("a", "2026-01-01", "purchase"), ("b", "2026-02-01", "purchase")]))
    with pytest.raises(TaskNotTrainable, match="needs send and open"):
        build_dataset(log, "open", None, cfg, progress=False)
