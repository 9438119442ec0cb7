"""The scoring core: the one place that turns a feature snapshot and the champions into
each asked user's numbers.

Given a snapshot (:class:`features.matrix.UserMatrix`) and the champions, it returns, for
any list of users (known or not): per-slot open probabilities, churn probability and
tier, whether a message can reach them (the unreachable rule), whether a population prior
stood in for a model (cold start), and the best slot. The nightly refresh, ``/recommend``
and ``compare`` all call it, so the same user, snapshot and champion give the same numbers
everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from configs import Config
from features.families import Column
from features.matrix import UserMatrix
from features.rows import churn_rows, encode_all_slot_rows
from serving.models import Champions
from serving.predictor import LoadedModel
from serving.reasons import top_reasons

__all__ = ["MIN_PRIOR_USERS", "PriorTable", "Scores", "ScoringCore", "churn_probabilities",
           "churn_tier", "cold_start_priors", "prior_keys", "slot_probabilities", "tier_cutoffs",
           "unreachable"]

MIN_PRIOR_USERS = 30
TIER_ORDER = ("low", "medium", "high")


def unreachable(scalars: pd.DataFrame, positions: np.ndarray | None = None) -> np.ndarray:
    """Users whose last unsubscribe came after their last send (none in a snapshot written
    before the flag existed). No message reaches them: this is a rule, not a prediction
    (the models never saw a send to such a user, there are none)."""
    n = len(scalars) if positions is None else len(positions)
    if "unreachable" not in scalars:
        return np.zeros(n, dtype=bool)
    flag = scalars["unreachable"].to_numpy()
    # index before comparing: a request asks about a few users of a million
    return (flag if positions is None else flag[np.asarray(positions)]) > 0


def slot_probabilities(model: LoadedModel, matrix: UserMatrix, positions: np.ndarray) -> np.ndarray:
    """(len(positions), n_slots) calibrated open probabilities of ``model``; 0 in every slot
    for users no message reaches."""
    positions = np.asarray(positions)
    x = encode_all_slot_rows(model.spec, matrix, positions)
    probs = model.predict_array(x).reshape(len(positions), matrix.n_slots)
    gone = unreachable(matrix.scalars, positions)
    if gone.any():
        probs = probs.copy()
        probs[gone] = 0.0
    return probs


def churn_probabilities(model: LoadedModel, matrix: UserMatrix, positions: np.ndarray) -> np.ndarray:
    return model.predict(churn_rows(matrix.subset(np.asarray(positions))))


def tier_cutoffs(prob: np.ndarray | None, cfg: Config) -> dict[str, float]:
    """Churn-probability cut-offs: configured, or set so that configured shares of the
    scored users land in each tier."""
    tiers = cfg.serving.churn_tiers
    if tiers.mode == "thresholds" or prob is None or np.isnan(prob).all():
        return {"medium": tiers.medium, "high": tiers.high}
    valid = prob[~np.isnan(prob)]
    return {"high": float(np.quantile(valid, 1 - tiers.high_share)),
            "medium": float(np.quantile(valid, 1 - tiers.high_share - tiers.medium_share))}


def churn_tier(prob: np.ndarray, cutoffs: dict[str, float]) -> np.ndarray:
    prob = np.asarray(prob, dtype=float)
    out = np.where(prob >= cutoffs["high"], "high", np.where(prob >= cutoffs["medium"], "medium", "low"))
    return np.where(np.isnan(prob), None, out).astype(object)


def prior_keys(frame: pd.DataFrame, attributes: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Each user's prior keys: time zone + attributes, and time zone alone."""
    tz = frame["timezone"].astype(str)
    full = tz.copy()
    for attr in attributes:
        if attr != "timezone" and attr in frame.columns:
            full = full + "|" + attr + "=" + frame[attr].astype("string").fillna("?").astype(str)
    return full.to_numpy(dtype=object), tz.to_numpy(dtype=object)


def cold_start_priors(scalars: pd.DataFrame, attributes: tuple[str, ...], slot_probs: np.ndarray | None,
                      churn: np.ndarray | None) -> pd.DataFrame:
    """Mean predictions of users with history, by time zone + attributes, by time zone,
    and overall; groups under a minimum size are left out (the next level answers)."""
    # a new user is reachable: priors come from users a message can reach
    known = (scalars["has_history"].to_numpy() > 0) & ~unreachable(scalars)
    full, tz = prior_keys(scalars, attributes)
    records = []
    for level, keys in (("attributes", full), ("timezone", tz), ("global", np.full(len(tz), "*", object))):
        k = keys[known]
        for key in pd.unique(k):
            mask = k == key
            if mask.sum() < MIN_PRIOR_USERS and level != "global":
                continue
            records.append({
                "level": level, "key": key, "n_users": int(mask.sum()),
                "slot_open_probs": (slot_probs[known][mask].mean(axis=0).tolist()
                                    if slot_probs is not None else None),
                "churn_prob": float(churn[known][mask].mean()) if churn is not None else None,
            })
    return pd.DataFrame(records, columns=["level", "key", "n_users", "slot_open_probs", "churn_prob"])


class PriorTable:
    """Cold-start priors looked up from the most specific level that has one."""

    def __init__(self, priors: pd.DataFrame) -> None:
        self.frame = priors
        self._by_key = {(r["level"], r["key"]): r for r in priors.to_dict("records")}

    def find(self, full_key: str, tz_key: str) -> dict | None:
        for level, key in (("attributes", full_key), ("timezone", tz_key), ("global", "*")):
            if (level, key) in self._by_key:
                return self._by_key[(level, key)]
        return None


@dataclass
class Scores:
    """The numbers of the asked users, in the order asked."""

    slot_probs: np.ndarray | None     # (n, n_slots); NaN rows: neither a model nor a prior
    churn_prob: np.ndarray            # (n,); NaN where no churn champion
    churn_tier: np.ndarray            # object: "low" / "medium" / "high" / None
    unreachable: np.ndarray           # bool
    cold_start: np.ndarray            # bool: a prior stood in for the models
    best_slot: np.ndarray             # int; -1 where none (no probabilities, or unreachable)
    cutoffs: dict[str, float]

    def best_prob(self) -> np.ndarray:
        if self.slot_probs is None:
            return np.full(len(self.best_slot), np.nan)
        ok = self.best_slot >= 0
        out = np.full(len(self.best_slot), np.nan)
        out[ok] = self.slot_probs[np.flatnonzero(ok), self.best_slot[ok]]
        return out


class ScoringCore:
    """Scores users of one snapshot with one pair of champions."""

    def __init__(self, champions: Champions, matrix: UserMatrix, cfg: Config) -> None:
        self.champions, self.matrix, self.cfg = champions, matrix, cfg
        # per-user look-ups a request needs, built once (per request they cost O(all users))
        self.has_history = matrix.scalars["has_history"].to_numpy(dtype=float) > 0
        self.unreachable = unreachable(matrix.scalars)
        self.full_keys, self.tz_keys = prior_keys(matrix.scalars, matrix.attributes)
        self.zones = matrix.scalars["timezone"].astype(object).to_numpy()

    def model_scores(self, positions: np.ndarray, progress: bool = False,
                     ) -> tuple[np.ndarray | None, np.ndarray | None]:
        """The champions' numbers for snapshot positions (users with history or not),
        in batches; (slot probabilities, churn probabilities), None for a missing task."""
        positions = np.asarray(positions, dtype=np.int64)
        n, batch = len(positions), self.cfg.serving.score_batch_users
        slot = np.full((n, self.matrix.n_slots), np.nan, np.float64) if self.champions.open else None
        churn = np.full(n, np.nan) if self.champions.churn else None
        starts = range(0, n, batch)
        for start in tqdm(starts, desc="scoring users", unit="batch", disable=not progress or n <= batch):
            part = slice(start, min(start + batch, n))
            if slot is not None:
                slot[part] = slot_probabilities(self.champions.open, self.matrix, positions[part])
            if churn is not None:
                churn[part] = churn_probabilities(self.champions.churn, self.matrix, positions[part])
        return slot, churn

    def score(self, positions: np.ndarray, priors: PriorTable, cutoffs: dict[str, float] | None = None,
              zones: Sequence[str | None] | None = None, progress: bool = False,
              model: tuple[np.ndarray | None, np.ndarray | None] | None = None,
              attributes: Sequence[dict | None] | None = None) -> Scores:
        """Numbers for snapshot ``positions`` (-1: a user the snapshot does not know).

        Users with history get the champions' numbers (``model`` when already computed
        for exactly these positions); the others get the prior of their time zone and
        attributes (``zones``/``attributes`` give an unknown user's; default: the configured
        zone).
        ``cutoffs``: the churn tiers' (default: computed from these users' numbers).
        """
        positions = np.asarray(positions, dtype=np.int64)
        n, n_slots = len(positions), self.matrix.n_slots
        known = positions >= 0
        kpos = positions[known]
        history = np.zeros(n, dtype=bool)
        history[known] = self.has_history[kpos]
        gone = np.zeros(n, dtype=bool)
        gone[known] = self.unreachable[kpos]
        slot = np.full((n, n_slots), np.nan) if self.champions.open else None
        churn = np.full(n, np.nan)
        scored = np.flatnonzero(history)
        if model is not None:
            m_slot, m_churn = model
            if slot is not None and m_slot is not None:
                slot[scored] = m_slot[scored]
            if m_churn is not None:
                churn[scored] = m_churn[scored]
        elif len(scored):
            m_slot, m_churn = self.model_scores(positions[scored], progress)
            if slot is not None:
                slot[scored] = m_slot
            if m_churn is not None:
                churn[scored] = m_churn
        cold = ~history
        if cold.any():
            self._fill_priors(slot, churn, np.flatnonzero(cold), positions, priors, zones, attributes)
        cutoffs = cutoffs or tier_cutoffs(churn if self.champions.churn else None, self.cfg)
        best = np.full(n, -1, dtype=np.int64)
        if slot is not None:
            has = ~np.isnan(slot).all(axis=1) & ~gone
            best[has] = np.nan_to_num(slot[has], nan=-1.0).argmax(axis=1)
        return Scores(slot_probs=slot, churn_prob=churn, churn_tier=churn_tier(churn, cutoffs),
                      unreachable=gone, cold_start=cold, best_slot=best, cutoffs=cutoffs)

    def _fill_priors(self, slot: np.ndarray | None, churn: np.ndarray, rows: np.ndarray,
                     positions: np.ndarray, priors: PriorTable, zones: Sequence[str | None] | None,
                     attributes: Sequence[dict | None] | None) -> None:
        default = self.cfg.slots.default_timezone
        for i in rows:
            p = positions[i]
            if p >= 0:
                full, tz = self.full_keys[p], self.tz_keys[p]
            else:
                tz = (zones[i] if zones is not None else None) or default
                given = (attributes[i] if attributes is not None else None) or {}
                # the same key the snapshot's users have: zone, then each attribute in order
                full = tz + "".join(f"|{a}={given.get(a) if given.get(a) is not None else '?'}"
                                    for a in self.matrix.attributes if a != "timezone")
            prior = priors.find(full, tz)
            if prior is None:
                continue
            if slot is not None and prior["slot_open_probs"] is not None:
                slot[i] = prior["slot_open_probs"]
            if prior["churn_prob"] is not None and not pd.isna(prior["churn_prob"]):
                churn[i] = prior["churn_prob"]

    def zone_of(self, positions: np.ndarray, zones: Sequence[str | None] | None = None) -> np.ndarray:
        """Each asked user's time zone: the snapshot's, else the asked one, else the default."""
        positions = np.asarray(positions, dtype=np.int64)
        out = np.full(len(positions), self.cfg.slots.default_timezone, dtype=object)
        if zones is not None:
            for i, z in enumerate(zones):
                if z:
                    out[i] = z
        known = positions >= 0
        out[known] = self.zones[positions[known]]
        return out

    def churn_reasons(self, positions: np.ndarray, k: int, catalog: dict[str, Column]) -> list[list[str]]:
        """The k features pushing each user's churn score up most, in words."""
        model = self.champions.churn
        x = model.spec.encode(churn_rows(self.matrix.subset(np.asarray(positions))))
        return top_reasons(model.contributions(x), x, list(model.spec.names), k, catalog,
                           model.spec.categories)

    def explain_positions(self, tiers: np.ndarray, cold: np.ndarray) -> np.ndarray:
        """Positions of users whose churn risk is explained: at or above the configured tier
        (TreeSHAP costs ~3 ms a user: explain the users someone will act on)."""
        floor = TIER_ORDER.index(self.cfg.serving.churn_reasons_min_tier)
        wanted = np.isin(tiers, TIER_ORDER[floor:])
        return np.flatnonzero(wanted & ~cold)
