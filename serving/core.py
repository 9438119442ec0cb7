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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from boosters.compiled import reads_as_zero
from configs import Config
from features.families import Column
from features.matrix import UserMatrix
from features.rows import ModelRows, encode_all_slot_rows
from serving.models import Champions
from serving.predictor import LoadedModel
from serving.reasons import Reasons, rank_reasons

__all__ = ["MIN_PRIOR_USERS", "PriorTable", "Scores", "ScoringCore", "churn_probabilities",
           "churn_tier", "cold_start_priors", "compiled_cache_dir", "prior_keys", "slot_probabilities",
           "tier_cutoffs", "unreachable"]

MIN_PRIOR_USERS = 30
TIER_ORDER = ("low", "medium", "high")
# model rows per task of the compiled trees' thread pool: a float64 chunk that stays in the
# cache between being built and being read (4096 rows: 1.2x the speed of 32768, measured)
_CHUNK_ROWS = 4096


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
    for users no message reaches (not predicted: a rule)."""
    positions = np.asarray(positions, dtype=np.int64)
    probs = np.zeros((len(positions), matrix.n_slots))
    live = np.flatnonzero(~unreachable(matrix.scalars, positions))
    if len(live):
        x = encode_all_slot_rows(model.spec, matrix, positions[live])
        probs[live] = model.predict_array(x).reshape(len(live), matrix.n_slots)
    return probs


def churn_probabilities(model: LoadedModel, matrix: UserMatrix, positions: np.ndarray) -> np.ndarray:
    rows = ModelRows(model.spec, matrix, positions, per_slot=False)
    return model.predict_array(rows.build(0, len(rows)))


def compiled_cache_dir(cfg: Config) -> Path:
    """Where compiled champions are kept (``serving.compiled_cache_dir``, else beside the refreshes)."""
    return Path(cfg.serving.compiled_cache_dir or Path(cfg.serving.serving_dir) / "compiled")


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


def _spelled(column: pd.Series, spell) -> tuple[np.ndarray, np.ndarray]:
    """(codes, spelling of each code): a column's values spelled once per distinct value."""
    codes, levels = pd.factorize(column, use_na_sentinel=False)
    return codes.astype(np.int64), spell(pd.Series(levels))


def prior_keys(frame: pd.DataFrame, attributes: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Each user's prior keys: time zone + attributes, and time zone alone.

    Spelled once per distinct combination (a million users hold a few hundred), not per user:
    the same strings as ``tz + "|attr=" + level`` row by row."""
    tz_codes, tz_words = _spelled(frame["timezone"], lambda s: s.astype(str).to_numpy(dtype=object))
    combo, members, parts = tz_codes, [np.arange(len(tz_words))], [tz_words]
    for attr in attributes:
        if attr != "timezone" and attr in frame.columns:
            codes, words = _spelled(frame[attr], lambda s, a=attr: ("|" + a + "=" + s.astype("string").fillna("?")
                                                                    .astype(str)).to_numpy(dtype=object))
            # dense codes of the combinations so far, each with its code in every part
            combo, seen = pd.factorize(combo * len(words) + codes)
            members = [m[seen // len(words)] for m in members] + [seen % len(words)]
            parts.append(words)
    full_words = parts[0][members[0]]
    for words, member in zip(parts[1:], members[1:]):
        full_words = full_words + words[member]
    return np.asarray(full_words, dtype=object)[combo], tz_words[tz_codes]


def cold_start_priors(scalars: pd.DataFrame, attributes: tuple[str, ...], slot_probs: np.ndarray | None,
                      churn: np.ndarray | None) -> pd.DataFrame:
    """Mean predictions of users with history, by time zone + attributes, by time zone,
    and overall; groups under a minimum size are left out (the next level answers).

    Groups in order of first appearance; each group's mean over its users in their order
    (the numbers of a mean over a boolean mask, without a mask per group)."""
    # a new user is reachable: priors come from users a message can reach
    known = (scalars["has_history"].to_numpy() > 0) & ~unreachable(scalars)
    full, tz = prior_keys(scalars, attributes)
    slot_known = slot_probs[known] if slot_probs is not None else None
    churn_known = churn[known] if churn is not None else None
    records = []
    for level, keys in (("attributes", full), ("timezone", tz), ("global", None)):
        if keys is None:
            codes, uniques = np.zeros(int(known.sum()), dtype=np.int64), np.array(["*"], dtype=object)
            if not len(codes):
                uniques = uniques[:0]
        else:
            codes, uniques = pd.factorize(keys[known])
        order = np.argsort(codes, kind="stable")
        sizes = np.bincount(codes, minlength=len(uniques))
        bounds = np.concatenate([[0], np.cumsum(sizes)])
        whole = len(uniques) == 1
        slot_sorted = slot_known if slot_known is None or whole else slot_known[order]
        churn_sorted = churn_known if churn_known is None or whole else churn_known[order]
        for g, key in enumerate(uniques):
            if sizes[g] < MIN_PRIOR_USERS and level != "global":
                continue
            part = slice(bounds[g], bounds[g + 1])
            records.append({
                "level": level, "key": key, "n_users": int(sizes[g]),
                "slot_open_probs": slot_sorted[part].mean(axis=0).tolist() if slot_sorted is not None else None,
                "churn_prob": float(churn_sorted[part].mean()) if churn_sorted is not None else None,
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
        """The champions' numbers for snapshot positions: (slot probabilities, churn
        probabilities), None for a missing task.

        Only what :meth:`score` uses is predicted: users without history get NaN (a prior
        stands in for them), and users no message reaches get 0 in every slot without a
        prediction (a rule); their churn is predicted.
        """
        positions = np.asarray(positions, dtype=np.int64)
        n = len(positions)
        history = self.has_history[positions]
        slot = churn = None
        if self.champions.open:
            slot = np.full((n, self.matrix.n_slots), np.nan, np.float64)
            gone = history & self.unreachable[positions]
            slot[gone] = 0.0
            need = np.flatnonzero(history & ~gone)
            if len(need):
                slot[need] = self._predict(self.champions.open, positions[need], True, progress)
        if self.champions.churn:
            churn = np.full(n, np.nan)
            need = np.flatnonzero(history)
            if len(need):
                churn[need] = self._predict(self.champions.churn, positions[need], False, progress)
        return slot, churn

    def _predict(self, model: LoadedModel, positions: np.ndarray, per_slot: bool, progress: bool) -> np.ndarray:
        """Calibrated probabilities of ``model`` for users at ``positions``: (n, n_slots) for
        the open task, (n,) for churn. Rows are built batch by batch from the users' part
        encoded once; compiled trees take batches on every thread, each thread building its
        own float64 rows; a booster takes big float32 batches and its own threads."""
        rows = ModelRows(model.spec, self.matrix, positions, per_slot)
        n, width = len(rows), rows.n_slots
        out = np.empty(n * width, dtype=np.float64)
        desc = "scoring open times" if per_slot else "scoring churn"
        if self._compiled(model, rows):
            users = max(1, _CHUNK_ROWS // width)
            starts = range(0, n, users)
            # one scan of the sources spares every chunk the zero-threshold pass
            clean = not any(reads_as_zero(source) for source in rows.sources())

            def one(start: int) -> None:
                stop = min(start + users, n)
                x = rows.build(start, stop, np.float64)
                out[start * width:stop * width] = model.predict_array(x, overwrite_input=True, clean=clean)

            with ThreadPoolExecutor(max_workers=max(1, self.cfg.models.threads)) as pool:
                for _ in tqdm(pool.map(one, starts), total=len(starts), desc=desc, unit="chunk",
                              disable=not progress or len(starts) <= 1):
                    pass
        else:
            batch = self.cfg.serving.score_batch_users
            starts = range(0, n, batch)
            for start in tqdm(starts, desc=desc, unit="batch", disable=not progress or len(starts) <= 1):
                stop = min(start + batch, n)
                out[start * width:stop * width] = model.predict_array(rows.build(start, stop))
        return out.reshape(n, width) if per_slot else out

    def _compiled(self, model: LoadedModel, rows: ModelRows) -> bool:
        """Whether ``model`` predicts with compiled trees for these rows: when it already
        does, or the call is big enough to pay for compiling (or loading) them."""
        serving = self.cfg.serving
        if model.compiled is not None:
            return True
        if not serving.compiled_trees or len(rows) * rows.n_slots < serving.compiled_min_rows:
            return False
        sample = rows.build(0, min(len(rows), max(1, 2048 // rows.n_slots)))
        return model.compile(compiled_cache_dir(self.cfg), sample)

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
        rows = np.asarray(rows, dtype=np.int64)
        pos = positions[rows]
        full = np.empty(len(rows), dtype=object)
        tz = np.empty(len(rows), dtype=object)
        known = pos >= 0
        full[known], tz[known] = self.full_keys[pos[known]], self.tz_keys[pos[known]]
        for j in np.flatnonzero(~known):
            i = rows[j]
            tz[j] = (zones[i] if zones is not None else None) or default
            given = (attributes[i] if attributes is not None else None) or {}
            # the same key the snapshot's users have: zone, then each attribute in order
            full[j] = tz[j] + "".join(f"|{a}={given.get(a) if given.get(a) is not None else '?'}"
                                      for a in self.matrix.attributes if a != "timezone")
        # one look-up per distinct key (the full key starts with the zone, so it decides both)
        codes, keys = pd.factorize(full)
        order = np.argsort(codes, kind="stable")
        bounds = np.concatenate([[0], np.cumsum(np.bincount(codes, minlength=len(keys)))])
        first = order[bounds[:-1]]
        for g, key in enumerate(keys):
            prior = priors.find(key, tz[first[g]])
            if prior is None:
                continue
            group = rows[order[bounds[g]:bounds[g + 1]]]
            if slot is not None and prior["slot_open_probs"] is not None:
                slot[group] = prior["slot_open_probs"]
            if prior["churn_prob"] is not None and not pd.isna(prior["churn_prob"]):
                churn[group] = prior["churn_prob"]

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
        return self.explain_churn(positions, k, catalog).lists()

    def explain_churn(self, positions: np.ndarray, k: int, catalog: dict[str, Column],
                      progress: bool = False) -> Reasons:
        """:meth:`churn_reasons` as arrays: SHAP contributions in big batches on every core
        (the library's TreeSHAP), the reasons ranked and phrased without a loop per user."""
        model = self.champions.churn
        rows = ModelRows(model.spec, self.matrix, positions, per_slot=False)
        names = list(model.spec.names)
        # big batches: each tree is explained once per distinct way a batch's users meet it,
        # and more users share more ways (boosters.treeshap); bounded for memory
        batch = 8 * self.cfg.serving.score_batch_users
        parts = []
        for start in tqdm(range(0, len(rows), batch), desc="explaining churn risk", unit="batch",
                          disable=not progress or len(rows) <= batch):
            x = rows.build(start, min(start + batch, len(rows)))
            parts.append(rank_reasons(model.contributions(x, self.cfg.models.threads), x, names, k, catalog,
                                      model.spec.categories))
        return Reasons.concat(parts, k)

    def explain_positions(self, tiers: np.ndarray, cold: np.ndarray) -> np.ndarray:
        """Positions of users whose churn risk is explained: at or above the configured tier
        (TreeSHAP costs ~3 ms a user: explain the users someone will act on)."""
        floor = TIER_ORDER.index(self.cfg.serving.churn_reasons_min_tier)
        wanted = np.isin(tiers, TIER_ORDER[floor:])
        return np.flatnonzero(wanted & ~cold)
