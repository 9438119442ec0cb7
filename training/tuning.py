"""Hyper-parameter search with Optuna: a persistent study beside the MLflow store
(an interrupted search resumes where it stopped), pruning of hopeless trials, a
time-split objective (validation log loss; the holdout stays untouched), and each
trial as a nested MLflow run."""

from __future__ import annotations

import logging
import re
from datetime import datetime
from typing import Any

import mlflow
import optuna

from boosters import adapter
from configs import Config
from training.datasets import Dataset
from training.tracking import configure_tracking
from training.trainers import fit_model, predict_raw

__all__ = ["best_params_for", "study_name", "tune"]

log = logging.getLogger(__name__)


def _study_prefix(cfg: Config, task: str, library: str) -> str:
    return f"{cfg.tracking.model_prefix}-{task}-{library}"


def study_name(cfg: Config, ds: Dataset, library: str) -> str:
    """The study of ``library`` on this dataset. Keyed by the data: a study resumed on other
    data would mix trials whose losses are not comparable (and steer the sampler with them),
    so another log or as-of time starts a new study and the same data resumes its own."""
    return f"{_study_prefix(cfg, ds.task, library)}-{ds.training_digest()}"


def _data_description(ds: Dataset) -> dict[str, Any]:
    return {"as_of": ds.as_of.isoformat(), "train_snapshots": ds.snapshots.get("train", []),
            "valid_snapshots": ds.snapshots.get("valid", []), "train_rows": len(ds.train),
            "valid_rows": len(ds.valid)}


def _storage(cfg: Config) -> str:
    storage = cfg.tuning.storage
    if storage.startswith("sqlite:///"):
        from pathlib import Path

        Path(storage[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    return storage


def _pruning_reporter(trial: optuna.Trial):
    """Report the validation log loss to Optuna every few rounds; stop a hopeless trial."""

    def report(metrics: dict[str, float], step: int) -> None:
        if "valid_log_loss" in metrics:
            trial.report(metrics["valid_log_loss"], step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at round {step}")

    return report


def tune(ds: Dataset, library: str, cfg: Config, trials: int | None = None,
         progress: bool = True) -> optuna.Study:
    """Run (or resume) the study for this task and library; returns it."""
    from features.rows import FeatureSpec

    configure_tracking(cfg)
    trials = trials or cfg.tuning.trials
    spec = FeatureSpec.fit(ds.train.rows, ds.categorical, cfg.features.max_attribute_levels)
    x_train, x_valid = spec.encode(ds.train.rows), spec.encode(ds.valid.rows)
    names = list(spec.names)
    study = optuna.create_study(
        study_name=study_name(cfg, ds, library), storage=_storage(cfg), load_if_exists=True,
        direction="minimize",
        sampler=optuna.samplers.TPESampler(seed=cfg.models.seed, n_startup_trials=cfg.tuning.startup_trials),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=cfg.tuning.startup_trials, n_warmup_steps=30),
    )
    study.set_user_attr("data", _data_description(ds))
    done = len([t for t in study.trials if t.state.is_finished()])
    log.info("study %s: %d trial(s) already done, running %d more", study.study_name, done, trials)

    def objective(trial: optuna.Trial) -> float:
        params = adapter(library).search_space(trial)
        with mlflow.start_run(run_name=f"trial-{trial.number}", nested=True,
                              tags={"task": ds.task, "library": library, "optuna_trial": str(trial.number),
                                    "optuna_study": study.study_name}):
            mlflow.log_params(params)
            try:
                fitted = fit_model(library, x_train, ds.train.label, x_valid, ds.valid.label, names, cfg,
                                   params, reporters=[_pruning_reporter(trial)])
            except optuna.TrialPruned:
                mlflow.set_tag("state", "pruned")
                raise
            from sklearn.metrics import log_loss

            value = float(log_loss(ds.valid.label, predict_raw(library, fitted.booster, x_valid), labels=[0, 1]))
            trial.set_user_attr("best_iteration", fitted.best_iteration)
            mlflow.log_metrics({"valid_log_loss": value, "best_iteration": fitted.best_iteration,
                                "train_seconds": fitted.train_seconds})
            mlflow.set_tag("state", "complete")
            return value

    with mlflow.start_run(run_name=f"tune-{ds.task}-{library}",
                          tags={"task": ds.task, "library": library, "optuna_study": study.study_name,
                                "kind": "tuning"}):
        study.optimize(objective, n_trials=trials, show_progress_bar=progress, gc_after_trial=True)
        complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        if complete:
            mlflow.log_params({f"best.{k}": v for k, v in study.best_params.items()})
            mlflow.log_metrics({"best_valid_log_loss": study.best_value,
                                "n_trials": len(study.trials),
                                "n_pruned": len([t for t in study.trials
                                                 if t.state == optuna.trial.TrialState.PRUNED])})
            try:
                fig = optuna.visualization.matplotlib.plot_optimization_history(study).figure
                mlflow.log_figure(fig, "plots/optimization_history.png")
            except Exception as exc:  # plotting is a courtesy; never fail the search over it
                log.debug("no optimisation history plot: %s", exc)
    return study


def best_params_for(cfg: Config, task: str, library: str, ds: Dataset | None = None) -> dict[str, Any]:
    """The best parameters of a finished study, for ``sendtime train --best-params``: the
    study tuned on ``ds``, or (without one) the study of this task and library whose last
    trial finished most recently, whatever data it was tuned on."""
    storage = _storage(cfg)
    hint = f"run `sendtime tune --task {task} --model {library}` first"
    if ds is not None:
        try:
            study = optuna.load_study(study_name=study_name(cfg, ds, library), storage=storage)
        except KeyError as exc:
            raise ValueError(f"no tuning study for {task}/{library} on this data: {hint}") from exc
    else:
        keyed = re.compile(re.escape(_study_prefix(cfg, task, library)) + "-[0-9a-f]{16}")
        names = [n for n in optuna.get_all_study_names(storage) if keyed.fullmatch(n)]
        if not names:
            raise ValueError(f"no tuning study for {task}/{library}: {hint}")
        studies = [optuna.load_study(study_name=n, storage=storage) for n in names]
        study = max(studies, key=_last_finished)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        raise ValueError(f"the tuning study {study.study_name} has no completed trial yet")
    log.info("best parameters of study %s (tuned on %s)", study.study_name, study.user_attrs.get("data"))
    return {**study.best_params, **adapter(library).fixed_tuning_params()}


def _last_finished(study: optuna.Study) -> datetime:
    done = [t.datetime_complete for t in study.trials if t.datetime_complete is not None]
    return max(done, default=datetime.min)
