"""Scoring users with the champions: per-slot open probabilities, churn probability and
tier, cold-start priors, and the nightly tag refresh."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from features.events import EventLog
from features.matrix import UserMatrix, build_matrix
from features.rows import churn_rows, encode_all_slot_rows
from configs import Config
from serving.models import Champions
from serving.tagstore import RefreshPaths, new_refresh_dir, publish_refresh, write_store

__all__ = ["slot_probabilities", "churn_probabilities", "churn_tier", "tier_cutoffs", "cold_start_priors",
           "score_matrix", "refresh_tags", "RefreshResult", "TAG_COLUMNS"]

log = logging.getLogger(__name__)

TAG_COLUMNS = ["user_id", "slot_open_probs", "best_slot", "best_slot_open_prob", "churn_prob",
               "churn_tier", "churn_reasons", "open_model_version", "churn_model_version", "scored_at",
               "cold_start", "unsubscribed"]
_MIN_PRIOR_USERS = 30


def slot_probabilities(champions: Champions, matrix: UserMatrix, positions: np.ndarray) -> np.ndarray:
    """(len(positions), n_slots) calibrated open probabilities; 0 for users who unsubscribed
    after their last send (no message reaches them)."""
    positions = np.asarray(positions)
    x = encode_all_slot_rows(champions.open.spec, matrix, positions)
    probs = champions.open.predict_array(x).reshape(len(positions), matrix.n_slots)
    return without_unreachable(probs, unreachable(matrix.scalars, positions))


def unreachable(scalars: pd.DataFrame, positions: np.ndarray | None = None) -> np.ndarray:
    """Users whose last unsubscribe came after their last send (none in a snapshot written
    before the flag existed)."""
    n = len(scalars) if positions is None else len(positions)
    if "unreachable" not in scalars:
        return np.zeros(n, dtype=bool)
    flag = scalars["unreachable"].to_numpy()
    # index before comparing: a request asks about a few users of a million
    return (flag if positions is None else flag[np.asarray(positions)]) > 0


def without_unreachable(probs: np.ndarray, gone: np.ndarray) -> np.ndarray:
    # the models never saw a send to such a user (there are none): this is a rule, not a
    # prediction. It halves the log loss gap to the oracle on the simulated data.
    if gone.any():
        probs = probs.copy()
        probs[gone] = 0.0
    return probs


def churn_probabilities(champions: Champions, matrix: UserMatrix, positions: np.ndarray) -> np.ndarray:
    return champions.churn.predict(churn_rows(matrix.subset(np.asarray(positions))))


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


def churn_reasons(champions: Champions, matrix: UserMatrix, positions: np.ndarray, k: int) -> list[list[str]]:
    from serving.reasons import top_reasons

    x = champions.churn.spec.encode(churn_rows(matrix.subset(np.asarray(positions))))
    spec = champions.churn.spec
    return top_reasons(champions.churn.contributions(x), x, list(spec.names), k, spec.categories)


def _prior_keys(frame: pd.DataFrame, attributes: tuple[str, ...]) -> tuple[pd.Series, pd.Series]:
    tz = frame["timezone"].astype(str)
    full = tz.copy()
    for attr in attributes:
        if attr != "timezone" and attr in frame.columns:
            full = full + "|" + attr + "=" + frame[attr].astype("string").fillna("?").astype(str)
    return full, tz


def cold_start_priors(scalars: pd.DataFrame, attributes: tuple[str, ...], slot_probs: np.ndarray | None,
                      churn: np.ndarray | None) -> pd.DataFrame:
    """Mean predictions of users with history, by time zone + attributes, by time zone,
    and overall; groups under a minimum size are left out (the next level answers)."""
    # a new user is reachable: priors come from users a message can reach
    known = (scalars["has_history"].to_numpy() > 0) & ~unreachable(scalars)
    full, tz = _prior_keys(scalars, attributes)
    records = []
    for level, keys in (("attributes", full), ("timezone", tz), ("global", pd.Series("*", index=tz.index))):
        k = keys.to_numpy()[known]
        for key in pd.unique(k):
            mask = k == key
            if mask.sum() < _MIN_PRIOR_USERS and level != "global":
                continue
            records.append({
                "level": level, "key": key, "n_users": int(mask.sum()),
                "slot_open_probs": (slot_probs[known][mask].mean(axis=0).tolist()
                                    if slot_probs is not None else None),
                "churn_prob": float(churn[known][mask].mean()) if churn is not None else None,
            })
    return pd.DataFrame(records)


def prior_lookup(priors: pd.DataFrame) -> dict[tuple[str, str], dict]:
    return {(r["level"], r["key"]): r for r in priors.to_dict("records")}


def prior_for(lookup: dict, full_key: str, tz_key: str) -> dict | None:
    for level, key in (("attributes", full_key), ("timezone", tz_key), ("global", "*")):
        if (level, key) in lookup:
            return lookup[(level, key)]
    return None


def score_matrix(matrix: UserMatrix, champions: Champions, cfg: Config, scored_at: datetime,
                 progress: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The tag table for every user in ``matrix``, and the cold-start priors."""
    n, n_slots = len(matrix), matrix.n_slots
    batch = cfg.serving.score_batch_users
    slot_probs = np.full((n, n_slots), np.nan, dtype=np.float32) if champions.open else None
    churn = np.full(n, np.nan) if champions.churn else None
    k = cfg.serving.churn_reasons
    reasons: list = [None] * n
    cold = matrix.scalars["has_history"].to_numpy() == 0
    starts = range(0, n, batch)
    for start in tqdm(starts, desc="scoring users", unit="batch", disable=not progress):
        pos = np.arange(start, min(start + batch, n))
        if champions.open:
            slot_probs[pos] = slot_probabilities(champions, matrix, pos)
        if champions.churn:
            churn[pos] = churn_probabilities(champions, matrix, pos)
    priors = cold_start_priors(matrix.scalars, matrix.attributes, slot_probs, churn)
    if cold.any():
        lookup = prior_lookup(priors)
        full, tz = _prior_keys(matrix.scalars, matrix.attributes)
        for i in np.flatnonzero(cold):
            prior = prior_for(lookup, full.iloc[i], tz.iloc[i])
            if prior is None:
                continue
            if slot_probs is not None and prior["slot_open_probs"] is not None:
                slot_probs[i] = prior["slot_open_probs"]
            if churn is not None and prior["churn_prob"] is not None:
                churn[i] = prior["churn_prob"]
    versions = champions.versions()
    gone = unreachable(matrix.scalars)
    tags = pd.DataFrame({"user_id": matrix.user_ids.astype(str)})
    if slot_probs is not None:
        # a user with neither a score nor a prior, or one no message reaches, has no best
        # slot (not a false slot 0)
        scored = ~np.isnan(slot_probs).all(axis=1)
        known = scored & ~gone
        best = np.nan_to_num(slot_probs, nan=-1.0).argmax(axis=1)
        rows = list(slot_probs.astype(float))
        tags["slot_open_probs"] = rows if scored.all() else [r if k else None for r, k in zip(rows, scored)]
        tags["best_slot"] = pd.Series(best).where(known).astype("Int64")
        tags["best_slot_open_prob"] = np.where(known, slot_probs[np.arange(n), best], np.nan).astype(float)
    else:
        tags["slot_open_probs"] = None
        tags["best_slot"] = pd.array([None] * n, dtype="Int64")
        tags["best_slot_open_prob"] = np.nan
    tags["churn_prob"] = churn if churn is not None else np.nan
    cutoffs = tier_cutoffs(churn, cfg)
    tags["churn_tier"] = churn_tier(tags["churn_prob"].to_numpy(), cutoffs)
    if champions.churn and k:
        # SHAP costs ~3 ms a user: explain the users someone will act on, not everyone
        wanted = {"high": ("high",), "medium": ("high", "medium"), "low": ("high", "medium", "low")}
        explain = np.flatnonzero(tags["churn_tier"].isin(wanted[cfg.serving.churn_reasons_min_tier]).to_numpy()
                                 & ~cold)
        for start in tqdm(range(0, len(explain), batch), desc="explaining churn risk", unit="batch",
                          disable=not progress or not len(explain)):
            part = explain[start:start + batch]
            for i, r in zip(part, churn_reasons(champions, matrix, part, k)):
                reasons[i] = r
    tags["churn_reasons"] = reasons
    tags["open_model_version"] = versions["open"]
    tags["churn_model_version"] = versions["churn"]
    tags["scored_at"] = pd.Timestamp(scored_at).tz_localize("UTC") if scored_at.tzinfo is None else pd.Timestamp(scored_at)
    tags["cold_start"] = cold
    tags["unsubscribed"] = gone
    return tags[TAG_COLUMNS], priors


def _tags_table(tags: pd.DataFrame, n_slots: int) -> pa.Table:
    schema = pa.schema([
        ("user_id", pa.string()), ("slot_open_probs", pa.list_(pa.float32())), ("best_slot", pa.int32()),
        ("best_slot_open_prob", pa.float64()), ("churn_prob", pa.float64()), ("churn_tier", pa.string()),
        ("churn_reasons", pa.list_(pa.string())),
        ("open_model_version", pa.string()), ("churn_model_version", pa.string()),
        ("scored_at", pa.timestamp("us", tz="UTC")), ("cold_start", pa.bool_()), ("unsubscribed", pa.bool_()),
    ])
    return pa.Table.from_pandas(tags, schema=schema, preserve_index=False)


@dataclass
class RefreshResult:
    tags_path: Path
    refresh: RefreshPaths
    n_users: int
    n_cold_start: int
    versions: dict[str, str | None]
    missing: dict[str, str]


def _stage_parquet(table: pa.Table, path: Path) -> Path:
    """Write ``table`` beside ``path`` under a temporary name; the caller renames it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp)
    return tmp


def refresh_tags(log_: EventLog, cfg: Config, champions: Champions, out: Path | None,
                 as_of: datetime | None = None, progress: bool = True) -> RefreshResult:
    """The nightly job: features as of T, scores, tags, priors; published atomically.

    Everything is written under a temporary folder first; only a complete refresh
    replaces the current one, so a failure leaves the previous tags serving.
    """
    as_of = as_of or log_.max_ts()
    serving_dir = Path(cfg.serving.serving_dir)
    building, refresh_id = new_refresh_dir(serving_dir)
    staged_out = None
    try:
        log.info("building features of every user as of %s", as_of)
        matrix, _ = build_matrix(log_, as_of, cfg)
        log.info("features ready: %d users; scoring %d slots each", len(matrix), matrix.n_slots)
        scored_at = datetime.now(timezone.utc)
        tags, priors = score_matrix(matrix, champions, cfg, scored_at, progress)
        table = _tags_table(tags, matrix.n_slots)
        pq.write_table(table, building.tags)
        matrix.to_frame().to_parquet(building.features, index=False)
        priors.to_parquet(building.priors, index=False)
        manifest = {
            "refresh_id": refresh_id, "as_of": as_of.isoformat(), "scored_at": scored_at.isoformat(),
            "n_users": len(tags), "n_cold_start": int(tags["cold_start"].sum()),
            "n_slots": matrix.n_slots, "slot_kind": cfg.slots.kind,
            "attributes": list(matrix.attributes), "model_versions": champions.versions(),
            "churn_tier_cutoffs": tier_cutoffs(tags["churn_prob"].to_numpy(float), cfg),
            "missing_tasks": champions.missing, "events": log_.sources.get("events", ""),
        }
        write_store(building, tags, priors, manifest)
        building.manifest.write_text(json.dumps(manifest, indent=2))
        staged_out = _stage_parquet(table, Path(out)) if out is not None else None
        published = publish_refresh(serving_dir, building, refresh_id, cfg.serving.keep_refreshes)
        if staged_out is not None:
            # only a published refresh replaces --out, so the two never disagree after a failure
            os.replace(staged_out, Path(out))
    except BaseException:
        import shutil

        shutil.rmtree(building.root, ignore_errors=True)
        if staged_out is not None:
            staged_out.unlink(missing_ok=True)
        raise
    return RefreshResult(tags_path=Path(out) if out else published.tags, refresh=published,
                         n_users=len(tags), n_cold_start=int(tags["cold_start"].sum()),
                         versions=champions.versions(), missing=champions.missing)
