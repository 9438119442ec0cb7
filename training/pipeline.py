"""One training run: dataset by time -> fit -> calibrate -> holdout metrics -> MLflow run
with plots and a new registered model version."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import mlflow
import numpy as np
import pandas as pd
from mlflow.models import infer_signature

from boosters import adapter, apply_calibration, blend_input
from configs import Config, write_atomic
from features.events import EventLog
from features.reference import REFERENCE_FILE
from features.rows import FeatureSpec
from training import plots
from training.calibration import fit_calibrator, with_rhythm_blend
from training.dataset_cache import cached_dataset
from training.datasets import Dataset
from training.metrics import binary_metrics, churn_baseline_aucs
from training.reference import build_reference
from training.tracking import configure_tracking, datasets_dir
from training.trainers import Fitted, feature_importance, fit_model, predict_raw

__all__ = ["Fitter", "TrainResult", "train_task", "fit_and_evaluate", "fit_on_this_machine", "save_holdout"]

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    task: str
    library: str
    run_id: str
    model_name: str
    version: str | None
    metrics: dict[str, float]


@dataclass
class Evaluated:
    fitted: Fitted
    spec: FeatureSpec
    calibrator: dict
    metrics: dict[str, float]
    p_holdout: np.ndarray
    p_holdout_raw: np.ndarray


# (dataset, library, config, overrides, round reporters) -> the model fitted on the training
# rows with early stopping on the validation rows, its feature spec, and the encoded
# validation rows; training.distributed fits on a Dask cluster instead
Fitter = Callable[[Dataset, str, Config, dict[str, Any] | None, list | None], tuple[Fitted, FeatureSpec, np.ndarray]]


def fit_on_this_machine(ds: Dataset, library: str, cfg: Config, overrides: dict[str, Any] | None = None,
                        reporters: list | None = None) -> tuple[Fitted, FeatureSpec, np.ndarray]:
    spec = FeatureSpec.fit(ds.train.rows, ds.categorical, cfg.features.max_attribute_levels)
    x_train, x_valid = spec.encode(ds.train.rows), spec.encode(ds.valid.rows)
    fitted = fit_model(library, x_train, ds.train.label, x_valid, ds.valid.label, list(spec.names), cfg,
                       overrides, reporters)
    return fitted, spec, x_valid


def fit_and_evaluate(ds: Dataset, library: str, cfg: Config, overrides: dict[str, Any] | None = None,
                     reporters: list | None = None, fit: Fitter = fit_on_this_machine) -> Evaluated:
    """Fit on train, stop early and calibrate on validation, measure on the holdout."""
    fitted, spec, x_valid = fit(ds, library, cfg, overrides, reporters)
    names = list(spec.names)
    x_hold = spec.encode(ds.holdout.rows)
    p_valid = predict_raw(library, fitted.booster, x_valid)
    calibrator, evidence = fit_calibrator(cfg.datasets.calibration, p_valid, ds.valid.label.astype(float),
                                          ds.valid.meta["user_id"].to_numpy())
    if ds.task == "open":
        calibrator = with_rhythm_blend(calibrator, names, cfg.models.open_rhythm_blend)
    start = time.perf_counter()
    p_raw = predict_raw(library, fitted.booster, x_hold)
    predict_seconds = time.perf_counter() - start
    p_cal = apply_calibration(p_raw, calibrator, blend_input(calibrator, x_hold))
    bins = cfg.datasets.calibration_bins
    metrics = {
        **binary_metrics(ds.holdout.label, p_cal, bins, prefix="holdout_"),
        **{k: v for k, v in binary_metrics(ds.holdout.label, p_raw, bins, prefix="holdout_raw_").items()
           if k.endswith(("log_loss", "ece", "auc"))},
        **binary_metrics(ds.valid.label, apply_calibration(p_valid, calibrator, blend_input(calibrator, x_valid)), bins,
                         prefix="valid_"),
        **evidence,
        "train_seconds": fitted.train_seconds,
        "predict_rows_per_second": len(x_hold) / max(predict_seconds, 1e-9),
        "best_iteration": float(fitted.best_iteration),
        "n_train": float(len(ds.train)),
        "n_valid": float(len(ds.valid)),
        "n_holdout": float(len(ds.holdout)),
        "n_features": float(len(names)),
    }
    if ds.task == "churn":
        longest = max(cfg.features.frequency_windows_days)
        metrics.update({f"holdout_{k}": v for k, v in
                        churn_baseline_aucs(ds.holdout.rows, ds.holdout.label, longest).items()})
    return Evaluated(fitted=fitted, spec=spec, calibrator=calibrator, metrics=metrics,
                     p_holdout=p_cal, p_holdout_raw=p_raw)


def save_holdout(ds: Dataset, cfg: Config) -> Path:
    """Keep the holdout rows by digest so other versions can be measured on them."""
    folder = datasets_dir(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{ds.task}-holdout-{ds.holdout_digest()}.parquet"
    if not path.exists():
        frame = ds.holdout.rows.copy()
        frame["__label"] = ds.holdout.label
        for col in ds.holdout.meta.columns:
            frame[f"__meta_{col}"] = ds.holdout.meta[col].to_numpy()
        write_atomic(path, lambda tmp: frame.to_parquet(tmp, index=False))
    return path


def _log_figures(ds: Dataset, ev: Evaluated) -> None:
    names = list(ev.spec.names)
    curves = {"raw": ev.p_holdout_raw, "calibrated": ev.p_holdout}
    figures = {
        "plots/reliability.png": plots.reliability_figure(ds.holdout.label, curves),
        "plots/feature_importance.png": plots.importance_figure(feature_importance(ev.fitted, names)),
    }
    if ds.task == "open":
        figures["plots/open_rate_by_weekday_hour.png"] = plots.open_heatmap_figure(
            ds.holdout.meta, ds.holdout.label, ev.p_holdout)
    else:
        figures["plots/churn_roc_and_scores.png"] = plots.churn_figure(ds.holdout.label, ev.p_holdout)
    for path, fig in figures.items():
        mlflow.log_figure(fig, path)
        plt.close(fig)


def _log_drift_reference(log_: EventLog, ds: Dataset, ev: Evaluated, library: str, cfg: Config) -> None:
    """The holdout snapshot's population, which each refresh's drift is measured against."""
    holdout = ds.snapshots.get("holdout")
    if not holdout:
        return
    reference = build_reference(log_, ds.task, datetime.fromisoformat(holdout[-1]), ev.spec, library,
                                ev.fitted.booster, ev.calibrator, feature_importance(ev.fitted, list(ev.spec.names)),
                                cfg)
    if reference is not None:
        mlflow.log_dict(reference.to_dict(), REFERENCE_FILE)


def train_task(
    log_: EventLog,
    task: str,
    library: str,
    cfg: Config,
    as_of: datetime | None = None,
    overrides: dict[str, Any] | None = None,
    register: bool = True,
    progress: bool = True,
    dataset: Dataset | None = None,
    run_name: str | None = None,
    extra_tags: dict[str, str] | None = None,
    fit: Fitter = fit_on_this_machine,
) -> TrainResult:
    """Train ``library`` for ``task`` on the log up to ``as_of``; log and register it.
    ``fit``: where the trees grow (:func:`fit_on_this_machine`, or a Dask cluster's)."""
    configure_tracking(cfg)
    ds = dataset or cached_dataset(log_, task, as_of, cfg, progress=progress)
    holdout_path = save_holdout(ds, cfg)
    model_name = cfg.tracking.model_name(task)
    tags = {"task": task, "library": library, "as_of": ds.as_of.isoformat(),
            "holdout_digest": ds.holdout_digest(), "holdout_path": str(holdout_path),
            "events": log_.sources.get("events", ""), **(extra_tags or {})}
    with mlflow.start_run(run_name=run_name or f"{task}-{library}", tags=tags) as run:
        mlflow.log_params({"task": task, "library": library, "as_of": ds.as_of.isoformat(),
                           "slots": cfg.slots.kind, **{f"override.{k}": v for k, v in (overrides or {}).items()}})
        mlflow.log_dict(cfg.model_dump(mode="json"), "config/resolved_config.json")
        mlflow.log_dict(ds.snapshots, "config/snapshots.json")
        ev = fit_and_evaluate(ds, library, cfg, overrides, fit=fit)
        mlflow.log_params({f"model.{k}": v for k, v in ev.fitted.params.items()
                           if k not in ("metric", "eval_metric")})
        ev.metrics["model_size_bytes"] = float(adapter(library).size_bytes(ev.fitted.booster))
        mlflow.log_metrics(ev.metrics)
        mlflow.log_dict({"features": list(ev.spec.names)}, "features/feature_list.json")
        mlflow.log_dict(ev.calibrator, "calibration/calibrator.json")
        _log_figures(ds, ev)
        _log_drift_reference(log_, ds, ev, library, cfg)
        sample = ds.holdout.rows.head(200)
        x_sample = pd.DataFrame(ev.spec.encode(sample), columns=list(ev.spec.names))
        signature = infer_signature(x_sample, ev.p_holdout[: len(sample)])
        metadata = {"task": task, "library": library, "feature_spec": ev.spec.to_dict(),
                    "calibrator": ev.calibrator, "holdout_digest": ds.holdout_digest(),
                    "as_of": ds.as_of.isoformat()}
        info = adapter(library).log_model(
            ev.fitted.booster, name="model", signature=signature, metadata=metadata,
            pip_requirements=adapter(library).pip_requirements(),
            registered_model_name=model_name if register else None,
        )
        version = str(info.registered_model_version) if register else None
        if version:
            client = mlflow.MlflowClient()
            for key, value in (("library", library), ("holdout_digest", ds.holdout_digest()),
                               ("holdout_log_loss", f"{ev.metrics['holdout_log_loss']:.6f}")):
                client.set_model_version_tag(model_name, version, key, value)
        log.info("%s/%s: holdout log loss %.4f, AUC %.4f -> %s version %s", task, library,
                 ev.metrics["holdout_log_loss"], ev.metrics["holdout_auc"], model_name, version)
        return TrainResult(task=task, library=library, run_id=run.info.run_id, model_name=model_name,
                           version=version, metrics=ev.metrics)
