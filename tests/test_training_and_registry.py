"""A real train -> register -> promote round trip against a real MLflow SQLite store."""

import shutil

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
    window = pd.Timedelta(hours=cfg.labels.open_attribution_hours)
    valid_t, hold_t = ds.valid.meta["snapshot"].min(), ds.holdout.meta["snapshot"].min()
    # every label is settled (a send's attribution window closed) before the next set starts
    assert ds.train.meta["ts"].max().tz_localize(None) + window <= valid_t
    assert ds.valid.meta["ts"].max().tz_localize(None) + window <= hold_t
    assert ds.holdout.meta["ts"].max().tz_localize(None) + window <= pd.Timestamp(ds.as_of)
    assert ds.train.meta["snapshot"].max() < valid_t < hold_t
    train_t, valid_t, hold_t = churn_snapshots(log.max_ts(), log.min_ts(), cfg)
    horizon = pd.Timedelta(days=cfg.labels.churn_horizon_days)
    # a churn label's horizon ends before the next set starts (not cut short: spaced)
    assert max(train_t) + horizon <= valid_t and valid_t + horizon <= hold_t
    assert hold_t + horizon <= log.max_ts() < hold_t + horizon + pd.Timedelta(days=1)
    assert len(train_t) == cfg.datasets.churn_train_snapshots


def test_a_tuning_study_is_keyed_by_its_data(trained):
    """A study resumed on other data would mix trials whose losses are not comparable."""
    from training.tuning import study_name

    cfg, log = trained["cfg"], trained["log"]
    ds = build_dataset(log, "churn", None, cfg, progress=False)
    again = build_dataset(log, "churn", None, cfg, progress=False)
    earlier = build_dataset(log, "churn", log.max_ts() - pd.Timedelta(days=7), cfg, progress=False)
    assert study_name(cfg, ds, "lightgbm") == study_name(cfg, again, "lightgbm")
    assert study_name(cfg, ds, "lightgbm") != study_name(cfg, earlier, "lightgbm")
    assert study_name(cfg, ds, "lightgbm") != study_name(cfg, ds, "xgboost")


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
    assert gap > 0, "two libraries tied to the last digit: the gate has no worse candidate to refuse"
    # the gate's margin set around the measured gap, so both verdicts are tested whatever it is
    strict = cfg.with_overrides(tracking={"gate_relative_margin": 0.0})
    with pytest.raises(PromotionRefused, match="worse than champion"):
        promote_champion(strict, "open", version=worst.version)
    assert str(client.get_model_version_by_alias(name, "champion").version) == best.version
    forced = promote_champion(strict, "open", version=worst.version, force=True)
    assert forced.version == worst.version and forced.previous == best.version
    back = rollback_champion(cfg, "open")
    assert back.version == best.version
    assert str(client.get_model_version_by_alias(name, "champion").version) == best.version
    lenient = cfg.with_overrides(tracking={"gate_relative_margin": 2 * gap + 0.01})
    passed = promote_champion(lenient, "open", version=worst.version)
    assert passed.version == worst.version and "gate passed" in passed.reason
    assert rollback_champion(cfg, "open").version == best.version


def test_open_task_refused_on_purchase_only_logs(cfg):
    from features.events import from_frames
    from tests.conftest import make_events
    from training.datasets import TaskNotTrainable

    log = from_frames(make_events([("a", "2026-01-01", "purchase"), ("b", "2026-02-01", "purchase")]))
    with pytest.raises(TaskNotTrainable, match="needs send and open"):
        build_dataset(log, "open", None, cfg, progress=False)


def test_a_training_set_is_read_back_only_for_the_same_log_time_and_config(trained, tmp_path, monkeypatch):
    """`train` with the other library reads the first one's dataset back, equal to a rebuild;
    another as-of time or configuration builds its own; only the most recent entries stay."""
    import training.dataset_cache as cache_module
    from training.dataset_cache import cached_dataset, dataset_key
    from training.tracking import datasets_dir

    log = trained["log"]
    cfg = trained["cfg"].with_overrides(tracking={"artifact_root": str(tmp_path / "artifacts")})
    cache = datasets_dir(cfg) / "cache"
    shutil.rmtree(cache, ignore_errors=True)   # what the session's training left
    built = cached_dataset(log, "churn", None, cfg, progress=False)
    assert [p.name for p in cache.iterdir()] == [dataset_key(log, "churn", None, cfg)]

    def no_build(*args, **kwargs):
        raise AssertionError("built again")

    with monkeypatch.context() as patch:
        patch.setattr(cache_module, "build_dataset", no_build)
        read = cached_dataset(log, "churn", None, cfg, progress=False)
    for name in ("train", "valid", "holdout"):
        pd.testing.assert_frame_equal(getattr(read, name).rows, getattr(built, name).rows)
        pd.testing.assert_frame_equal(getattr(read, name).meta, getattr(built, name).meta)
        assert np.array_equal(getattr(read, name).label, getattr(built, name).label)
    assert (read.as_of, read.categorical, read.snapshots) == (built.as_of, built.categorical, built.snapshots)
    assert read.training_digest() == built.training_digest() and read.holdout_digest() == built.holdout_digest()

    earlier = log.max_ts() - pd.Timedelta(days=7)
    other = cfg.with_overrides(features={"user_prior_strength": cfg.features.user_prior_strength + 1})
    keys = {dataset_key(log, "churn", None, cfg), dataset_key(log, "churn", earlier, cfg),
            dataset_key(log, "churn", None, other), dataset_key(log, "open", None, cfg)}
    assert len(keys) == 4
    cached_dataset(log, "churn", earlier, cfg, progress=False)
    cached_dataset(log, "churn", None, other, progress=False)
    assert sorted(p.name for p in cache.iterdir()) == sorted(
        [dataset_key(log, "churn", earlier, cfg), dataset_key(log, "churn", None, other)])
    # off: nothing read or kept
    shutil.rmtree(cache)
    cached_dataset(log, "churn", None, cfg.with_overrides(datasets={"cache_entries": 0}), progress=False)
    assert not cache.exists()


def test_an_open_version_blends_its_trees_with_the_learned_rhythm(trained):
    """The open model's probability is the calibrated trees and the learned rhythm's open
    rate at the slot, blended in logits with the weight stored with the version; churn has
    no blend; a blending calibrator refuses rows without the column."""
    from boosters import apply_calibration
    from features.rows import ModelRows
    from features.snapshot import read_snapshot
    from serving.predictor import load_registered_model
    from serving.tagstore import current_refresh
    from training.calibration import with_rhythm_blend

    cfg, results = trained["cfg"], trained["results"]
    matrix, _ = read_snapshot(current_refresh(cfg.serving.serving_dir).root)
    for library in ("lightgbm", "xgboost"):
        model = load_registered_model(cfg.tracking.resolved_uri(), cfg.tracking.model_name("open"),
                                      version=results[("open", library)].version)
        blend = model.calibrator["rhythm_blend"]
        assert blend["weight"] == cfg.models.open_rhythm_blend > 0
        assert model.spec.names[blend["index"]] == blend["feature"] == "slot_rhythm_expected"
        warm = np.flatnonzero(matrix.scalars["has_history"].to_numpy() > 0)[:200]
        rows = ModelRows(model.spec, matrix, warm, per_slot=True)
        x = rows.build(0, len(rows))
        p = model.predict_array(x.copy())
        raw = model.library.predict(model.booster, x)
        trees = apply_calibration(raw, {k: v for k, v in model.calibrator.items() if k != "rhythm_blend"})
        r, w = np.clip(x[:, blend["index"]].astype(float), 1e-6, 1 - 1e-6), blend["weight"]
        z = (1 - w) * np.log(trees / (1 - trees)) + w * np.log(r / (1 - r))
        np.testing.assert_allclose(p, 1 / (1 + np.exp(-z)), rtol=1e-10)
        assert np.abs(p - trees).max() > 1e-3                      # the rhythm moves the numbers
        with pytest.raises(ValueError, match="slot_rhythm_expected"):
            apply_calibration(p, model.calibrator)
        # a row without the rhythm keeps the trees' own (calibrated) probability; the raw
        # scores go in, as in serving (calibrated ones would be calibrated twice)
        no_rhythm = apply_calibration(raw[:3], model.calibrator, np.full(3, np.nan))
        np.testing.assert_allclose(no_rhythm, trees[:3])
    churn = load_registered_model(cfg.tracking.resolved_uri(), cfg.tracking.model_name("churn"),
                                  version=results[("churn", "lightgbm")].version)
    assert "rhythm_blend" not in churn.calibrator
    names = list(model.spec.names)
    assert with_rhythm_blend({"kind": "none"}, names, 0.0) == {"kind": "none"}
    assert with_rhythm_blend({"kind": "none"}, [n for n in names if n != "slot_rhythm_expected"], 0.5) == {"kind": "none"}
