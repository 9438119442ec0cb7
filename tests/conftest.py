"""Shared fixtures: small hand-made logs, a default config, MLflow pointed at tmp_path."""

from __future__ import annotations

import os

import pandas as pd
import pytest

from configs import load_config

os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")


@pytest.fixture(scope="session")
def cfg():
    return load_config()


def make_events(rows: list[tuple]) -> pd.DataFrame:
    """rows: (user_id, ts, event[, message_id])"""
    out = []
    for r in rows:
        user, ts, event, *rest = r
        out.append({"user_id": user, "ts": pd.Timestamp(ts, tz="UTC"), "event": event,
                    "message_id": rest[0] if rest else None})
    return pd.DataFrame(out)


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    """A real MLflow SQLite store under tmp_path for the test."""
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


# ---------------------------------------------------------------- a trained store, once per session

SMALL_OVERLAY = """
[models]
num_boost_round = 80
early_stopping_rounds = 15

[datasets]
open_train_snapshots = 3
churn_train_snapshots = 3

[tracking]
tracking_uri = "sqlite:///{root}/mlruns/mlflow.db"
artifact_root = "{root}/mlruns/artifacts"

[tuning]
storage = "sqlite:///{root}/mlruns/optuna.db"

[serving]
serving_dir = "{root}/serving"
"""


@pytest.fixture(scope="session")
def sim_dir(tmp_path_factory):
    """A small simulated log (1,500 users, 120 days), generated once. 120 days (the default
    data's length): churn needs three 30-day label horizons that do not overlap (training,
    validation, holdout) after 14 days of history, and room for the training snapshots."""
    from simulator.generate import simulate

    out = tmp_path_factory.mktemp("sim")
    simulate(load_config(), out, users=1500, days=120, seed=11, progress=False)
    return out


@pytest.fixture(scope="session")
def small_config(tmp_path_factory):
    """A config overlay file pointing MLflow and serving into a temporary folder."""
    root = tmp_path_factory.mktemp("store")
    path = root / "sendtime.toml"
    path.write_text(SMALL_OVERLAY.format(root=root))
    return path


@pytest.fixture(scope="session")
def trained(sim_dir, small_config):
    """Both tasks trained with LightGBM (and open with XGBoost), promoted, and scored."""
    from features.events import open_log
    from serving.models import load_champions
    from serving.refresh import refresh_tags
    from training.datasets import build_dataset
    from training.pipeline import train_task
    from training.registry import promote_champion

    old = os.environ.pop("MLFLOW_TRACKING_URI", None)
    cfg = load_config(small_config)
    log = open_log(sim_dir / "events.parquet", sim_dir / "users.parquet")
    results = {}
    for task, libraries in (("open", ("lightgbm", "xgboost")), ("churn", ("lightgbm",))):
        ds = build_dataset(log, task, None, cfg, progress=False)
        for library in libraries:
            results[(task, library)] = train_task(log, task, library, cfg, dataset=ds, progress=False)
        promote_champion(cfg, task)
    tags_path = small_config.parent / "tags.parquet"
    refresh = refresh_tags(log, cfg, load_champions(cfg), tags_path, progress=False)
    yield {"cfg": cfg, "config_path": small_config, "results": results, "log": log,
           "tags": tags_path, "refresh": refresh, "sim": sim_dir}
    if old is not None:
        os.environ["MLFLOW_TRACKING_URI"] = old
