"""MLflow set-up: where runs and artifacts live. Called by jobs, never on import."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

import mlflow

from configs import Config

__all__ = ["configure_tracking", "artifact_root", "datasets_dir"]


def _sqlite_path(uri: str) -> Path | None:
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):])
    return None


def artifact_root(cfg: Config) -> Path:
    """Artifacts go beside the SQLite database when MLFLOW_TRACKING_URI moves it."""
    uri = cfg.tracking.resolved_uri()
    db = _sqlite_path(uri)
    if os.environ.get("MLFLOW_TRACKING_URI") and db is not None:
        return (db.parent / "artifacts").resolve()
    return Path(cfg.tracking.artifact_root).resolve()


def datasets_dir(cfg: Config) -> Path:
    """Holdout sets saved by digest, so versions can be compared on the same rows."""
    return artifact_root(cfg).parent / "datasets"


def configure_tracking(cfg: Config) -> str:
    """Point MLflow at the store and make sure the experiment exists; returns its id."""
    uri = cfg.tracking.resolved_uri()
    db = _sqlite_path(uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    root = artifact_root(cfg)
    root.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.get_experiment_by_name(cfg.tracking.experiment)
    if experiment is None:
        exp_id = mlflow.create_experiment(
            cfg.tracking.experiment, artifact_location=(root / cfg.tracking.experiment).as_uri()
        )
    else:
        exp_id = experiment.experiment_id
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def is_local_uri(uri: str) -> bool:
    return urlparse(uri).scheme in ("", "file", "sqlite")
