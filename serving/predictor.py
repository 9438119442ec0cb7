"""Registered models, loaded once: the only place sendtime loads a model.

A sendtime model version is a native LightGBM or XGBoost model in the MLflow registry
whose MLmodel metadata carries what scoring needs besides the trees: the feature spec
(inputs in order, category vocabularies) and the calibrator fitted on time-held-out data.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from features.rows import FeatureSpec

__all__ = ["LoadedModel", "load_registered_model", "apply_calibration", "NoChampionError"]

log = logging.getLogger(__name__)


class NoChampionError(LookupError):
    """No model version answers to the asked alias or number."""


def apply_calibration(p: np.ndarray, calibrator: dict) -> np.ndarray:
    """Map raw probabilities through a stored calibrator (see training.calibration)."""
    p = np.clip(np.asarray(p, dtype=float), 1e-6, 1 - 1e-6)
    kind = calibrator.get("kind", "none")
    if kind == "isotonic":
        # the tiny raw-score term keeps isotonic plateaus from tying slots of one user
        out = np.interp(p, calibrator["x"], calibrator["y"]) + 1e-6 * p
    elif kind == "sigmoid":
        z = calibrator["a"] * np.log(p / (1 - p)) + calibrator["b"]
        out = 1.0 / (1.0 + np.exp(-z))
    else:
        out = p
    return np.clip(out, 1e-6, 1 - 1e-6)


@dataclass
class LoadedModel:
    task: str
    library: str
    name: str
    version: str
    run_id: str
    spec: FeatureSpec
    calibrator: dict
    booster: Any

    def predict_array(self, x: np.ndarray) -> np.ndarray:
        if self.library == "lightgbm":
            raw = self.booster.predict(x, num_threads=0)
        else:
            raw = self.booster.inplace_predict(x)
        return apply_calibration(raw, self.calibrator)

    def predict(self, rows: pd.DataFrame) -> np.ndarray:
        return self.predict_array(self.spec.encode(rows))

    def contributions(self, x: np.ndarray) -> np.ndarray:
        """SHAP contributions to the raw score, (n_rows, n_features + 1), from the library."""
        if self.library == "lightgbm":
            return np.asarray(self.booster.predict(x, pred_contrib=True))
        import xgboost as xgb

        return self.booster.predict(xgb.DMatrix(x, feature_names=list(self.spec.names)), pred_contribs=True)


def load_registered_model(tracking_uri: str, name: str, *, alias: str | None = "champion",
                          version: str | int | None = None) -> LoadedModel:
    """Load ``models:/name@alias`` (or a version number) with its spec and calibrator."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri=tracking_uri)
    try:
        mv = (client.get_model_version(name, str(version)) if version is not None
              else client.get_model_version_by_alias(name, alias))
    except MlflowException as exc:
        what = f"version {version}" if version is not None else f"alias @{alias}"
        raise NoChampionError(f"registered model {name!r} has no {what} in {tracking_uri}") from exc
    uri = f"models:/{name}/{mv.version}"
    info = mlflow.models.get_model_info(uri)
    meta = info.metadata or {}
    if "lightgbm" in info.flavors:
        booster = mlflow.lightgbm.load_model(uri)
        library = "lightgbm"
    elif "xgboost" in info.flavors:
        booster = mlflow.xgboost.load_model(uri)
        library = "xgboost"
    else:
        raise NoChampionError(f"{uri} is neither a LightGBM nor an XGBoost model")
    if library == "xgboost" and hasattr(booster, "get_booster"):
        booster = booster.get_booster()
    return LoadedModel(
        task=meta.get("task", ""),
        library=library,
        name=name,
        version=str(mv.version),
        run_id=mv.run_id,
        spec=FeatureSpec.from_dict(meta["feature_spec"]),
        calibrator=meta.get("calibrator", {"kind": "none"}),
        booster=booster,
    )
