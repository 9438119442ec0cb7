"""LightGBM and XGBoost behind one small interface, with metrics flowing to MLflow
through each library's own callback mechanism."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import lightgbm as lgb
import mlflow
import numpy as np
import pandas as pd
import xgboost as xgb

from configs import Config

__all__ = ["LIBRARIES", "Fitted", "fit_model", "predict_raw", "feature_importance"]

LIBRARIES = ("lightgbm", "xgboost")
_LOG_EVERY = 10


@dataclass
class Fitted:
    library: str
    booster: Any
    best_iteration: int
    train_seconds: float
    params: dict[str, Any]


def _lightgbm_mlflow_callback(every: int) -> Callable:
    """Send LightGBM's evaluation results to the active MLflow run every few rounds."""

    def _callback(env: lgb.callback.CallbackEnv) -> None:
        if mlflow.active_run() is None or env.iteration % every:
            return
        metrics = {f"{data}_{name}": float(value) for data, name, value, _ in env.evaluation_result_list}
        mlflow.log_metrics(metrics, step=env.iteration)

    _callback.order = 30  # after early stopping has seen the round
    return _callback


class _XGBoostMLflowCallback(xgb.callback.TrainingCallback):
    def __init__(self, every: int) -> None:
        self.every = every

    def after_iteration(self, model: Any, epoch: int, evals_log: dict) -> bool:
        if mlflow.active_run() is not None and epoch % self.every == 0:
            metrics = {
                f"{data}_{name}": float(values[-1])
                for data, by_metric in evals_log.items()
                for name, values in by_metric.items()
            }
            mlflow.log_metrics(metrics, step=epoch)
        return False


def lightgbm_params(cfg: Config, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    params = {
        "objective": "binary",
        # AUC every round on millions of training rows cost more than the trees (a sort per
        # round); early stopping and the learning curves need only log loss, and AUC is
        # measured once on the holdout
        "metric": ["binary_logloss"],
        "verbosity": -1,
        "num_threads": cfg.models.threads,
        "seed": cfg.models.seed,
        "deterministic": True,
        "force_row_wise": True,
        **cfg.models.lightgbm,
    }
    params.update(overrides or {})
    return params


def xgboost_params(cfg: Config, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    params = {
        "objective": "binary:logistic",
        "eval_metric": ["logloss"],
        "nthread": cfg.models.threads,
        "seed": cfg.models.seed,
        "verbosity": 0,
        **cfg.models.xgboost,
    }
    params.update(overrides or {})
    return params


def fit_model(
    library: str,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_valid: np.ndarray,
    y_valid: np.ndarray,
    names: list[str],
    cfg: Config,
    overrides: dict[str, Any] | None = None,
    extra_callbacks: list | None = None,
) -> Fitted:
    """Train with early stopping on the (time-later) validation set."""
    rounds, patience = cfg.models.num_boost_round, cfg.models.early_stopping_rounds
    overrides = dict(overrides or {})
    rounds = int(overrides.pop("num_boost_round", rounds))
    start = time.perf_counter()
    if library == "lightgbm":
        params = lightgbm_params(cfg, overrides)
        train = lgb.Dataset(x_train, y_train, feature_name=names, free_raw_data=True)
        valid = lgb.Dataset(x_valid, y_valid, reference=train)
        booster = lgb.train(
            params, train, num_boost_round=rounds, valid_sets=[train, valid],
            valid_names=["train", "valid"],
            callbacks=[lgb.early_stopping(patience, first_metric_only=True, verbose=False),
                       _lightgbm_mlflow_callback(_LOG_EVERY), *(extra_callbacks or [])],
        )
        best = booster.best_iteration or booster.current_iteration()
    elif library == "xgboost":
        params = xgboost_params(cfg, overrides)
        train = xgb.DMatrix(x_train, y_train, feature_names=names, nthread=cfg.models.threads)
        valid = xgb.DMatrix(x_valid, y_valid, feature_names=names, nthread=cfg.models.threads)
        booster = xgb.train(
            params, train, num_boost_round=rounds, evals=[(train, "train"), (valid, "valid")],
            early_stopping_rounds=patience, verbose_eval=False,
            callbacks=[_XGBoostMLflowCallback(_LOG_EVERY), *(extra_callbacks or [])],
        )
        best = int(booster.best_iteration) + 1
        # keep only the trees up to the best round, so every consumer predicts the same
        booster = booster[:best]
    else:
        raise ValueError(f"unknown model library {library!r}; choose one of {', '.join(LIBRARIES)}")
    return Fitted(library=library, booster=booster, best_iteration=int(best),
                  train_seconds=time.perf_counter() - start, params=params)


def predict_raw(library: str, booster: Any, x: np.ndarray) -> np.ndarray:
    if library == "lightgbm":
        return booster.predict(x)
    return booster.inplace_predict(x)


def feature_importance(fitted: Fitted, names: list[str]) -> pd.Series:
    if fitted.library == "lightgbm":
        gain = fitted.booster.feature_importance(importance_type="gain")
        series = pd.Series(gain, index=names)
    else:
        scores = fitted.booster.get_score(importance_type="total_gain")
        series = pd.Series({n: scores.get(n, 0.0) for n in names})
    return series.sort_values(ascending=False)
