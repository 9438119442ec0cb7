"""Hyper-parameter search with Optuna: a persistent study beside the MLflow store
(an interrupted search resumes where it stopped), pruning of hopeless trials, a
time-split objective (validation log loss; the holdout stays untouched), and each
trial as a nested MLflow run."""

from __future__ import annotations

import logging
from typing import Any

import mlflow
import optuna

from configs import Config
from training.datasets import Dataset
from training.tracking import configure_tracking
from training.trainers import fit_model

__all__ = ["tune", "best_params_for", "study_name", "search_space"]

log = logging.getLogger(__name__)


def study_name(cfg: Config, task: str, library: str) -> str:
    return f"{cfg.tracking.model_prefix}-{task}-{library}"


def _storage(cfg: Config) -> str:
    storage = cfg.tuning.storage
    if storage.startswith("sqlite:///"):
        from pathlib import Path

        Path(storage[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    return storage


def search_space(trial: optuna.Trial, library: str) -> dict[str, Any]:
    if library == "lightgbm":
        return {
            "learning_rate": trial.suggest_float("learning_rate", 0.02, 0.2, log=True),
            "num_leaves": trial.suggest_int("num_leaves", 15, 127, log=True),
            "min_data_in_leaf": trial.suggest_int("min_data_in_leaf", 20, 500, log=True),
            "feature_fraction": trial.suggest_float("feature_fraction", 0.5, 1.0),
            "bagging_fraction": trial.suggest_float("bagging_fraction", 0.5, 1.0),
            "lambda_l2": trial.suggest_float("lambda_l2", 1e-3, 30.0, log=True),
        }
    return {
        "eta": trial.suggest_float("eta", 0.02, 0.2, log=True),
        "max_depth": trial.suggest_int("max_depth", 3, 10),
        "min_child_weight": trial.suggest_float("min_child_weight", 1.0, 200.0, log=True),
        "subsample": trial.suggest_float("subsample", 0.5, 1.0),
        "colsample_bytree": trial.suggest_float("colsample_bytree", 0.5, 1.0),
        "lambda": trial.suggest_float("lambda", 1e-3, 30.0, log=True),
    }


class _PruneLightGBM:
    order = 25

    def __init__(self, trial: optuna.Trial, every: int = 10) -> None:
        self.trial, self.every = trial, every

    def __call__(self, env) -> None:
        if env.iteration % self.every:
            return
        for data, name, value, _ in env.evaluation_result_list:
            if data == "valid" and name == "binary_logloss":
                self.trial.report(value, env.iteration)
                if self.trial.should_prune():
                    raise optuna.TrialPruned(f"pruned at round {env.iteration}")


def _prune_xgboost(trial: optuna.Trial, every: int = 10):
    import xgboost as xgb

    class _Prune(xgb.callback.TrainingCallback):
        def after_iteration(self, model, epoch: int, evals_log: dict) -> bool:
            if epoch % every == 0:
                value = evals_log["valid"]["logloss"][-1]
                trial.report(value, epoch)
                if trial.should_prune():
                    raise optuna.TrialPruned(f"pruned at round {epoch}")
            return False

    return _Prune()


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
        study_name=study_name(cfg, ds.task, library), storage=_storage(cfg), load_if_exists=True,
        direction="minimize",
        sampler=optuna.samplers.TPESampler(seed=cfg.models.seed, n_startup_trials=cfg.tuning.startup_trials),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=cfg.tuning.startup_trials, n_warmup_steps=30),
    )
    done = len([t for t in study.trials if t.state.is_finished()])
    log.info("study %s: %d trial(s) already done, running %d more", study.study_name, done, trials)

    def objective(trial: optuna.Trial) -> float:
        params = search_space(trial, library)
        callback = _PruneLightGBM(trial) if library == "lightgbm" else _prune_xgboost(trial)
        with mlflow.start_run(run_name=f"trial-{trial.number}", nested=True,
                              tags={"task": ds.task, "library": library, "optuna_trial": str(trial.number),
                                    "optuna_study": study.study_name}):
            mlflow.log_params(params)
            try:
                fitted = fit_model(library, x_train, ds.train.label, x_valid, ds.valid.label, names, cfg,
                                   params, extra_callbacks=[callback])
            except optuna.TrialPruned:
                mlflow.set_tag("state", "pruned")
                raise
            from sklearn.metrics import log_loss

            from training.trainers import predict_raw

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


def best_params_for(cfg: Config, task: str, library: str) -> dict[str, Any]:
    """The best parameters of a finished study, for ``sendtime train --best-params``."""
    try:
        study = optuna.load_study(study_name=study_name(cfg, task, library), storage=_storage(cfg))
    except KeyError as exc:
        raise ValueError(f"no tuning study for {task}/{library}: run `sendtime tune --task {task} "
                         f"--model {library}` first") from exc
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        raise ValueError(f"the tuning study for {task}/{library} has no completed trial yet")
    params = dict(study.best_params)
    if library == "lightgbm":
        params["bagging_freq"] = 1
    return params
