"""Answering the scheduler: for each user, the probabilities of every slot, the best send
time inside the asked window, and churn risk, from the latest feature snapshot.

Everything here is loaded once (the snapshot into memory, the champions from the
registry); a request only looks its users up and asks the scoring core.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from functools import lru_cache
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np
import pandas as pd

from configs import Config
from features.snapshot import read_snapshot
from serving.core import PriorTable, ScoringCore, tier_cutoffs
from serving.models import load_champions
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
    core: ScoringCore
    priors: PriorTable
    refresh: RefreshPaths
    manifest: dict

    def __post_init__(self) -> None:
        self.index = pd.Index(self.core.matrix.user_ids, dtype=object)
        self.index.get_indexer(self.index[:1])   # build the hash table now, not on the first request
        self.cutoffs = self.manifest.get("churn_tier_cutoffs") or tier_cutoffs(None, self.cfg)

    @property
    def champions(self):
        return self.core.champions

    @property
    def matrix(self):
        return self.core.matrix

    @property
    def has_history(self) -> np.ndarray:
        return self.core.has_history

    @property
    def unreachable(self) -> np.ndarray:
        return self.core.unreachable

    @classmethod
    def load(cls, cfg: Config, serving_dir: Path | None = None) -> Recommender:
        serving_dir = Path(serving_dir or cfg.serving.serving_dir)
        paths = current_refresh(serving_dir)
        if paths is None:
            raise FileNotFoundError(f"no feature snapshot under {serving_dir}: run `sendtime score` first")
        matrix, manifest = read_snapshot(paths.root)
        priors = PriorTable(pd.read_parquet(paths.priors))
        champions = load_champions(cfg)
        log.info("loaded %d users as of %s; models %s", len(matrix), manifest["as_of"], champions.versions())
        return cls(cfg=cfg, core=ScoringCore(champions, matrix, cfg), priors=priors, refresh=paths,
                   manifest=manifest)

    def positions(self, user_ids: Sequence[str]) -> np.ndarray:
        return self.index.get_indexer(pd.Index(list(user_ids), dtype=object))

    def recommend(self, user_ids: list[str], window_start: datetime | None, window_hours: int,
                  zones: Sequence[str | None] | None = None) -> list[dict]:
        start = (window_start or datetime.now(timezone.utc)).astimezone(timezone.utc)
        pos = self.positions(user_ids)
        scores = self.core.score(pos, self.priors, self.cutoffs, zones)
        user_zones = self.core.zone_of(pos, zones)
        versions = self.champions.versions()
        slot = scores.slot_probs
        results = []
        for i, user_id in enumerate(user_ids):
            probs = slot[i] if slot is not None else None
            have_probs = probs is not None and not np.isnan(probs).all()
            send_at, send_prob, best = None, None, None
            if scores.best_slot[i] >= 0:
                best = int(scores.best_slot[i])
                cands = window_candidates(user_zones[i], start, window_hours, self.cfg.slots.kind)
                slots = np.array([s for _, s in cands])
                j = int(np.argmax(probs[slots]))
                send_at = cands[j][0].strftime("%Y-%m-%dT%H:%M:%SZ")
                send_prob = float(probs[slots[j]])
            churn = scores.churn_prob[i]
            results.append({
                "user_id": user_id,
                "slot_open_probs": [round(float(p), 6) for p in probs] if have_probs else None,
                "best_slot": best,
                "send_at": send_at,
                "send_at_open_prob": send_prob,
                "churn_prob": None if np.isnan(churn) else float(churn),
                "churn_tier": scores.churn_tier[i],
                "cold_start": bool(scores.cold_start[i]),
                "unsubscribed": bool(scores.unreachable[i]),
                "model_versions": versions,
            })
        return results
