"""Side by side: candidate versions of one task measured on the same holdout rows (and,
on simulated data, against the truth), so an ML engineer can pick a champion."""

from __future__ import annotations

import time
from pathlib import Path

import matplotlib.pyplot as plt
import mlflow
import numpy as np
import pandas as pd
from mlflow import MlflowClient

from configs import Config, resolve_as_of
from features.events import EventLog
from features.matrix import UserMatrix, build_matrix
from serving.core import slot_probabilities
from serving.predictor import LoadedModel, alias_version, load_registered_model
from simulator.judge import expected_log_loss, slot_capture
from training import plots
from training.metrics import binary_metrics
from training.registry import list_versions, load_holdout
from training.tracking import configure_tracking

__all__ = ["compare_versions", "truth_matrix", "version_slot_probabilities"]


def truth_matrix(log: EventLog, cfg: Config, user_ids: pd.Series) -> UserMatrix:
    """The features of the truth's users as of the log's end (the truth's snapshot)."""
    matrix, _ = build_matrix(log, resolve_as_of(None, log.max_ts), cfg, user_ids=pd.Index(user_ids))
    return matrix


def version_slot_probabilities(model: LoadedModel, matrix: UserMatrix) -> np.ndarray:
    """Every user's per-slot probabilities from one version, through the scoring core
    (the numbers the nightly refresh and /recommend give with the same model)."""
    return slot_probabilities(model, matrix, np.arange(len(matrix)))


def compare_versions(cfg: Config, task: str, versions: list[str] | None = None,
                     truth: pd.DataFrame | None = None, log: EventLog | None = None,
                     log_to_mlflow: bool = True) -> pd.DataFrame:
    configure_tracking(cfg)
    client = MlflowClient()
    name = cfg.tracking.model_name(task)
    registered = list_versions(client, name)
    if not registered:
        raise ValueError(f"no versions of {name!r} registered yet")
    chosen = [v for v in registered if versions is None or str(v.version) in {str(x) for x in versions}]
    if not chosen:
        raise ValueError(f"none of the versions {versions} exist for {name!r}")
    newest_run = client.get_run(registered[-1].run_id)
    holdout_path = newest_run.data.tags.get("holdout_path")
    if not holdout_path or not Path(holdout_path).exists():
        raise FileNotFoundError(f"the newest version's holdout is missing ({holdout_path})")
    rows, label, _ = load_holdout(holdout_path)
    champion = alias_version(client, name, cfg.tracking.champion_alias)
    matrix = p_true = None
    if truth is not None and log is not None and task == "open":
        matrix = truth_matrix(log, cfg, truth["user_id"])
        order = matrix.user_ids.get_indexer(truth["user_id"])
        p_true = np.vstack(truth["true_open_probs"].to_numpy())[np.argsort(order)] if (order >= 0).all() else None
    records, curves = [], {}
    for mv in chosen:
        model = load_registered_model(cfg.tracking.resolved_uri(), name, version=mv.version)
        run = client.get_run(mv.run_id)
        x = model.spec.encode(rows)
        start = time.perf_counter()
        p = model.predict_array(x)
        seconds = time.perf_counter() - start
        metrics = binary_metrics(label, p, cfg.datasets.calibration_bins)
        record = {
            "version": str(mv.version),
            "library": model.library.name,
            "tuned": run.data.tags.get("tuned", "false"),
            "champion": "yes" if str(mv.version) == champion else "",
            "log_loss": metrics["log_loss"], "auc": metrics["auc"], "brier": metrics["brier"],
            "ece": metrics["ece"],
            "train_s": run.data.metrics.get("train_seconds", np.nan),
            "predict_krows_s": len(x) / max(seconds, 1e-9) / 1000,
            "size_kb": run.data.metrics.get("model_size_bytes", np.nan) / 1024,
        }
        if p_true is not None and matrix is not None:
            q = version_slot_probabilities(model, matrix)
            record["slot_capture"] = slot_capture(p_true, q.argmax(axis=1))
            record["exp_log_loss_vs_oracle"] = expected_log_loss(p_true, q) / expected_log_loss(p_true, p_true) - 1
        records.append(record)
        curves[f"v{mv.version} {model.library.name}"] = p
    table = pd.DataFrame(records)
    if log_to_mlflow:
        with mlflow.start_run(run_name=f"compare-{task}", tags={"task": task, "kind": "comparison",
                                                               "holdout_path": holdout_path}):
            mlflow.log_table(table, "comparison/table.json")
            fig = plots.reliability_figure(label, curves)
            mlflow.log_figure(fig, "plots/reliability_by_version.png")
            plt.close(fig)
    return table
