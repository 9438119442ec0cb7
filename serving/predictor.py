"""Registered models, loaded once: the only place sendtime loads a model, and the one place
that resolves a registry alias.

A sendtime model version is a native LightGBM or XGBoost model in the MLflow registry
whose MLmodel metadata carries what scoring needs besides the trees: the feature spec
(inputs in order, category vocabularies) and the calibrator fitted on time-held-out data.
The library's own adapter (``boosters``) loads, predicts and explains it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from boosters import BoosterLibrary, adapter_for_flavors, apply_calibration
from configs import SendtimeError
from features.rows import FeatureSpec

__all__ = ["LoadedModel", "NoChampionError", "alias_version", "load_registered_model"]

log = logging.getLogger(__name__)


class NoChampionError(SendtimeError, LookupError):
    """No model version answers to the asked alias or number."""


def _missing(exc: Exception) -> bool:
    """MLflow's way of saying that a name, alias or version does not exist."""
    code = getattr(exc, "error_code", "")
    return code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND")


def alias_version(client: Any, name: str, alias: str) -> str | None:
    """The version ``name@alias`` points at, or None when the model or alias does not
    exist. Any other failure (an unreachable store, a broken database) is raised."""
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException as exc:
        if _missing(exc):
            return None
        raise


@dataclass
class LoadedModel:
    task: str
    library: BoosterLibrary
    name: str
    version: str
    run_id: str
    spec: FeatureSpec
    calibrator: dict
    booster: Any

    def predict_array(self, x: np.ndarray) -> np.ndarray:
        return apply_calibration(self.library.predict(self.booster, x), self.calibrator)

    def predict(self, rows: pd.DataFrame) -> np.ndarray:
        return self.predict_array(self.spec.encode(rows))

    def contributions(self, x: np.ndarray) -> np.ndarray:
        """SHAP contributions to the raw score, (n_rows, n_features + 1), from the library."""
        return self.library.contributions(self.booster, x, list(self.spec.names))


def load_registered_model(tracking_uri: str, name: str, *, alias: str | None = "champion",
                          version: str | int | None = None) -> LoadedModel:
    """Load ``models:/name@alias`` (or a version number) with its spec and calibrator."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri=tracking_uri)
    what = f"version {version}" if version is not None else f"alias @{alias}"
    if version is None:
        version = alias_version(client, name, alias)
        if version is None:
            raise NoChampionError(f"registered model {name!r} has no {what} in {tracking_uri}")
    try:
        mv = client.get_model_version(name, str(version))
    except MlflowException as exc:
        if not _missing(exc):
            raise
        raise NoChampionError(f"registered model {name!r} has no {what} in {tracking_uri}") from exc
    uri = f"models:/{name}/{mv.version}"
    info = mlflow.models.get_model_info(uri)
    meta = info.metadata or {}
    library = adapter_for_flavors(info.flavors)
    if library is None:
        raise NoChampionError(f"{uri} is not a model of a library sendtime knows "
                              f"(flavours: {', '.join(info.flavors)})")
    return LoadedModel(
        task=meta.get("task", ""),
        library=library,
        name=name,
        version=str(mv.version),
        run_id=mv.run_id,
        spec=FeatureSpec.from_dict(meta["feature_spec"]),
        calibrator=meta.get("calibrator", {"kind": "none"}),
        booster=library.load_model(uri),
    )
