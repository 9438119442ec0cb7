"""``--cluster``: features, training and scoring by user partition on a real 2-worker Dask
``LocalCluster`` (processes, one thread each) give the one-machine answer: the features
exactly (the two low-rank profile families within ``PROFILE_RTOL``), the training run's
holdout metrics within ``METRIC_TOLERANCE`` with the same holdout rows and the same run
structure, and the same tags."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from features.cluster import ClusterError, parse_cluster
from tests.conftest import make_events

pytestmark = pytest.mark.integration


def test_cluster_addresses():
    assert parse_cluster("local:2").local_workers == 2
    assert parse_cluster("tcp://scheduler:8786").address == "tcp://scheduler:8786"
    assert parse_cluster("10.0.0.5:8786").address == "tcp://10.0.0.5:8786"
    for bad in ("local:0", "local:two", "", "tcp://a b:1"):
        with pytest.raises(ClusterError, match="--cluster"):
            parse_cluster(bad)


def test_prior_sums_add_up_to_the_population_priors(trained):
    """The sums the partitions send follow features.matrix's priors (and its profile)."""
    from features.matrix import counts_of, population_priors
    from features.partitioned import combine_prior_sums, prior_sums
    from features.state import build_state

    cfg, log = trained["cfg"], trained["log"]
    counts = counts_of(build_state(log, log.max_ts(), cfg))
    whole = population_priors(counts, cfg, "everyone")
    ids = pd.Index(counts.user_ids)
    thirds = [counts.take(ids[k::3]) for k in range(3)]
    combined = combine_prior_sums([prior_sums(c) for c in thirds], cfg, "everyone")
    np.testing.assert_array_equal(combined.slot_rate, whole.slot_rate)       # integer counts add exactly
    assert combined.overall_rate == whole.overall_rate
    np.testing.assert_allclose(combined.profile_mean, whole.profile_mean, rtol=0, atol=1e-12)
    # eigenvectors up to sign
    signs = np.sign((combined.profile_basis * whole.profile_basis).sum(axis=0))
    np.testing.assert_allclose(combined.profile_basis * signs, whole.profile_basis, rtol=0, atol=1e-10)


def test_partitions_hold_every_user_once(trained):
    from features.events import open_log

    sim = trained["sim"]
    parts = [open_log(sim / "events.parquet", sim / "users.parquet", partition=(k, 3), prevalidated=True)
             for k in range(3)]
    users = [set(p.query_df("SELECT user_id FROM users")["user_id"]) for p in parts]
    seen = [set(p.query_df("SELECT DISTINCT user_id FROM events")["user_id"]) for p in parts]
    whole = trained["log"]
    assert set().union(*users) == set(whole.query_df("SELECT user_id FROM users")["user_id"])
    assert set().union(*seen) == set(whole.query_df("SELECT DISTINCT user_id FROM events")["user_id"])
    assert sum(len(u) for u in users) == len(set().union(*users))
    assert sum(len(s) for s in seen) == len(set().union(*seen))


def test_a_partition_leaves_out_the_rows_the_client_quarantined(tmp_path):
    from features.events import EventLogError, open_log

    frame = make_events([(f"u{i}", "2026-01-01", "open") for i in range(20)] + [("u3", "2026-01-02", "opne")])
    frame.to_parquet(tmp_path / "events.parquet")
    with pytest.raises(EventLogError, match="unknown event name"):
        open_log(tmp_path / "events.parquet")
    whole = open_log(tmp_path / "events.parquet", quarantine=tmp_path / "bad.parquet")
    assert whole.quarantined_rows == 1
    parts = [open_log(tmp_path / "events.parquet", partition=(k, 2), prevalidated=True) for k in range(2)]
    assert sum(p.query_df("SELECT count(*) AS n FROM events")["n"][0] for p in parts) == 20


# ---------------------------------------------------------------- on a LocalCluster

@pytest.fixture(scope="module")
def cluster(trained):
    from features.cluster import cluster_client, plan_partitions
    from features.partitioned import LogSource

    cfg, sim = trained["cfg"], trained["sim"]
    with cluster_client("local:2", cfg) as client:
        source = LogSource.of(sim / "events.parquet", sim / "users.parquet", cfg)
        yield {"client": client, "parts": plan_partitions(client, cfg), "source": source,
               "whole": source.open_whole(cfg)}


def test_features_on_the_cluster_are_the_one_machine_features(cluster, trained):
    from features.matrix import build_matrix
    from features.partitioned import PROFILE_FAMILIES, PROFILE_RTOL, build_matrix_on_cluster

    cfg, log = trained["cfg"], trained["log"]
    as_of = log.max_ts()
    assert cluster["parts"].n_parts == 2
    here, priors_here = build_matrix(log, as_of, cfg)
    there, priors_there = build_matrix_on_cluster(cluster["client"], cluster["parts"], cluster["source"], as_of, cfg)
    assert there.user_ids.equals(here.user_ids)
    pd.testing.assert_frame_equal(there.scalars, here.scalars)
    np.testing.assert_array_equal(priors_there.slot_rate, priors_here.slot_rate)
    np.testing.assert_allclose(priors_there.profile_mean, priors_here.profile_mean, rtol=0, atol=1e-12)
    assert priors_there.population == priors_here.population
    assert set(there.slots) == set(here.slots)
    for family, values in here.slots.items():
        if family in PROFILE_FAMILIES:
            np.testing.assert_allclose(there.slots[family], values, rtol=PROFILE_RTOL, atol=0, err_msg=family)
        else:
            np.testing.assert_array_equal(there.slots[family], values, err_msg=family)


def test_training_on_the_cluster_is_a_one_machine_run(cluster, trained):
    import mlflow

    from training.distributed import METRIC_TOLERANCE, train_task_on_cluster

    # a model name of its own, so the session's champions and versions are untouched
    cfg = trained["cfg"].with_overrides(tracking={"model_prefix": "cluster-test"})
    here = trained["results"][("open", "lightgbm")]
    there = train_task_on_cluster(cluster["client"], cluster["parts"], cluster["source"], cluster["whole"], "open",
                                  "lightgbm", cfg, cluster="local:2")
    assert there.version == "1" and there.model_name == "cluster-test-open"
    for metric, tolerance in METRIC_TOLERANCE.items():
        assert abs(there.metrics[metric] - here.metrics[metric]) <= tolerance, metric
    for count in ("n_train", "n_valid", "n_holdout", "n_features"):
        assert there.metrics[count] == here.metrics[count], count
    runs = {}
    client = mlflow.MlflowClient(tracking_uri=cfg.tracking.resolved_uri())
    for name, run_id in (("here", here.run_id), ("there", there.run_id)):
        run = client.get_run(run_id)
        artifacts = {a.path for a in client.list_artifacts(run_id)}
        artifacts |= {a.path for folder in ("plots", "config", "features", "calibration")
                      for a in client.list_artifacts(run_id, folder)}
        curve = [m.step for m in client.get_metric_history(run_id, "valid_log_loss")]
        runs[name] = (run, artifacts, curve)
    (run_h, art_h, curve_h), (run_t, art_t, curve_t) = runs["here"], runs["there"]
    assert set(run_t.data.params) == set(run_h.data.params)
    assert set(run_t.data.metrics) == set(run_h.data.metrics)
    assert art_t == art_h
    # the same holdout rows (so versions compare on them), and a learning curve every tenth round
    assert run_t.data.tags["holdout_digest"] == run_h.data.tags["holdout_digest"]
    assert run_t.data.tags["cluster"] == "local:2" and run_t.data.tags["partitions"] == "2"
    assert curve_t[:3] == curve_h[:3] == [0, 10, 20]
    # the registered model takes the same inputs, categories included
    spec_here, spec_there = (mlflow.models.get_model_info(f"models:/{name}/{version}").metadata["feature_spec"]
                             for name, version in ((here.model_name, here.version), (there.model_name, "1")))
    assert spec_there == spec_here


def test_xgboost_on_the_cluster_measures_like_one_machine(cluster, trained):
    from training.distributed import METRIC_TOLERANCE, build_dataset_on_cluster, cluster_fitter
    from training.pipeline import fit_and_evaluate

    cfg = trained["cfg"]
    here = trained["results"][("open", "xgboost")].metrics
    ds = build_dataset_on_cluster(cluster["client"], cluster["parts"], cluster["source"], cluster["whole"], "open",
                                  None, cfg)
    try:
        there = fit_and_evaluate(ds, "xgboost", cfg, fit=cluster_fitter(cluster["client"], cluster["parts"])).metrics
    finally:
        for future in ds.train.parts:
            future.release()
    for metric, tolerance in METRIC_TOLERANCE.items():
        assert abs(there[metric] - here[metric]) <= tolerance, metric
    assert there["n_train"] == here["n_train"] and there["n_holdout"] == here["n_holdout"]


def test_scoring_on_the_cluster_gives_the_one_machine_tags(cluster, trained, tmp_path):
    import pyarrow.parquet as pq

    from features.snapshot import read_snapshot
    from features.state import read_state
    from serving.models import load_champions
    from serving.partitioned import refresh_on_cluster
    from serving.tagstore import current_refresh, refresh_lock

    cfg = trained["cfg"].with_overrides(serving={"serving_dir": str(tmp_path / "serving")})
    out = tmp_path / "tags.parquet"
    with refresh_lock(tmp_path / "serving") as lock:
        result = refresh_on_cluster(cluster["client"], cluster["parts"], cluster["source"], cluster["whole"], cfg,
                                    load_champions(cfg), out, None, lock)
    here_dir = current_refresh(trained["cfg"].serving.serving_dir).root
    there_dir = result.refresh.root
    assert current_refresh(cfg.serving.serving_dir).root == there_dir
    files = ("tags.parquet", "tags.duckdb", "features.parquet", "priors.parquet", "manifest.json",
             "plan_users.parquet", "plan_sends.parquet")
    assert all((there_dir / f).exists() for f in files)
    # the contract's Parquet schema; pandas' own metadata aside, the same frames
    tables = [pq.read_table(path) for path in (trained["tags"], out)]
    assert tables[1].schema.remove_metadata() == tables[0].schema.remove_metadata()
    here, there = (t.to_pandas(ignore_metadata=True).drop(columns=["scored_at"]) for t in tables)
    assert there["user_id"].tolist() == here["user_id"].tolist()
    probs_here, probs_there = (np.vstack(t["slot_open_probs"].to_numpy()) for t in (here, there))
    np.testing.assert_allclose(probs_there, probs_here, rtol=0, atol=1e-6)
    np.testing.assert_allclose(there["churn_prob"], here["churn_prob"], rtol=0, atol=1e-6)
    exact = ["best_slot", "churn_tier", "cold_start", "unsubscribed", "open_model_version", "churn_model_version"]
    pd.testing.assert_frame_equal(there[exact], here[exact])
    pd.testing.assert_series_equal(there["churn_reasons"].map(tuple, na_action="ignore"),
                                   here["churn_reasons"].map(tuple, na_action="ignore"))
    pd.testing.assert_frame_equal(pd.read_parquet(there_dir / "priors.parquet"),
                                  pd.read_parquet(here_dir / "priors.parquet"))
    matrix_here, manifest_here = read_snapshot(here_dir)
    matrix_there, manifest_there = read_snapshot(there_dir)
    pd.testing.assert_frame_equal(matrix_there.scalars, matrix_here.scalars)
    assert set(manifest_there) == set(manifest_here)
    plan_here, plan_there = (pd.read_parquet(d / "plan_users.parquet").sort_values("user_id", ignore_index=True)
                             for d in (here_dir, there_dir))
    pd.testing.assert_frame_equal(plan_there, plan_here)
    # the feature state the next refresh moves forward: the one-machine state, array for array
    (state_here, meta_here), (state_there, meta_there) = read_state(here_dir), read_state(there_dir)
    assert meta_there["log"] == meta_here["log"] and meta_there["config"] == meta_here["config"]
    np.testing.assert_array_equal(state_there.user_ids, state_here.user_ids)
    for name in ("scan", "slots", "matured"):
        for key, values in getattr(state_here, name).items():
            if values.dtype.kind == "f":
                # float sums (age weights, purchase values): DuckDB adds them in another order
                np.testing.assert_allclose(getattr(state_there, name)[key], values, rtol=1e-12,
                                           err_msg=f"{name}.{key}")
            else:
                np.testing.assert_array_equal(getattr(state_there, name)[key], values, err_msg=f"{name}.{key}")
    assert "2 user partitions" in result.features
