"""XGBoost behind :class:`boosters.base.BoosterLibrary`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xgboost as xgb

from boosters.base import BoosterLibrary, RoundReporter
from configs import Config

__all__ = ["XGBoostLibrary"]

_REPORT_EVERY = 10


class _Reporting(xgb.callback.TrainingCallback):
    def __init__(self, reporters: list[RoundReporter], every: int) -> None:
        self.reporters, self.every = reporters, every

    def after_iteration(self, model: Any, epoch: int, evals_log: dict) -> bool:
        if epoch % self.every == 0:
            metrics = {f"{data}_log_loss": float(by_metric["logloss"][-1])
                       for data, by_metric in evals_log.items() if "logloss" in by_metric}
            for report in self.reporters:
                report(metrics, epoch)
        return False


class XGBoostLibrary(BoosterLibrary):
    name = "xgboost"
    flavor = "xgboost"
    package = "xgboost-cpu"

    def params(self, cfg: Config, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
        return {
            "objective": "binary:logistic",
            "eval_metric": ["logloss"],
            "nthread": cfg.models.threads,
            "seed": cfg.models.seed,
            "verbosity": 0,
            **cfg.models.xgboost,
            **(overrides or {}),
        }

    def _train(self, params, x_train, y_train, x_valid, y_valid, names, rounds, patience,
               reporters, threads):
        train = xgb.DMatrix(x_train, y_train, feature_names=names, nthread=threads)
        valid = xgb.DMatrix(x_valid, y_valid, feature_names=names, nthread=threads)
        booster = xgb.train(
            params, train, num_boost_round=rounds, evals=[(train, "train"), (valid, "valid")],
            early_stopping_rounds=patience, verbose_eval=False,
            callbacks=[_Reporting(reporters, _REPORT_EVERY)],
        )
        best = int(booster.best_iteration) + 1
        # keep only the trees up to the best round, so every consumer predicts the same
        return booster[:best], best

    def predict(self, booster: Any, x: np.ndarray) -> np.ndarray:
        return booster.inplace_predict(x)

    def compiled(self, booster: Any, cache_dir: Path, sample: np.ndarray | None = None) -> Any:
        from boosters.compiled import CompilationError

        # measured (boosters.compiled): treelite + tl2cgen give other float32 sums and no speed-up
        raise CompilationError("XGBoost models keep inplace_predict (treelite's compiled trees are "
                               "neither identical nor faster here)")

    def contributions(self, booster: Any, x: np.ndarray, names: list[str], threads: int = 1) -> np.ndarray:
        return booster.predict(xgb.DMatrix(x, feature_names=names, nthread=threads), pred_contribs=True)

    def importance(self, booster: Any, names: list[str]) -> pd.Series:
        scores = booster.get_score(importance_type="total_gain")
        return pd.Series({n: scores.get(n, 0.0) for n in names}).sort_values(ascending=False)

    def size_bytes(self, booster: Any) -> int:
        return len(booster.save_raw("ubj"))

    def search_space(self, trial: Any) -> dict[str, Any]:
        return {
            "eta": trial.suggest_float("eta", 0.02, 0.2, log=True),
            "max_depth": trial.suggest_int("max_depth", 3, 10),
            "min_child_weight": trial.suggest_float("min_child_weight", 1.0, 200.0, log=True),
            "subsample": trial.suggest_float("subsample", 0.5, 1.0),
            "colsample_bytree": trial.suggest_float("colsample_bytree", 0.5, 1.0),
            "lambda": trial.suggest_float("lambda", 1e-3, 30.0, log=True),
        }

    def log_model(self, booster: Any, **kwargs: Any) -> Any:
        import mlflow.xgboost

        return mlflow.xgboost.log_model(xgb_model=booster, **kwargs)

    def load_model(self, uri: str) -> Any:
        import mlflow.xgboost

        booster = mlflow.xgboost.load_model(uri)
        return booster.get_booster() if hasattr(booster, "get_booster") else booster
