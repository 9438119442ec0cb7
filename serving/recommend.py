"""Answering the scheduler: for each user, the probabilities of every slot, the best send
time inside the asked window, and churn risk, from the latest feature snapshot.

Everything here is loaded once (the snapshot into memory, the champions from the
registry); a request only gathers its users' rows and runs the trees.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from functools import lru_cache
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np
import pandas as pd

from features.matrix import UserMatrix
from configs import Config
from serving.models import Champions, load_champions
from serving.scoring import (_prior_keys, churn_probabilities, churn_tier, prior_for, prior_lookup,
                             slot_probabilities, tier_cutoffs, unreachable)
from serving.tagstore import RefreshPaths, current_refresh

__all__ = ["Recommender", "window_candidates"]

log = logging.getLogger(__name__)


@lru_cache(maxsize=4096)
def window_candidates(tz: str, start: datetime, hours: int, kind: str) -> tuple[tuple[datetime, int], ...]:
    """(UTC time, local slot) for each local hour that starts inside [start, start + hours),
    plus the window start itself; zones with half-hour offsets are handled."""
    zone = ZoneInfo(tz)
    end = start + timedelta(hours=hours)
    out = []
    t = start
    step = timedelta(minutes=15)
    first = True
    while t < end:
        local = t.astimezone(zone)
        if first or (local.minute == 0 and local.second == 0):
            slot = local.hour if kind == "hour_of_day" else local.weekday() * 24 + local.hour
            out.append((t, slot))
        first = False
        t = (t + step).replace(second=0, microsecond=0)
        t = t - timedelta(minutes=t.minute % 15)
    return tuple(out)


@dataclass
class Recommender:
    cfg: Config
    champions: Champions
    matrix: UserMatrix
    priors: dict
    refresh: RefreshPaths
    manifest: dict
    # look-ups a request needs, built once: rebuilding the user index or converting the
    # time-zone column per request cost O(all users) each time
    index: pd.Index = field(init=False, repr=False)
    has_history: np.ndarray = field(init=False, repr=False)
    zones: np.ndarray = field(init=False, repr=False)
    unreachable: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.index = pd.Index(self.matrix.user_ids, dtype=object)
        self.index.get_indexer(self.index[:1])   # build the hash table now, not on the first request
        self.has_history = self.matrix.scalars["has_history"].to_numpy(dtype=float) > 0
        self.zones = self.matrix.scalars["timezone"].astype(object).to_numpy()
        self.unreachable = unreachable(self.matrix.scalars)

    @classmethod
    def load(cls, cfg: Config, serving_dir: Path | None = None) -> "Recommender":
        serving_dir = Path(serving_dir or cfg.serving.serving_dir)
        paths = current_refresh(serving_dir)
        if paths is None:
            raise FileNotFoundError(f"no feature snapshot under {serving_dir}: run `sendtime score` first")
        manifest = paths.read_manifest()
        frame = pd.read_parquet(paths.features)
        matrix = UserMatrix.from_frame(frame, datetime.fromisoformat(manifest["as_of"]),
                                       manifest["n_slots"], tuple(manifest["attributes"]))
        priors = prior_lookup(pd.read_parquet(paths.priors))
        champions = load_champions(cfg)
        log.info("loaded %d users as of %s; models %s", len(matrix), manifest["as_of"], champions.versions())
        return cls(cfg=cfg, champions=champions, matrix=matrix, priors=priors, refresh=paths,
                   manifest=manifest)

    def recommend(self, user_ids: list[str], window_start: datetime | None, window_hours: int) -> list[dict]:
        start = (window_start or datetime.now(timezone.utc)).astimezone(timezone.utc)
        pos = self.index.get_indexer(pd.Index(user_ids, dtype=object))
        known = pos >= 0
        has_history = np.zeros(len(user_ids), dtype=bool)
        has_history[known] = self.has_history[pos[known]]
        gone = np.zeros(len(user_ids), dtype=bool)
        gone[known] = self.unreachable[pos[known]]
        scored = np.flatnonzero(has_history)
        n_slots = self.matrix.n_slots
        slot_probs = np.full((len(user_ids), n_slots), np.nan)
        churn = np.full(len(user_ids), np.nan)
        if len(scored):
            if self.champions.open:
                slot_probs[scored] = slot_probabilities(self.champions, self.matrix, pos[scored])
            if self.champions.churn:
                churn[scored] = churn_probabilities(self.champions, self.matrix, pos[scored])
        zones = np.full(len(user_ids), self.cfg.slots.default_timezone, dtype=object)
        zones[known] = self.zones[pos[known]]
        if (~has_history).any():
            full_keys = np.array(zones, dtype=object)
            tz_keys = np.array(zones, dtype=object)
            if known.any():
                full, tz = _prior_keys(self.matrix.scalars.iloc[pos[known]], self.matrix.attributes)
                full_keys[known], tz_keys[known] = full.to_numpy(), tz.to_numpy()
            for i in np.flatnonzero(~has_history):
                prior = prior_for(self.priors, full_keys[i], tz_keys[i])
                if prior is not None:
                    if prior["slot_open_probs"] is not None:
                        slot_probs[i] = prior["slot_open_probs"]
                    if prior["churn_prob"] is not None and not pd.isna(prior["churn_prob"]):
                        churn[i] = prior["churn_prob"]
        cutoffs = self.manifest.get("churn_tier_cutoffs") or tier_cutoffs(None, self.cfg)
        tiers = churn_tier(churn, cutoffs)
        versions = self.champions.versions()
        results = []
        for i, user_id in enumerate(user_ids):
            probs = slot_probs[i]
            have_probs = not np.isnan(probs).all()
            send_at, send_prob, best = None, None, None
            if have_probs and not gone[i]:
                best = int(np.nanargmax(probs))
                cands = window_candidates(zones[i], start, window_hours, self.cfg.slots.kind)
                slots = np.array([s for _, s in cands])
                j = int(np.argmax(probs[slots]))
                send_at = cands[j][0].strftime("%Y-%m-%dT%H:%M:%SZ")
                send_prob = float(probs[slots[j]])
            results.append({
                "user_id": user_id,
                "slot_open_probs": [round(float(p), 6) for p in probs] if have_probs else None,
                "best_slot": best,
                "send_at": send_at,
                "send_at_open_prob": send_prob,
                "churn_prob": None if np.isnan(churn[i]) else float(churn[i]),
                "churn_tier": tiers[i],
                "cold_start": bool(not has_history[i]),
                "unsubscribed": bool(gone[i]),
                "model_versions": versions,
            })
        return results
