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
from serving.core import PriorTable, Scores, ScoringCore, tier_cutoffs
from serving.models import Champions, load_champions
from serving.plan_rules import PlanHistory, read_history
from serving.tagstore import RefreshPaths, current_refresh

__all__ = ["Lookup", "Recommender", "Scoreboard", "window_candidates", "window_slots"]

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


@lru_cache(maxsize=4096)
def window_slots(tz: str, start: datetime, hours: int, kind: str) -> tuple[np.ndarray, tuple[str, ...]]:
    """:func:`window_candidates` as (slots, ISO 8601 UTC times), ready for a request."""
    cands = window_candidates(tz, start, hours, kind)
    return (np.array([s for _, s in cands], dtype=np.int64),
            tuple(t.strftime("%Y-%m-%dT%H:%M:%SZ") for t, _ in cands))


@dataclass
class Scoreboard:
    """Every snapshot user's numbers, computed once per state (a refresh or a champion
    move), held compactly: a request only looks its users up."""

    slot_probs: np.ndarray | None   # (n, n_slots) float32, as in the tags
    best_slot: np.ndarray           # int16; -1: none
    churn_prob: np.ndarray          # float64; NaN: none
    churn_tier: np.ndarray          # object
    unreachable: np.ndarray         # bool
    cold_start: np.ndarray          # bool
    source: str                     # "tags" (the nightly job's numbers) or "rescored"

    @classmethod
    def from_tags(cls, tags: pd.DataFrame) -> Scoreboard:
        probs = tags["slot_open_probs"]
        slot = None
        if probs.notna().any():
            width = len(next(p for p in probs if p is not None))
            slot = np.full((len(tags), width), np.nan, dtype=np.float32)
            has = probs.notna().to_numpy()
            slot[has] = np.vstack(probs[has].to_numpy()).astype(np.float32)
        return cls(slot_probs=slot,
                   best_slot=tags["best_slot"].fillna(-1).to_numpy(dtype=np.int16),
                   churn_prob=tags["churn_prob"].to_numpy(dtype=float, na_value=np.nan),
                   churn_tier=tags["churn_tier"].to_numpy(dtype=object),
                   unreachable=tags["unsubscribed"].to_numpy(dtype=bool),
                   cold_start=tags["cold_start"].to_numpy(dtype=bool), source="tags")

    @classmethod
    def from_scores(cls, scores: Scores) -> Scoreboard:
        slot = scores.slot_probs.astype(np.float32) if scores.slot_probs is not None else None
        return cls(slot_probs=slot, best_slot=scores.best_slot.astype(np.int16), churn_prob=scores.churn_prob,
                   churn_tier=scores.churn_tier, unreachable=scores.unreachable, cold_start=scores.cold_start,
                   source="rescored")


@dataclass
class Lookup:
    """Asked users' numbers, in the order asked."""

    slot: np.ndarray | None       # (n, n_slots) float32; NaN rows: nothing known
    best: np.ndarray              # int; -1: none
    churn: np.ndarray
    tiers: np.ndarray
    unreachable: np.ndarray
    cold: np.ndarray
    zones: np.ndarray             # the zone each user's slots are in
    zone_assumed: np.ndarray      # unknown to the snapshot and no zone given


@dataclass
class Recommender:
    cfg: Config
    core: ScoringCore
    priors: PriorTable
    refresh: RefreshPaths
    manifest: dict
    board: Scoreboard | None = None
    plan_history: PlanHistory | None = None    # the campaign rules' history as of the refresh

    def __post_init__(self) -> None:
        self.index = pd.Index(self.core.matrix.user_ids, dtype=object)
        self.index.get_indexer(self.index[:1])   # build the hash table now, not on the first request
        # a plain dict answers a handful of ids faster than pandas' indexer (most requests)
        self.position_of = dict(zip(self.index.tolist(), range(len(self.index))))
        self.cutoffs = self.manifest.get("churn_tier_cutoffs") or tier_cutoffs(None, self.cfg)
        self.versions = self.core.champions.versions()
        if self.board is None:
            self.board = self._scoreboard()

    def _scoreboard(self) -> Scoreboard:
        """The nightly job's numbers when it used these champions on this snapshot (they are
        the core's numbers); else every user scored once with the core, off the request path."""
        if self.manifest.get("model_versions") == self.versions and self.refresh.tags.exists():
            tags = pd.read_parquet(self.refresh.tags)
            if len(tags) == len(self.index) and (tags["user_id"].to_numpy(dtype=object) == self.index.to_numpy()).all():
                return Scoreboard.from_tags(tags)
        log.info("champions %s differ from the refresh's %s: scoring %d users once", self.versions,
                 self.manifest.get("model_versions"), len(self.index))
        everyone = np.arange(len(self.index))
        return Scoreboard.from_scores(self.core.score(everyone, self.priors, self.cutoffs))

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
    def load(cls, cfg: Config, serving_dir: Path | None = None, champions: Champions | None = None) -> Recommender:
        """The current refresh with the champions (``champions``: already loaded ones to reuse,
        when the registry still points at the same versions)."""
        serving_dir = Path(serving_dir or cfg.serving.serving_dir)
        paths = current_refresh(serving_dir)
        if paths is None:
            raise FileNotFoundError(f"no feature snapshot under {serving_dir}: run `sendtime score` first")
        matrix, manifest = read_snapshot(paths.root)
        priors = PriorTable(pd.read_parquet(paths.priors))
        champions = champions or load_champions(cfg)
        history = read_history(paths.root)
        log.info("loaded %d users as of %s; models %s", len(matrix), manifest["as_of"], champions.versions())
        return cls(cfg=cfg, core=ScoringCore(champions, matrix, cfg), priors=priors, refresh=paths,
                   manifest=manifest, plan_history=history)

    def positions(self, user_ids: Sequence[str]) -> np.ndarray:
        if len(user_ids) <= 64:
            get = self.position_of.get
            return np.fromiter((get(u, -1) for u in user_ids), dtype=np.int64, count=len(user_ids))
        return self.index.get_indexer(pd.Index(list(user_ids), dtype=object))

    def lookup(self, user_ids: Sequence[str], zones: Sequence[str | None] | None = None,
               attributes: Sequence[dict | None] | None = None) -> Lookup:
        """The asked users' numbers: the snapshot's, or for users it does not know, the
        prior of the zone (and attributes) the caller gives."""
        pos = self.positions(user_ids)
        board = self.board
        n = len(user_ids)
        known = pos >= 0
        kpos = pos[known]
        slot = None
        if board.slot_probs is not None:
            slot = np.full((n, board.slot_probs.shape[1]), np.nan, dtype=np.float32)
            slot[known] = board.slot_probs[kpos]
        best = np.full(n, -1, dtype=np.int64)
        best[known] = board.best_slot[kpos]
        churn = np.full(n, np.nan)
        churn[known] = board.churn_prob[kpos]
        tiers = np.full(n, None, dtype=object)
        tiers[known] = board.churn_tier[kpos]
        gone = np.zeros(n, dtype=bool)
        gone[known] = board.unreachable[kpos]
        cold = np.ones(n, dtype=bool)
        cold[known] = board.cold_start[kpos]
        unknown = np.flatnonzero(~known)
        if len(unknown):
            extra = self.core.score(pos[unknown], self.priors, self.cutoffs,
                                    zones=[zones[i] if zones else None for i in unknown],
                                    attributes=[attributes[i] if attributes else None for i in unknown])
            if slot is not None and extra.slot_probs is not None:
                slot[unknown] = extra.slot_probs
            best[unknown], churn[unknown], tiers[unknown] = extra.best_slot, extra.churn_prob, extra.churn_tier
        assumed = ~known & np.array([not (zones and zones[i]) for i in range(n)], dtype=bool)
        return Lookup(slot=slot, best=best, churn=churn, tiers=tiers, unreachable=gone, cold=cold,
                      zones=self.core.zone_of(pos, zones), zone_assumed=assumed)

    def recommend(self, user_ids: list[str], window_start: datetime | None, window_hours: int,
                  zones: Sequence[str | None] | None = None,
                  attributes: Sequence[dict | None] | None = None) -> list[dict]:
        """One answer per user, in the order asked. ``zones``/``attributes``: what the caller
        knows of users the snapshot does not (a signup since last night)."""
        start = (window_start or datetime.now(timezone.utc)).astimezone(timezone.utc)
        found = self.lookup(user_ids, zones, attributes)
        n = len(user_ids)
        slot, best, churn, tiers = found.slot, found.best, found.churn, found.tiers
        cold, gone, assumed, user_zones = found.cold, found.unreachable, found.zone_assumed, found.zones
        # whole-block conversions: per-value numpy calls dominated small requests
        has = ~np.isnan(slot).all(axis=1) if slot is not None else np.zeros(n, dtype=bool)
        rounded = np.round(slot.astype(np.float64), 6).tolist() if slot is not None else [None] * n
        churn_out = [None if c != c else c for c in churn.tolist()]
        best_out, cold_out, gone_out = best.tolist(), cold.tolist(), gone.tolist()
        assumed_out = assumed.tolist()
        kind = self.cfg.slots.kind
        results = []
        for i, user_id in enumerate(user_ids):
            send_at = send_prob = best_i = None
            if best_out[i] >= 0:
                best_i = best_out[i]
                slots, times = window_slots(user_zones[i], start, window_hours, kind)
                row = slot[i, slots]
                j = int(row.argmax())
                send_at, send_prob = times[j], round(float(row[j]), 6)
            results.append({
                "user_id": user_id,
                "slot_open_probs": rounded[i] if has[i] else None,
                "best_slot": best_i,
                "send_at": send_at,
                "send_at_open_prob": send_prob,
                "churn_prob": churn_out[i],
                "churn_tier": tiers[i],
                "cold_start": cold_out[i],
                "unsubscribed": gone_out[i],
                "timezone": user_zones[i],
                "timezone_assumed": assumed_out[i],
                "model_versions": self.versions,
            })
        return results
