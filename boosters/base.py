"""What every library adapter provides."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from configs import Config

__all__ = ["BoosterLibrary", "Fitted", "RoundReporter"]

# called every few boosting rounds with {"train_log_loss": .., "valid_log_loss": ..} and the round
RoundReporter = Callable[[dict[str, float], int], None]


@dataclass
class Fitted:
    library: str
    booster: Any
    best_iteration: int
    train_seconds: float
    params: dict[str, Any]


class BoosterLibrary(ABC):
    """Fit, report, predict, explain and store models of one library."""

    name: str            # the Library value, e.g. "lightgbm"
    flavor: str          # the MLflow flavour module, e.g. "lightgbm"
    package: str         # the pip distribution a served model needs

    @abstractmethod
    def params(self, cfg: Config, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
        """The library's training parameters: defaults, then the config, then overrides."""

    @abstractmethod
    def _train(self, params: dict[str, Any], x_train: np.ndarray, y_train: np.ndarray,
               x_valid: np.ndarray, y_valid: np.ndarray, names: list[str], rounds: int,
               patience: int, reporters: list[RoundReporter], threads: int) -> tuple[Any, int]:
        """(booster cut at its best round, best round count)."""

    def fit(self, x_train: np.ndarray, y_train: np.ndarray, x_valid: np.ndarray,
            y_valid: np.ndarray, names: list[str], cfg: Config,
            overrides: dict[str, Any] | None = None,
            reporters: list[RoundReporter] | None = None) -> Fitted:
        """Train with early stopping on the (time-later) validation set."""
        overrides = dict(overrides or {})
        rounds = int(overrides.pop("num_boost_round", cfg.models.num_boost_round))
        params = self.params(cfg, overrides)
        start = time.perf_counter()
        booster, best = self._train(params, x_train, y_train, x_valid, y_valid, names, rounds,
                                    cfg.models.early_stopping_rounds, list(reporters or []),
                                    cfg.models.threads)
        return Fitted(library=self.name, booster=booster, best_iteration=int(best),
                      train_seconds=time.perf_counter() - start, params=params)

    @abstractmethod
    def predict(self, booster: Any, x: np.ndarray) -> np.ndarray:
        """Raw (uncalibrated) probabilities of the positive class."""

    def compiled(self, booster: Any, cache_dir: Path, sample: np.ndarray | None = None) -> Any:
        """Native code that predicts exactly like :meth:`predict` (``.predict(x, threads)``),
        cached under ``cache_dir``; raises :class:`boosters.compiled.CompilationError` saying
        why there is none."""
        from boosters.compiled import CompilationError

        raise CompilationError(f"no compiled trees for {self.name} models")

    @abstractmethod
    def contributions(self, booster: Any, x: np.ndarray, names: list[str], threads: int = 1) -> np.ndarray:
        """SHAP contributions to the raw score, (n_rows, n_features + 1), on ``threads`` threads."""

    @abstractmethod
    def importance(self, booster: Any, names: list[str]) -> pd.Series:
        """Total gain per feature, largest first."""

    @abstractmethod
    def size_bytes(self, booster: Any) -> int:
        """The serialised model's size."""

    @abstractmethod
    def search_space(self, trial: Any) -> dict[str, Any]:
        """Optuna suggestions for this library's parameters."""

    def fixed_tuning_params(self) -> dict[str, Any]:
        """Parameters a tuned set needs besides the searched ones."""
        return {}

    @abstractmethod
    def log_model(self, booster: Any, **kwargs: Any) -> Any:
        """``mlflow.<flavour>.log_model`` with this library's argument name."""

    @abstractmethod
    def load_model(self, uri: str) -> Any:
        """The native booster of a logged model."""

    def pip_requirements(self) -> list[str]:
        import importlib.metadata as md

        return [f"{dist}=={md.version(dist)}" for dist in ("mlflow", self.package, "numpy", "pandas")]
