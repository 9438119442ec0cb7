"""A trained model's drift reference (:mod:`features.reference`), logged on its run.

It describes the holdout snapshot, the model's most recent data and the one its metrics
describe: everyone known then, built as a refresh builds them (one more feature build),
narrowed to the task's drift population, a sample of ``drift.reference_users``, and the
model's calibrated predictions for them. A refresh then compares like with like: one row
per user, the same population rule, the same columns, every slot of the open model.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

import numpy as np
import pandas as pd

from boosters import apply_calibration, blend_input
from configs import Config
from features.events import EventLog
from features.matrix import UserMatrix, build_matrix
from features.reference import (
    DriftReference,
    Histogram,
    column_for_input,
    drift_population,
    population_text,
    user_column,
    user_columns,
)
from features.rows import FeatureSpec, churn_rows, encode_all_slot_rows
from training.trainers import predict_raw

__all__ = ["profiled_columns", "build_reference"]

log = logging.getLogger(__name__)


def profiled_columns(importance: pd.Series, matrix: UserMatrix, cfg: Config) -> tuple[list[str], dict[str, float]]:
    """The model's ``drift.top_features`` user-level inputs by gain (a per-slot input counts
    for its best-slot summary), then the configured key columns; with each one's gain share."""
    total = float(importance.sum()) or 1.0
    gain = (importance / total).groupby(importance.index.map(column_for_input)).sum()
    present = user_columns(matrix)
    chosen = [c for c in gain.sort_values(ascending=False).index if c in present][: cfg.drift.top_features]
    chosen += [c for c in cfg.drift.key_columns if c not in chosen and c in present]
    return chosen, {c: round(float(gain.get(c, 0.0)), 6) for c in chosen}


def _predictions(task: str, spec: FeatureSpec, library: str, booster: Any, calibrator: dict,
                 matrix: UserMatrix, positions: np.ndarray) -> np.ndarray:
    if task == "open":
        x = encode_all_slot_rows(spec, matrix, positions)       # every slot, as the refresh scores
    else:
        x = spec.encode(churn_rows(matrix.subset(positions)))
    return apply_calibration(predict_raw(library, booster, x), calibrator, blend_input(calibrator, x))


def build_reference(log_: EventLog, task: str, snapshot: datetime, spec: FeatureSpec, library: str,
                    booster: Any, calibrator: dict, importance: pd.Series, cfg: Config) -> DriftReference | None:
    """The reference of a model fitted on ``task`` whose holdout snapshot is ``snapshot``;
    None when no user of the snapshot is in the task's drift population."""
    matrix, _ = build_matrix(log_, snapshot, cfg)
    lookback = cfg.labels.churn_lookback_days
    population = drift_population(matrix, task, lookback)
    if not len(population):
        log.warning("%s: no user in the drift population at %s; no drift reference", task, snapshot)
        return None
    rng = np.random.default_rng(cfg.drift.seed)
    size = min(len(population), cfg.drift.reference_users)
    sample = np.sort(rng.choice(population, size=size, replace=False))
    columns, gain = profiled_columns(importance, matrix, cfg)
    bins, levels = cfg.drift.bins, cfg.drift.max_levels
    features = {c: Histogram.fit(user_column(matrix, c, sample), bins, levels) for c in columns}
    predicted = _predictions(task, spec, library, booster, calibrator, matrix, sample)
    return DriftReference(task=task, as_of=snapshot.isoformat(), population=population_text(task, lookback),
                          n_population=len(population), n_sampled=size, features=features,
                          prediction=Histogram.fit(predicted, bins, levels), importance=gain)
