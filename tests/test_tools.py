"""Tuning, comparison and import: the ML engineer's other tools."""

from pathlib import Path

import pandas as pd
import pytest
from mlflow import MlflowClient

from features.events import EventLogError
from features.importer import ColumnMapping, import_table
from training.compare import compare_versions
from training.datasets import build_dataset
from training.tuning import best_params_for, tune

RETAIL = Path(__file__).resolve().parents[2] / "shared" / "data" / "online_retail" / "online_retail.parquet"


@pytest.mark.integration
def test_tuning_is_resumable_and_visible_in_mlflow(trained):
    cfg = trained["cfg"]
    ds = build_dataset(trained["log"], "churn", None, cfg, progress=False)
    study = tune(ds, "lightgbm", cfg, trials=3, progress=False)
    assert len(study.trials) == 3
    again = tune(ds, "lightgbm", cfg, trials=2, progress=False)   # resumes the stored study
    assert len(again.trials) == 5
    params = best_params_for(cfg, "churn", "lightgbm")
    assert "num_leaves" in params
    client = MlflowClient(tracking_uri=cfg.tracking.resolved_uri())
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    trials = client.search_runs([exp.experiment_id], f"tags.optuna_study = '{study.study_name}'")
    assert len([r for r in trials if "optuna_trial" in r.data.tags]) == 5


@pytest.mark.integration
def test_compare_lists_versions_on_one_holdout(trained):
    cfg = trained["cfg"]
    truth = pd.read_parquet(trained["sim"] / "truth.parquet")
    table = compare_versions(cfg, "open", truth=truth, log=trained["log"])
    assert set(table["library"]) == {"lightgbm", "xgboost"}
    for col in ("log_loss", "auc", "brier", "ece", "train_s", "predict_krows_s", "size_kb", "slot_capture"):
        assert table[col].notna().all(), col
    assert (table["champion"] == "yes").sum() == 1


def test_import_maps_columns_and_rejects_bad_rows(tmp_path):
    src = pd.DataFrame({"cust": [1.0, 2.0, None, 3.0], "when": ["2026-01-01 10:00", "2026-01-02 11:00",
                                                                 "2026-01-02 12:00", "not a time"],
                        "amount": [5.0, 6.0, 7.0, 8.0]})
    src.to_parquet(tmp_path / "src.parquet")
    mapping = ColumnMapping(user="cust", time="when", event_name="purchase", value="amount")
    with pytest.raises(EventLogError) as err:
        import_table(tmp_path / "src.parquet", mapping, tmp_path / "events.parquet")
    assert "'cust': 1 row(s)" in str(err.value) and "'when': 1 row(s)" in str(err.value)
    summary = import_table(tmp_path / "src.parquet", mapping, tmp_path / "events.parquet",
                           quarantine=tmp_path / "bad.parquet")
    assert summary.n_events == 2 and summary.n_quarantined == 2
    events = pd.read_parquet(tmp_path / "events.parquet")
    assert events["user_id"].tolist() == ["1", "2"] and set(events["event"]) == {"purchase"}
    with pytest.raises(EventLogError, match="not in the source"):
        import_table(tmp_path / "src.parquet", ColumnMapping(user="nope", time="when", event_name="purchase"),
                     tmp_path / "x.parquet")


def test_import_keeps_time_offsets_brackets_filters_and_rejects_non_numbers(tmp_path):
    pd.DataFrame({"cust": list("abcde"),
                  "when": ["2026-01-01T08:00:00+08:00", "2026-01-01 08:00", "2026-01-02", "2026-01-03T10:00Z",
                           "2026-01-03 10:00"],
                  "kind": ["x", "y", "z", "x", "x"], "amt": ["1.5", "2", "3", "4", "oops"]}).to_csv(
        tmp_path / "src.csv", index=False)
    mapping = ColumnMapping(user="cust", time="when", event_name="purchase", value="amt",
                            where="kind = 'x' OR kind = 'z'")
    with pytest.raises(EventLogError, match=r"value 'amt': 1 row\(s\).*row 5: 'oops'"):
        import_table(tmp_path / "src.csv", mapping, tmp_path / "events.parquet")
    summary = import_table(tmp_path / "src.csv", mapping, tmp_path / "events.parquet",
                           quarantine=tmp_path / "bad.parquet")
    assert summary.n_kept_by_filter == 4 and summary.n_quarantined == 1 and summary.n_events == 3
    events = pd.read_parquet(tmp_path / "events.parquet").set_index("user_id")
    assert events.loc["a", "ts"] == pd.Timestamp("2026-01-01 00:00")        # the offset is honoured
    assert events.loc["d", "ts"] == pd.Timestamp("2026-01-03 10:00")
    zoned = ColumnMapping(user="cust", time="when", event_name="purchase", source_timezone="Asia/Shanghai")
    import_table(tmp_path / "src.csv", zoned, tmp_path / "z.parquet")
    z = pd.read_parquet(tmp_path / "z.parquet").set_index("user_id")["ts"]
    assert z["a"] == pd.Timestamp("2026-01-01 00:00") and z["b"] == pd.Timestamp("2026-01-01 00:00")
    assert z["c"] == pd.Timestamp("2026-01-01 16:00")                       # a date is not an offset


@pytest.mark.skipif(not RETAIL.exists(), reason="shared/data/online_retail is not on this machine")
def test_online_retail_imports_and_trains_churn(tmp_path, monkeypatch):
    from configs import load_config
    from features.events import open_log
    from training.pipeline import train_task

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    mapping = ColumnMapping(user="CustomerID", time="InvoiceDate", event_name="purchase",
                            value="Quantity * UnitPrice", message_id="InvoiceNo", group_by="InvoiceNo",
                            where="NOT starts_with(InvoiceNo, 'C')", source_timezone="Europe/London")
    summary = import_table(RETAIL, mapping, tmp_path / "events.parquet", quarantine=tmp_path / "bad.parquet")
    assert summary.n_quarantined > 100_000          # rows without a customer, kept aside
    assert 4000 < pd.read_parquet(tmp_path / "events.parquet")["user_id"].nunique() < 4500
    cfg = load_config()
    result = train_task(open_log(tmp_path / "events.parquet"), "churn", "lightgbm", cfg, progress=False)
    assert result.metrics["holdout_auc"] > 0.65
    assert result.metrics["holdout_auc"] > result.metrics["holdout_baseline_frequency_auc"]
