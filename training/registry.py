"""The Model Registry side: which version is champion, and whether a new one deserves it.

Versions are compared on the same holdout rows: each run saves its holdout by digest,
and a version trained on another holdout is re-measured on the candidate's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from mlflow import MlflowClient

from configs import Config, SendtimeError
from serving.predictor import alias_version, load_registered_model
from training.metrics import binary_metrics
from training.tracking import configure_tracking

__all__ = ["PromotionRefused", "Promotion", "promote_champion", "rollback_champion",
           "load_holdout", "evaluate_version", "list_versions"]

log = logging.getLogger(__name__)


class PromotionRefused(SendtimeError, RuntimeError):
    """The gate said no; the message says why."""


@dataclass
class Promotion:
    task: str
    model_name: str
    version: str
    previous: str | None
    reason: str


def load_holdout(path: str | Path) -> tuple[pd.DataFrame, np.ndarray, pd.DataFrame]:
    frame = pd.read_parquet(path)
    meta_cols = [c for c in frame.columns if c.startswith("__meta_")]
    meta = frame[meta_cols].rename(columns=lambda c: c[len("__meta_"):])
    label = frame["__label"].to_numpy()
    rows = frame.drop(columns=meta_cols + ["__label"])
    return rows, label, meta


def list_versions(client: MlflowClient, name: str) -> list:
    versions = client.search_model_versions(f"name = '{name}'")
    return sorted(versions, key=lambda v: int(v.version))


def version_of(mv) -> str:
    """MLflow returns the version number as an int or a str depending on the call; use str."""
    return str(mv.version)


def evaluate_version(cfg: Config, name: str, version: str, holdout_path: str | Path) -> dict[str, float]:
    """Metrics of one registered version on a saved holdout."""
    model = load_registered_model(cfg.tracking.resolved_uri(), name, version=version)
    rows, label, _ = load_holdout(holdout_path)
    return binary_metrics(label, model.predict(rows), cfg.datasets.calibration_bins)


def _holdout_log_loss(client: MlflowClient, mv) -> float:
    run = client.get_run(mv.run_id)
    return float(run.data.metrics.get("holdout_log_loss", np.inf))


def promote_champion(cfg: Config, task: str, version: str | int | None = None,
                     force: bool = False) -> Promotion:
    """Point the champion alias at ``version`` (default: the best on the newest holdout).

    Refuses a version that is worse than the current champion, on the candidate's holdout,
    by more than ``tracking.gate_relative_margin``, unless ``force``.
    """
    configure_tracking(cfg)
    client = MlflowClient()
    name = cfg.tracking.model_name(task)
    versions = list_versions(client, name)
    if not versions:
        raise PromotionRefused(f"no versions of {name!r} are registered; run `sendtime train --task {task}` first")
    if version is None:
        newest_digest = versions[-1].tags.get("holdout_digest")
        same = [v for v in versions if v.tags.get("holdout_digest") == newest_digest] or versions
        candidate = min(same, key=lambda v: _holdout_log_loss(client, v))
        reason = f"best holdout log loss among {len(same)} version(s) on the newest holdout"
    else:
        matches = [v for v in versions if version_of(v) == str(version)]
        if not matches:
            raise PromotionRefused(f"{name!r} has no version {version}; it has "
                                   + ", ".join(version_of(v) for v in versions))
        candidate, reason = matches[0], "asked for by number"
    alias, previous_alias = cfg.tracking.champion_alias, cfg.tracking.previous_alias
    current = alias_version(client, name, alias)
    if current == version_of(candidate):
        return Promotion(task, name, version_of(candidate), current, f"version {current} is already {alias}")
    if current is not None:
        holdout = client.get_run(candidate.run_id).data.tags.get("holdout_path")
        if holdout and Path(holdout).exists():
            cand = evaluate_version(cfg, name, version_of(candidate), holdout)["log_loss"]
            champ = evaluate_version(cfg, name, current, holdout)["log_loss"]
            margin = cfg.tracking.gate_relative_margin
            verdict = (f"on holdout {Path(holdout).name}: candidate v{version_of(candidate)} log loss "
                       f"{cand:.5f}, champion v{current} {champ:.5f}")
            if cand > champ * (1 + margin) and not force:
                raise PromotionRefused(
                    f"version {version_of(candidate)} is worse than champion {current} by more than "
                    f"{margin:.1%} {verdict}; pass --force to promote it anyway")
            reason += f"; gate passed {verdict}" if cand <= champ * (1 + margin) else f"; forced {verdict}"
        elif not force:
            raise PromotionRefused(
                f"the gate cannot compare version {version_of(candidate)} with champion {current}: "
                f"the candidate's saved holdout is missing ({holdout or 'never recorded'}); "
                "pass --force to promote it without the comparison")
        else:
            reason += "; forced without the gate (the candidate's holdout is missing)"
        client.set_registered_model_alias(name, previous_alias, current)
    client.set_registered_model_alias(name, alias, version_of(candidate))
    return Promotion(task, name, version_of(candidate), current, reason)


def rollback_champion(cfg: Config, task: str) -> Promotion:
    """Swap the champion back to the version it replaced."""
    configure_tracking(cfg)
    client = MlflowClient()
    name = cfg.tracking.model_name(task)
    alias, previous_alias = cfg.tracking.champion_alias, cfg.tracking.previous_alias
    previous = alias_version(client, name, previous_alias)
    current = alias_version(client, name, alias)
    if previous is None:
        raise PromotionRefused(f"{name!r} has no {previous_alias!r} to roll back to")
    client.set_registered_model_alias(name, alias, previous)
    if current is not None:
        client.set_registered_model_alias(name, previous_alias, current)
    return Promotion(task, name, previous, current, f"rolled back from version {current}")
