"""Drift: the population stability index of a refresh against the champion's reference.

Unit tests of the bins and the index on synthetic values; then, on the session's trained
store, the reference on each training run and a refresh's PSI logged to MLflow and read
back, a deliberately shifted feature named in the warning, and a champion without a
reference that leaves the refresh going.
"""

from __future__ import annotations

import dataclasses
import json
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest

from features.reference import REFERENCE_FILE, DriftReference, Histogram, drift_population, psi

EPS = 1e-4


def test_psi_of_a_sample_against_itself_is_about_zero():
    rng = np.random.default_rng(0)
    values = rng.lognormal(size=20_000)
    hist = Histogram.fit(values, bins=10, max_levels=20)
    assert len(hist.edges) == 9 and hist.n_bins == 11            # deciles, then missing
    assert sum(hist.shares) == pytest.approx(1.0)
    np.testing.assert_allclose(hist.shares[:10], 0.1, atol=1e-3)
    assert psi(hist.shares, hist.shares_of(values), EPS) == pytest.approx(0.0, abs=1e-12)
    # another draw from the same distribution: sampling noise only
    assert psi(hist.shares, hist.shares_of(rng.lognormal(size=20_000)), EPS) < 0.01


def test_a_shifted_distribution_exceeds_the_threshold():
    rng = np.random.default_rng(1)
    hist = Histogram.fit(rng.normal(size=20_000), bins=10, max_levels=20)
    shifted = psi(hist.shares, hist.shares_of(rng.normal(loc=0.6, size=20_000)), EPS)
    slight = psi(hist.shares, hist.shares_of(rng.normal(loc=0.05, size=20_000)), EPS)
    assert shifted > 0.2 > 0.02 > slight


def test_missing_values_have_a_bin_of_their_own():
    rng = np.random.default_rng(2)
    reference = rng.exponential(size=10_000)
    reference[:3_000] = np.nan                         # e.g. days since a purchase: never
    hist = Histogram.fit(reference, bins=10, max_levels=20)
    assert hist.shares[-1] == pytest.approx(0.3)
    assert all(np.isfinite(hist.edges))                 # quantiles of the values present
    # the same values, but twice as many users who never purchased
    later = rng.exponential(size=10_000)
    later[:6_000] = np.nan
    assert hist.shares_of(later)[-1] == pytest.approx(0.6)
    assert psi(hist.shares, hist.shares_of(later), EPS) > 0.2
    # a reference without missing values: a refresh with some stays finite (epsilon)
    full = Histogram.fit(rng.exponential(size=10_000), bins=10, max_levels=20)
    some = np.where(rng.random(10_000) < 0.01, np.nan, rng.exponential(size=10_000))
    assert full.shares[-1] == 0 and 0 < psi(full.shares, full.shares_of(some), EPS) < 0.1


def test_counts_with_many_zeros_keep_the_zeros_in_one_bin():
    values = np.r_[np.zeros(6_000), np.arange(1, 4_001) % 7 + 1.0]
    hist = Histogram.fit(values, bins=10, max_levels=20)
    assert hist.edges[0] == 0.0 and hist.shares[0] == pytest.approx(0.6)   # bins are right-closed
    assert len(hist.edges) == len(set(hist.edges)) < 9                      # tied deciles merge


def test_categorical_columns_are_binned_by_level():
    reference = np.array(["a"] * 50 + ["b"] * 30 + ["c"] * 15 + [None] * 5, dtype=object)
    hist = Histogram.fit(reference, bins=10, max_levels=2)
    assert hist.kind == "categorical" and hist.levels == ("a", "b")
    assert hist.shares == pytest.approx((0.5, 0.3, 0.15, 0.05))            # a, b, other, missing
    assert psi(hist.shares, hist.shares_of(reference), EPS) == pytest.approx(0.0)
    # an unseen level counts as "other", a missing one as missing
    later = np.array(["a"] * 50 + ["b"] * 30 + ["z"] * 15 + [None] * 5, dtype=object)
    assert psi(hist.shares, hist.shares_of(later), EPS) == pytest.approx(0.0)
    moved = np.array(["a"] * 20 + ["b"] * 60 + ["c"] * 15 + [None] * 5, dtype=object)
    assert psi(hist.shares, hist.shares_of(moved), EPS) > 0.2
    again = Histogram.from_dict(json.loads(json.dumps(hist.to_dict())))
    assert again == hist


# ---------------------------------------------------------------- on the trained store


@pytest.fixture(scope="module")
def refresh_inputs(trained):
    """Every user's features as of the end of the log and the champions' scores, as the
    nightly refresh computes them."""
    from features.matrix import build_matrix
    from serving.core import PriorTable, ScoringCore, cold_start_priors
    from serving.models import load_champions

    cfg, log = trained["cfg"], trained["log"]
    champions = load_champions(cfg)
    matrix, _ = build_matrix(log, log.max_ts(), cfg)
    core = ScoringCore(champions, matrix, cfg)
    everyone = np.arange(len(matrix))
    model = core.model_scores(everyone)
    priors = cold_start_priors(matrix.scalars, matrix.attributes, *model)
    scores = core.score(everyone, PriorTable(priors), model=model)
    return cfg, champions, matrix, scores


def _client(cfg):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=cfg.tracking.resolved_uri())


def test_each_training_run_carries_a_reference_of_its_holdout_snapshot(trained, tmp_path):
    cfg = trained["cfg"]
    client = _client(cfg)
    for (task, _library), result in trained["results"].items():
        assert REFERENCE_FILE in {f.path for f in client.list_artifacts(result.run_id)}
        data = json.loads(Path(client.download_artifacts(result.run_id, REFERENCE_FILE, str(tmp_path))).read_text())
        ref = DriftReference.from_dict(data)
        run = client.get_run(result.run_id)
        assert ref.task == task and 0 < ref.n_sampled <= ref.n_population
        assert ref.as_of < run.data.tags["as_of"]          # the holdout snapshot, before the as-of
        assert sum(ref.prediction.shares) == pytest.approx(1.0) and len(ref.prediction.edges) >= 5
        assert ref.features["timezone"].kind == "categorical"
        assert {"best_pooled_rate", "user_open_rate"} <= set(ref.features)
        assert len(ref.features) <= cfg.drift.top_features + len(cfg.drift.key_columns)
        assert len(json.dumps(data)) < 20_000                 # O(features x bins)


def test_the_churn_drift_population_is_the_churn_labels_population(trained):
    from features.matrix import build_matrix
    from training.labels import churn_labels

    cfg, log = trained["cfg"], trained["log"]
    snapshot = log.max_ts() - timedelta(days=40)
    matrix, _ = build_matrix(log, snapshot, cfg)
    users = matrix.user_ids[drift_population(matrix, "churn", cfg.labels.churn_lookback_days)]
    assert sorted(users) == sorted(churn_labels(log, snapshot, cfg)["user_id"])


def test_a_refresh_logs_psi_per_feature_and_prediction_to_mlflow(refresh_inputs):
    from serving.drift import drift_report, log_drift

    cfg, champions, matrix, scores = refresh_inputs
    report = drift_report(matrix, scores, champions, cfg, refresh_id="refresh-test-1")
    assert set(report.tasks) == {"open", "churn"} and report.unmeasured == {}
    metrics = report.metrics()
    assert all(np.isfinite(v) and v >= 0 for v in metrics.values())
    assert metrics["psi_max"] == max(v for k, v in metrics.items() if k != "psi_max")
    # the same simulated world eight (open) and thirty (churn) days later: the models' outputs hold
    assert metrics["psi_prediction_open"] < cfg.drift.psi_warn
    assert metrics["psi_prediction_churn"] < cfg.drift.psi_warn
    assert metrics["psi_open_user_open_rate"] < 0.1 and metrics["psi_open_timezone"] < 0.01
    open_drift = report.tasks["open"]
    assert open_drift.n_users == int(((matrix.scalars["has_history"] > 0) & ~(matrix.scalars["unreachable"] > 0)).sum())

    run_id = log_drift(report, cfg)
    run = _client(cfg).get_run(run_id)
    assert run.data.tags["refresh_id"] == "refresh-test-1"
    assert run.data.tags["open_model_version"] == champions.open.version
    assert run.data.tags["churn_model_version"] == champions.churn.version
    for key in ("psi_open_user_open_rate", "psi_churn_best_slot_rate", "psi_prediction_open",
                "psi_prediction_churn", "psi_max"):
        assert run.data.metrics[key] == pytest.approx(metrics[key])
    experiment = _client(cfg).get_experiment(run.info.experiment_id)
    assert experiment.name == cfg.drift.experiment
    artifacts = {f.path for f in _client(cfg).list_artifacts(run_id, "plots")}
    assert "plots/psi_by_feature.png" in artifacts


def test_a_shifted_feature_is_named_in_the_warning(refresh_inputs):
    from features.matrix import UserMatrix
    from serving.drift import drift_report

    cfg, champions, matrix, scores = refresh_inputs
    before = drift_report(matrix, scores, champions, cfg)
    scalars = matrix.scalars.copy()
    scalars["sessions_30d"] = scalars["sessions_30d"] * 3 + 2      # everyone's app use jumps
    shifted = UserMatrix(as_of=matrix.as_of, n_slots=matrix.n_slots, scalars=scalars, slots=matrix.slots,
                         attributes=matrix.attributes)
    after = drift_report(shifted, scores, champions, cfg)
    assert before.tasks["open"].features["sessions_30d"] < cfg.drift.psi_warn
    assert after.tasks["open"].features["sessions_30d"] > 1.0
    assert "open: sessions_30d" in after.warning and "churn: sessions_30d" in after.warning
    assert "sessions_30d" not in (before.warning or "")
    assert after.tasks["open"].features["user_open_rate"] == before.tasks["open"].features["user_open_rate"]


def test_a_champion_without_a_reference_is_reported_and_the_refresh_goes_on(refresh_inputs):
    from serving.drift import check_drift

    cfg, champions, matrix, scores = refresh_inputs
    client = _client(cfg)
    older = client.create_run(client.get_experiment_by_name(cfg.tracking.experiment).experiment_id).info.run_id
    before_drift = dataclasses.replace(champions, open=dataclasses.replace(champions.open, run_id=older))
    report = check_drift(matrix, scores, before_drift, cfg, refresh_id="refresh-test-2")
    assert report.error is None and set(report.tasks) == {"churn"}
    assert "no drift_reference.json" in report.unmeasured["open"]
    assert "open:" in report.summary() and report.run_id
    run = client.get_run(report.run_id)
    assert "psi_prediction_churn" in run.data.metrics and "psi_prediction_open" not in run.data.metrics
    assert "no drift_reference.json" in run.data.tags["unmeasured_open"]
    # a store that cannot answer is reported, not raised: the tags must still be published
    broken = dataclasses.replace(champions, open=dataclasses.replace(champions.open, run_id="0" * 32))
    failed = check_drift(matrix, scores, broken, cfg)
    assert failed.error and failed.summary().startswith("drift not measured")
