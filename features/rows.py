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

__all__ = ["CHURN_SLOT_FAMILIES", "FeatureSpec", "ModelRows", "open_rows", "churn_rows", "all_slot_rows", "encode_all_slot_rows"]

# identifiers and bookkeeping that are not model inputs
_NOT_FEATURES = {"n_events", "has_history", "active_gap_sq_days"}


def _is_input(column: str) -> bool:
    # whole-history totals ("*_ever") grow with the log's age, so a model trained on early
    # snapshots would meet larger values than it ever saw; it reads them as rates (per day
    # since first seen), the BG/NBD quantities and the age-weighted counts instead
    return column not in _NOT_FEATURES and (not column.endswith("_ever") or column.endswith("_per_day_ever"))

# churn rows' summaries of the slot profile: column -> the per-slot family it is the max of
_SLOT_SUMMARIES = {"best_slot_rate": "circ_rate", "peak_session_share": "session_share"}
# the per-slot families the churn rows read (a churn snapshot need not build the others)
CHURN_SLOT_FAMILIES: frozenset[str] = frozenset(_SLOT_SUMMARIES.values())


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
    for column, family in _SLOT_SUMMARIES.items():
        if family in matrix.slots:
            frame[column] = matrix.slots[family].max(axis=1)
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
        names = tuple(c for c in frame.columns if _is_input(c))
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
                out[:, j] = self._codes(frame[name])
        return out

    def _codes(self, column: pd.Series) -> np.ndarray:
        """Vocabulary codes of a categorical column; NaN for an unseen or missing level.

        Each distinct value is looked up once (a million rows hold a few dozen levels): equal
        values are spelled alike, so this is the row-by-row lookup of their spelling."""
        codes, levels = pd.factorize(column, use_na_sentinel=True)
        spelled = pd.Series(levels, dtype=object).astype("string").to_numpy(dtype=object, na_value=None)
        vocabulary = pd.Index(self.categories[column.name]).get_indexer(spelled)
        out = np.where(codes >= 0, vocabulary[np.maximum(codes, 0)], -1).astype(np.float32)
        out[out < 0] = np.nan   # unseen or missing category
        return out

    def to_dict(self) -> dict:
        return {"names": list(self.names), "categories": {k: list(v) for k, v in self.categories.items()}}

    @classmethod
    def from_dict(cls, data: dict) -> "FeatureSpec":
        return cls(names=tuple(data["names"]),
                   categories={k: tuple(v) for k, v in data.get("categories", {}).items()})


def encode_all_slot_rows(spec: FeatureSpec, matrix: UserMatrix, positions: np.ndarray) -> np.ndarray:
    """``spec.encode(all_slot_rows(matrix.subset(positions)))`` without building the frame
    (:class:`ModelRows`)."""
    rows = ModelRows(spec, matrix, positions, per_slot=True)
    return rows.build(0, len(rows))


class ModelRows:
    """A model's input rows for chosen users of a matrix, built batch by batch as a float
    array, exactly as ``spec.encode`` encodes the frames of :func:`all_slot_rows` (``per_slot``:
    the open task's (user, slot) rows, user-major) or :func:`churn_rows` (one row a user).

    The user-level part is encoded once, in one conversion from pandas (``users``: the
    encoded user part of every user of the matrix, from :meth:`user_block`, shared between
    calls); per-slot families, slot descriptors and slot-profile summaries are gathered with
    numpy. A batch is built straight into the asked dtype: compiled trees read float64, and
    converting a float32 batch would cost a second copy of the 24x rows.
    """

    def __init__(self, spec: FeatureSpec, matrix: UserMatrix, positions: np.ndarray, per_slot: bool,
                 users: np.ndarray | None = None) -> None:
        self.spec, self.matrix, self.per_slot = spec, matrix, per_slot
        self.positions = np.asarray(positions, dtype=np.int64)
        self.n_slots = matrix.n_slots if per_slot else 1
        user_cols = self.user_columns(spec, matrix)
        if users is None:
            users = self.user_block(spec, matrix, self.positions)
            self._user_rows = np.arange(len(self.positions))
        else:
            self._user_rows = self.positions
        self._users = users
        where = {name: j for j, name in enumerate(user_cols)}
        slot_hours = np.arange(matrix.n_slots)
        descriptors = _slot_descriptors(slot_hours, matrix.n_slots) if per_slot else {}
        # (destination columns, source columns) of the user part, as runs of slices
        self._user_runs: list[tuple[slice, slice]] = []
        self._families: list[tuple[int, str]] = []
        self._descriptors: list[tuple[int, np.ndarray]] = []
        self._summaries: list[tuple[int, str]] = []
        for j, name in enumerate(spec.names):
            family = name[len("slot_"):] if name.startswith("slot_") else None
            if name in where:
                src = where[name]
                last = self._user_runs[-1] if self._user_runs else None
                if last is not None and last[0].stop == j and last[1].stop == src:
                    self._user_runs[-1] = (slice(last[0].start, j + 1), slice(last[1].start, src + 1))
                else:
                    self._user_runs.append((slice(j, j + 1), slice(src, src + 1)))
            elif per_slot and family in matrix.slots:
                self._families.append((j, family))
            elif name in descriptors:
                self._descriptors.append((j, descriptors[name]))
            elif not per_slot and _SLOT_SUMMARIES.get(name) in matrix.slots:
                self._summaries.append((j, _SLOT_SUMMARIES[name]))
            else:
                raise ValueError(f"feature rows lack the model's input {name!r}")

    @staticmethod
    def user_columns(spec: FeatureSpec, matrix: UserMatrix) -> list[str]:
        return [n for n in spec.names if n in matrix.scalars.columns]

    @classmethod
    def user_block(cls, spec: FeatureSpec, matrix: UserMatrix, positions: np.ndarray | None = None) -> np.ndarray:
        """The encoded user-level inputs of ``spec`` (float32, in the spec's order) of every
        user of the matrix, or of the users at ``positions``."""
        user_cols = cls.user_columns(spec, matrix)
        user_spec = FeatureSpec(names=tuple(user_cols),
                                categories={k: v for k, v in spec.categories.items() if k in user_cols})
        frame = matrix.scalars if positions is None else matrix.scalars.iloc[positions]
        return user_spec.encode(frame)

    def __len__(self) -> int:
        return len(self.positions)

    def sources(self) -> list[np.ndarray]:
        """The arrays these rows' values come from (the encoded user part, the per-slot
        families read): a check over them holds for every row."""
        families = {family for _, family in self._families + self._summaries}
        return [self._users] + [self.matrix.slots[f] for f in sorted(families)]

    def build(self, start: int, stop: int, dtype: type = np.float32) -> np.ndarray:
        """The rows of the users ``positions[start:stop]``: (users x n_slots, n_features)."""
        pos = self.positions[start:stop]
        users = self._users[self._user_rows[start:stop]]
        out = np.empty((len(pos), self.n_slots, len(self.spec.names)), dtype=dtype)
        for dest, src in self._user_runs:
            out[:, :, dest] = users[:, None, src]
        for j, family in self._families:
            out[:, :, j] = self.matrix.slots[family][pos]
        for j, values in self._descriptors:
            out[:, :, j] = values
        for j, family in self._summaries:
            out[:, 0, j] = self.matrix.slots[family][pos].max(axis=1)
        return out.reshape(len(pos) * self.n_slots, len(self.spec.names))
