"""LightGBM behind :class:`boosters.base.BoosterLibrary`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np
import pandas as pd

from boosters.base import BoosterLibrary, RoundReporter
from configs import Config

__all__ = ["LightGBMLibrary"]

_REPORT_EVERY = 10


def _reporting_callback(reporters: list[RoundReporter], every: int):
    def _callback(env: lgb.callback.CallbackEnv) -> None:
        if env.iteration % every:
            return
        metrics = {f"{data}_log_loss": float(value)
                   for data, name, value, _ in env.evaluation_result_list if name == "binary_logloss"}
        for report in reporters:
            report(metrics, env.iteration)

    _callback.order = 30  # after early stopping has seen the round
    return _callback


class LightGBMLibrary(BoosterLibrary):
    name = "lightgbm"
    flavor = "lightgbm"
    package = "lightgbm"

    def params(self, cfg: Config, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
        return {
            "objective": "binary",
            # AUC every round on millions of training rows cost more than the trees (a sort
            # per round); early stopping and the learning curves need only log loss, and AUC
            # is measured once on the holdout
            "metric": ["binary_logloss"],
            "verbosity": -1,
            "num_threads": cfg.models.threads,
            "seed": cfg.models.seed,
            "deterministic": True,
            "force_row_wise": True,
            **cfg.models.lightgbm,
            **(overrides or {}),
        }

    def _train(self, params, x_train, y_train, x_valid, y_valid, names, rounds, patience,
               reporters, threads):
        train = lgb.Dataset(x_train, y_train, feature_name=names, free_raw_data=True)
        valid = lgb.Dataset(x_valid, y_valid, reference=train)
        booster = lgb.train(
            params, train, num_boost_round=rounds, valid_sets=[train, valid],
            valid_names=["train", "valid"],
            callbacks=[lgb.early_stopping(patience, first_metric_only=True, verbose=False),
                       _reporting_callback(reporters, _REPORT_EVERY)],
        )
        return booster, booster.best_iteration or booster.current_iteration()

    def predict(self, booster: Any, x: np.ndarray) -> np.ndarray:
        return booster.predict(x, num_threads=0)

    def compiled(self, booster: Any, cache_dir: Path, sample: np.ndarray | None = None) -> Any:
        from boosters.compiled import compile_lightgbm

        return compile_lightgbm(booster, cache_dir, sample)

    def contributions(self, booster: Any, x: np.ndarray, names: list[str], threads: int = 1) -> np.ndarray:
        # TreeSHAP was the refresh's dearest step: each tree once per distinct way rows meet it
        from boosters.treeshap import contributions_by_tree

        return contributions_by_tree(booster, x, threads)

    def importance(self, booster: Any, names: list[str]) -> pd.Series:
        gain = booster.feature_importance(importance_type="gain")
        return pd.Series(gain, index=names).sort_values(ascending=False)

    def size_bytes(self, booster: Any) -> int:
        return len(booster.model_to_string().encode())

    def search_space(self, trial: Any) -> dict[str, Any]:
        return {
            "learning_rate": trial.suggest_float("learning_rate", 0.02, 0.2, log=True),
            "num_leaves": trial.suggest_int("num_leaves", 15, 127, log=True),
            "min_data_in_leaf": trial.suggest_int("min_data_in_leaf", 20, 500, log=True),
            "feature_fraction": trial.suggest_float("feature_fraction", 0.5, 1.0),
            "bagging_fraction": trial.suggest_float("bagging_fraction", 0.5, 1.0),
            "lambda_l2": trial.suggest_float("lambda_l2", 1e-3, 30.0, log=True),
        }

    def fixed_tuning_params(self) -> dict[str, Any]:
        return {"bagging_freq": 1}   # bagging_fraction is searched; it needs a frequency

    def log_model(self, booster: Any, **kwargs: Any) -> Any:
        import mlflow.lightgbm

        return mlflow.lightgbm.log_model(lgb_model=booster, **kwargs)

    def load_model(self, uri: str) -> Any:
        import mlflow.lightgbm

        return mlflow.lightgbm.load_model(uri)
