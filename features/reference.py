"""A model's drift reference: how its population looked, in a few numbers per feature.

Training writes one with each model (``drift_reference.json`` on the model's MLflow run);
the nightly refresh reads the champion's and measures how far the day's users have moved
from it with the population stability index (PSI). Both sides pick the users and the
columns with the functions below, so the two distributions describe the same thing:

    population    open:  users with history a message can reach (the users the open
                         model is sent to and scored on)
                  churn: users with an engagement event in the churn lookback window (the
                         churn label's population, exactly)
    columns       user-level: matrix scalars, and per-slot families summarised at the user's
                  best slot (``best_pooled_rate``: the pooled rate of their best hour)
    bins          numeric: quantiles of the reference (right-closed), plus one for missing;
                  categorical: the most frequent levels, one for the others, one for missing

PSI = sum over bins of (actual - expected) x ln(actual / expected), where an empty bin
counts as ``epsilon`` (the log needs a share above 0).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from features.matrix import UserMatrix

__all__ = ["REFERENCE_FILE", "FORMAT", "SLOT_SUMMARIES", "Histogram", "DriftReference", "drift_population",
           "population_text", "user_columns", "user_column", "column_for_input", "psi"]

REFERENCE_FILE = "drift_reference.json"
FORMAT = 1

# user-level summaries of per-slot families: (family, reduction over the user's slots);
# best_slot_rate and peak_session_share are the churn model's own inputs (features.rows)
SLOT_SUMMARIES: dict[str, str] = {
    "best_slot_rate": "circ_rate",
    "peak_session_share": "session_share",
    "best_pooled_rate": "pooled_rate",
    # the open model's strongest input where the rhythm families are on (features.rhythm_basis)
    "best_rhythm_expected": "rhythm_expected",
}


def drift_population(matrix: UserMatrix, task: str, lookback_days: float) -> np.ndarray:
    """Positions of the users whose drift is measured for ``task`` (see the module's table)."""
    scalars = matrix.scalars
    if task == "churn":
        recent = scalars["days_since_engagement"].to_numpy(dtype=float)
        return np.flatnonzero(recent <= lookback_days)    # NaN (never engaged) is out
    history = scalars["has_history"].to_numpy(dtype=float) > 0
    if "unreachable" in scalars:
        history &= ~(scalars["unreachable"].to_numpy(dtype=float) > 0)
    return np.flatnonzero(history)


def population_text(task: str, lookback_days: float) -> str:
    if task == "churn":
        return f"users with an engagement event in the {lookback_days:g} days up to T"
    return "users with history a message can reach"


def user_columns(matrix: UserMatrix) -> set[str]:
    """Every user-level column :func:`user_column` can give for ``matrix``."""
    return set(matrix.scalars.columns) | {s for s, family in SLOT_SUMMARIES.items() if family in matrix.slots}


def user_column(matrix: UserMatrix, name: str, positions: np.ndarray) -> np.ndarray | None:
    """One user-level column at ``positions`` (float, or object for text), None if absent."""
    if name in matrix.scalars.columns:
        column = matrix.scalars[name]
        if pd.api.types.is_numeric_dtype(column):
            return column.to_numpy(dtype=float, na_value=np.nan)[positions]
        # text: convert only the sample (a sample of a million users costs a fifth)
        return column.iloc[positions].astype("string").to_numpy(dtype=object, na_value=None)
    family = SLOT_SUMMARIES.get(name)
    if family is not None and family in matrix.slots:
        return matrix.slots[family][positions].max(axis=1).astype(float)
    return None


def column_for_input(name: str) -> str:
    """The user-level column that stands for a model input: a per-slot input
    (``slot_pooled_rate``) by its best-slot summary; others by themselves."""
    family = name.removeprefix("slot_")
    for summary, source in SLOT_SUMMARIES.items():
        if name.startswith("slot_") and source == family:
            return summary
    return name


@dataclass(frozen=True)
class Histogram:
    """Bins and the reference's share in each.

    numeric: ``edges`` e_0 < ... < e_k make bins (-inf, e_0], (e_0, e_1], ..., (e_k, inf],
    then one for missing; categorical: one bin per level, one for other levels, one for
    missing. ``shares`` has one entry per bin and sums to 1.
    """

    kind: str                            # "numeric" or "categorical"
    shares: tuple[float, ...]
    edges: tuple[float, ...] = ()
    levels: tuple[str, ...] = ()

    @classmethod
    def fit(cls, values: np.ndarray, bins: int, max_levels: int) -> "Histogram":
        values = np.asarray(values)
        if values.dtype == object:
            present = pd.Series(values[pd.notna(values)], dtype="string")
            levels = tuple(str(v) for v in present.value_counts().index[:max_levels])
            hist = cls(kind="categorical", shares=(), levels=levels)
        else:
            finite = values[np.isfinite(values)]
            quantiles = np.quantile(finite, np.linspace(0, 1, bins + 1)[1:-1]) if len(finite) else []
            hist = cls(kind="numeric", shares=(), edges=tuple(float(e) for e in np.unique(quantiles)))
        return cls(kind=hist.kind, shares=tuple(float(s) for s in hist.shares_of(values)),
                   edges=hist.edges, levels=hist.levels)

    @property
    def n_bins(self) -> int:
        return len(self.edges) + 2 if self.kind == "numeric" else len(self.levels) + 2

    def bin_of(self, values: np.ndarray) -> np.ndarray:
        """Each value's bin (vectorised: a binary search over the edges, or a level look-up)."""
        values = np.asarray(values)
        if self.kind == "numeric":
            values = values.astype(float)
            out = np.searchsorted(np.asarray(self.edges, dtype=float), values, side="left")
            out[np.isnan(values)] = self.n_bins - 1
            return out
        missing = pd.isna(values)
        text = np.where(missing, None, values.astype(str))
        out = pd.Index(self.levels, dtype=object).get_indexer(text)
        out[out < 0] = len(self.levels)          # a level the reference did not have
        out[missing] = self.n_bins - 1
        return out

    def shares_of(self, values: np.ndarray) -> np.ndarray:
        counts = np.bincount(self.bin_of(values), minlength=self.n_bins).astype(float)
        return counts / max(counts.sum(), 1.0)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind}
        out.update({"edges": list(self.edges)} if self.kind == "numeric" else {"levels": list(self.levels)})
        out["shares"] = list(self.shares)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Histogram":
        return cls(kind=data["kind"], shares=tuple(data["shares"]), edges=tuple(data.get("edges", ())),
                   levels=tuple(data.get("levels", ())))


def psi(expected: np.ndarray, actual: np.ndarray, epsilon: float) -> float:
    """Population stability index of shares ``actual`` against ``expected`` (same bins)."""
    e = np.maximum(np.asarray(expected, dtype=float), epsilon)
    a = np.maximum(np.asarray(actual, dtype=float), epsilon)
    return float(np.sum((a - e) * np.log(a / e)))


@dataclass(frozen=True)
class DriftReference:
    """What a model's population looked like: a histogram per profiled column and one of
    the model's calibrated predictions (open: every slot of each user; churn: each user)."""

    task: str
    as_of: str                                   # the snapshot the reference describes
    population: str
    n_population: int
    n_sampled: int
    features: dict[str, Histogram]
    prediction: Histogram
    importance: dict[str, float] = field(default_factory=dict)   # gain share of profiled inputs

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "task": self.task, "as_of": self.as_of, "population": self.population,
                "n_population": self.n_population, "n_sampled": self.n_sampled,
                "features": {k: h.to_dict() for k, h in self.features.items()},
                "prediction": self.prediction.to_dict(), "importance": self.importance}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DriftReference":
        if data.get("format") != FORMAT:
            raise ValueError(f"{REFERENCE_FILE}: format {data.get('format')!r}, this version reads {FORMAT}")
        return cls(task=data["task"], as_of=data["as_of"], population=data["population"],
                   n_population=int(data["n_population"]), n_sampled=int(data["n_sampled"]),
                   features={k: Histogram.from_dict(h) for k, h in data["features"].items()},
                   prediction=Histogram.from_dict(data["prediction"]),
                   importance=dict(data.get("importance", {})))
