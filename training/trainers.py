"""Fitting through the library adapters (``boosters``), with the learning curves flowing to
the active MLflow run through each library's own callback mechanism."""

from __future__ import annotations

from typing import Any

import mlflow
import numpy as np
import pandas as pd

from boosters import Fitted, adapter
from boosters.base import RoundReporter
from configs import Config

__all__ = ["Fitted", "feature_importance", "fit_model", "mlflow_reporter", "predict_raw"]


def mlflow_reporter(metrics: dict[str, float], step: int) -> None:
    """Learning curves to the active MLflow run (none outside a run)."""
    if mlflow.active_run() is not None and metrics:
        mlflow.log_metrics(metrics, step=step)


def fit_model(library: str, x_train: np.ndarray, y_train: np.ndarray, x_valid: np.ndarray,
              y_valid: np.ndarray, names: list[str], cfg: Config,
              overrides: dict[str, Any] | None = None,
              reporters: list[RoundReporter] | None = None) -> Fitted:
    """Train with early stopping on the (time-later) validation set."""
    return adapter(library).fit(x_train, y_train, x_valid, y_valid, names, cfg, overrides,
                                [mlflow_reporter, *(reporters or [])])


def predict_raw(library: str, booster: Any, x: np.ndarray) -> np.ndarray:
    return adapter(library).predict(booster, x)


def feature_importance(fitted: Fitted, names: list[str]) -> pd.Series:
    return adapter(fitted.library).importance(fitted.booster, names)
