"""Model rows from a user matrix: one row per (user, slot) for the open task, one row
per user for churn, and the :class:`FeatureSpec` that turns them into the numeric
array a model was trained on.

Training and serving gather rows with the same functions, so a slot's features mean
the same thing in both: "this user's smoothed open rate *at the slot being scored*".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from features.matrix import UserMatrix

__all__ = ["FeatureSpec", "open_rows", "churn_rows", "all_slot_rows", "encode_all_slot_rows"]

# identifiers and bookkeeping that are not model inputs
_NOT_FEATURES = {"n_events", "has_history"}


def _slot_descriptors(slots: np.ndarray, n_slots: int) -> dict[str, np.ndarray]:
    hour = slots % 24
    out = {"slot_hour": hour.astype(np.float32)}
    if n_slots == 168:
        dow = slots // 24
        out["slot_dow"] = dow.astype(np.float32)
        out["slot_weekend"] = (dow >= 5).astype(np.float32)
    return out


def open_rows(matrix: UserMatrix, user_pos: np.ndarray, slots: np.ndarray) -> pd.DataFrame:
    """Rows for (user position, slot) pairs: user scalars plus that slot's families."""
    user_pos = np.asarray(user_pos, dtype=np.int64)
    slots = np.asarray(slots, dtype=np.int64)
    frame = matrix.scalars.iloc[user_pos].reset_index(drop=True)
    extra = {f"slot_{family}": values[user_pos, slots] for family, values in matrix.slots.items()}
    extra.update(_slot_descriptors(slots, matrix.n_slots))
    return pd.concat([frame, pd.DataFrame(extra)], axis=1)


def all_slot_rows(matrix: UserMatrix, slots: np.ndarray | None = None) -> pd.DataFrame:
    """Every user x every slot (or the given slots), user-major."""
    slots = np.arange(matrix.n_slots) if slots is None else np.asarray(slots)
    n = len(matrix)
    return open_rows(matrix, np.repeat(np.arange(n), len(slots)), np.tile(slots, n))


def churn_rows(matrix: UserMatrix) -> pd.DataFrame:
    """One row per user: scalars plus summaries of the slot profile."""
    frame = matrix.scalars.reset_index(drop=True).copy()
    if "circ_rate" in matrix.slots:
        frame["best_slot_rate"] = matrix.slots["circ_rate"].max(axis=1)
    if "session_share" in matrix.slots:
        frame["peak_session_share"] = matrix.slots["session_share"].max(axis=1)
    return frame


@dataclass(frozen=True)
class FeatureSpec:
    """The model's inputs in order, and the vocabularies of its categorical inputs.

    Stored with each registered model, so scoring encodes categories exactly as
    training did (an unseen category becomes missing, not a wrong code).
    """

    names: tuple[str, ...]
    categories: dict[str, tuple[str, ...]]

    @classmethod
    def fit(cls, frame: pd.DataFrame, categorical: tuple[str, ...], max_levels: int) -> "FeatureSpec":
        names = tuple(c for c in frame.columns if c not in _NOT_FEATURES)
        cats = {}
        for col in categorical:
            if col in frame.columns:
                counts = frame[col].astype("string").value_counts(dropna=True)
                cats[col] = tuple(sorted(counts.index[:max_levels].astype(str)))
        return cls(names=names, categories=cats)

    def encode(self, frame: pd.DataFrame) -> np.ndarray:
        missing = [n for n in self.names if n not in frame.columns]
        if missing:
            raise ValueError(f"feature rows lack the model's input(s): {', '.join(missing[:10])}")
        out = np.empty((len(frame), len(self.names)), dtype=np.float32)
        numeric = [j for j, name in enumerate(self.names) if name not in self.categories]
        block = frame[[self.names[j] for j in numeric]]
        # one conversion for the whole numeric block: per-column conversion dominated the
        # latency of small requests
        try:
            out[:, numeric] = block.to_numpy(dtype=np.float32, na_value=np.nan)
        except (TypeError, ValueError):
            out[:, numeric] = block.apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float32, na_value=np.nan)
        for j, name in enumerate(self.names):
            if name in self.categories:
                values = frame[name].astype("string").to_numpy(dtype=object, na_value=None)
                codes = pd.Index(self.categories[name]).get_indexer(values).astype(np.float32)
                codes[codes < 0] = np.nan   # unseen or missing category
                out[:, j] = codes
        return out

    def to_dict(self) -> dict:
        return {"names": list(self.names), "categories": {k: list(v) for k, v in self.categories.items()}}

    @classmethod
    def from_dict(cls, data: dict) -> "FeatureSpec":
        return cls(names=tuple(data["names"]),
                   categories={k: tuple(v) for k, v in data.get("categories", {}).items()})


def encode_all_slot_rows(spec: FeatureSpec, matrix: UserMatrix, positions: np.ndarray) -> np.ndarray:
    """``spec.encode(all_slot_rows(matrix.subset(positions)))`` without building the frame.

    The user part is encoded once per user, not once per (user, slot); slot families are
    gathered with numpy. Serving's hot path: a one-user request spent most of its time
    building and converting a 24-row frame.
    """
    positions = np.asarray(positions, dtype=np.int64)
    n_slots = matrix.n_slots
    slots = np.arange(n_slots)
    user_cols = [n for n in spec.names if n in matrix.scalars.columns]
    user_spec = FeatureSpec(names=tuple(user_cols),
                            categories={k: v for k, v in spec.categories.items() if k in user_cols})
    users = user_spec.encode(matrix.scalars.iloc[positions])
    descriptors = _slot_descriptors(np.tile(slots, len(positions)), n_slots)
    out = np.empty((len(positions) * n_slots, len(spec.names)), dtype=np.float32)
    where = {name: j for j, name in enumerate(user_cols)}
    for j, name in enumerate(spec.names):
        if name in where:
            out[:, j] = np.repeat(users[:, where[name]], n_slots)
        elif name.startswith("slot_") and name[len("slot_"):] in matrix.slots:
            out[:, j] = matrix.slots[name[len("slot_"):]][positions].reshape(-1)
        elif name in descriptors:
            out[:, j] = descriptors[name]
        else:
            raise ValueError(f"feature rows lack the model's input {name!r}")
    return out
