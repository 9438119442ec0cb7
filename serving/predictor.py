"""Registered models, loaded once: the only place sendtime loads a model, and the one place
that resolves a registry alias.

A sendtime model version is a native LightGBM or XGBoost model in the MLflow registry
whose MLmodel metadata carries what scoring needs besides the trees: the feature spec
(inputs in order, category vocabularies) and the calibrator fitted on time-held-out data.
The library's own adapter (``boosters``) loads, predicts and explains it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from boosters import BoosterLibrary, adapter_for_flavors, apply_calibration, blend_input
from boosters.compiled import CompilationError
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
    # native code predicting exactly like the booster, once :meth:`compile` has checked it
    compiled: Any = field(default=None, repr=False, compare=False)
    compile_error: str | None = field(default=None, repr=False, compare=False)

    def __getstate__(self) -> dict:
        # native code does not travel (to a Dask worker, say): a copy compiles again where it
        # scores, from the disk cache
        return {**self.__dict__, "compiled": None}

    def compile(self, cache_dir: str | Path, sample: np.ndarray | None = None) -> bool:
        """Predict with compiled trees from now on, when the library has them and they give
        the booster's numbers bit for bit (on a probe and ``sample``); otherwise keep the
        booster and log why, once."""
        if self.compiled is not None or self.compile_error is not None:
            return self.compiled is not None
        try:
            self.compiled = self.library.compiled(self.booster, Path(cache_dir), sample)
        except CompilationError as exc:
            self.compile_error = str(exc)
            log.info("%s v%s: scoring with the %s booster: %s", self.name, self.version, self.library.name, exc)
            return False
        log.info("%s v%s: scoring with compiled trees (%s)", self.name, self.version, self.compiled.key[:12])
        return True

    def predict_array(self, x: np.ndarray, threads: int = 1, overwrite_input: bool = False,
                      clean: bool = False) -> np.ndarray:
        """Calibrated probabilities of encoded rows. For compiled trees: ``threads``; a
        float64 ``x`` they may change (``overwrite_input``) or that has no input LightGBM reads
        as 0 without being 0 (``clean``). A booster uses its library's own threads."""
        anchor = blend_input(self.calibrator, x)
        if self.compiled is not None:
            return apply_calibration(self.compiled.predict(x, threads, overwrite_input, clean), self.calibrator, anchor)
        return apply_calibration(self.library.predict(self.booster, x), self.calibrator, anchor)

    def predict(self, rows: pd.DataFrame) -> np.ndarray:
        return self.predict_array(self.spec.encode(rows))

    def contributions(self, x: np.ndarray, threads: int = 1) -> np.ndarray:
        """SHAP contributions to the raw score, (n_rows, n_features + 1), from the library."""
        return self.library.contributions(self.booster, x, list(self.spec.names), threads)


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
