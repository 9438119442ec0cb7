"""The nightly job: read the log, build every user's features as of T, score them with the
scoring core (:mod:`serving.core`), write the tags, the tag store, the feature snapshot and
the cold-start priors into a new refresh folder, and publish it atomically.

Everything is written under a temporary folder first; only a complete refresh replaces
the current one, so a failure leaves the previous tags serving. The whole job holds the
serving folder's refresh lock (:func:`serving.tagstore.refresh_lock`), so a second run
fails at once instead of breaking this one; and a refresh as of a time older than the
current one's (a backfill) is published beside it, not served, unless ``make_current``.
"""

from __future__ import annotations

import logging
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from configs import Config, atomic_path, resolve_as_of
from features.active_hours import NothingToPredictError, predict_active_hours
from features.events import EventLog
from features.families import feature_catalog
from features.snapshot import write_snapshot
from features.state import write_state
from serving.core import PriorTable, Scores, ScoringCore, cold_start_priors
from serving.drift import DriftReport, check_drift
from serving.incremental import refresh_features
from serving.models import Champions
from serving.plan_rules import PLAN_SENDS_FILE, PLAN_USERS_FILE, copy_history_sends, history_from_state, load_history
from serving.reasons import Reasons
from serving.tagstore import (
    Publication,
    RefreshLock,
    RefreshPaths,
    new_refresh_dir,
    publish_refresh,
    refresh_lock,
    write_store,
)

__all__ = ["ACTIVE_HOURS_FIELD", "TAG_COLUMNS", "RefreshResult", "publish_beyond", "publish_built", "refresh_tags",
           "tags_frame", "tags_table"]

log = logging.getLogger(__name__)

TAG_COLUMNS = ["user_id", "slot_open_probs", "best_slot", "best_slot_open_prob", "churn_prob",
               "churn_tier", "churn_reasons", "open_model_version", "churn_model_version", "scored_at",
               "cold_start", "unsubscribed"]
TAG_SCHEMA = pa.schema([
    ("user_id", pa.string()), ("slot_open_probs", pa.list_(pa.float32())), ("best_slot", pa.int32()),
    ("best_slot_open_prob", pa.float64()), ("churn_prob", pa.float64()), ("churn_tier", pa.string()),
    ("churn_reasons", pa.list_(pa.string())),
    ("open_model_version", pa.string()), ("churn_model_version", pa.string()),
    ("scored_at", pa.timestamp("us", tz="UTC")), ("cold_start", pa.bool_()), ("unsubscribed", pa.bool_()),
])
# appended to the tags when there is no open champion: each user's predicted local hours of
# any engagement, most active first (features.active_hours)
ACTIVE_HOURS_FIELD = pa.field("active_hours", pa.list_(pa.int32()))


@dataclass
class RefreshResult:
    tags_path: Path
    refresh: RefreshPaths
    n_users: int
    n_cold_start: int
    versions: dict[str, str | None]
    missing: dict[str, str]
    publication: Publication
    features: str = ""          # how the features were made: moved forward, or rebuilt and why
    drift: DriftReport | None = None   # PSI against the champions' references; None: [drift] enabled = false

    @property
    def became_current(self) -> bool:
        return self.publication.became_current

    @property
    def backfill(self) -> bool:
        """Its as-of time is older than that of the refresh serving before it."""
        return self.publication.backfill

    def backfill_note(self) -> str | None:
        """What a backfill did, in words: None for an ordinary refresh."""
        pub = self.publication
        if not pub.backfill:
            return None
        used = ", ".join(f"{task} v{v}" if v else f"{task}: none" for task, v in self.versions.items())
        if pub.became_current:
            return (f"backfill made current: refresh {pub.paths.refresh_id} (as of {pub.as_of}) now serves in place "
                    f"of one as of {pub.current_as_of}; champion versions used: {used}")
        try:
            serving_versions = pub.current.read_manifest().get("model_versions") or {}
        except (OSError, ValueError):
            serving_versions = {}
        serving = ", ".join(f"{task} v{v}" for task, v in serving_versions.items() if v)
        return (f"backfill: as of {pub.as_of}, older than the current refresh {pub.current.refresh_id} "
                f"(as of {pub.current_as_of}{f', models {serving}' if serving else ''}), which stays current; "
                f"published as {pub.paths.root} without serving it; champion versions used: {used}. "
                "Pass --make-current to serve it instead")


def tags_frame(user_ids: pd.Index, scores, versions: dict[str, str | None], scored_at: datetime,
               reasons: list) -> pd.DataFrame:
    """The contract's tag table from the core's scores."""
    n = len(user_ids)
    tags = pd.DataFrame({"user_id": np.asarray(user_ids).astype(str)})
    slot = scores.slot_probs
    if slot is not None:
        # a user with neither a score nor a prior has no probabilities and no best slot
        # (not a false slot 0), nor has one no message reaches
        has = ~np.isnan(slot).all(axis=1)
        rows = list(slot.astype(float))
        tags["slot_open_probs"] = rows if has.all() else [r if k else None for r, k in zip(rows, has)]
    else:
        tags["slot_open_probs"] = None
    tags["best_slot"] = pd.Series(scores.best_slot).where(scores.best_slot >= 0).astype("Int64")
    tags["best_slot_open_prob"] = scores.best_prob()
    tags["churn_prob"] = scores.churn_prob
    tags["churn_tier"] = scores.churn_tier
    tags["churn_reasons"] = reasons if reasons else [None] * n
    tags["open_model_version"] = versions["open"]
    tags["churn_model_version"] = versions["churn"]
    stamp = pd.Timestamp(scored_at)
    tags["scored_at"] = stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp
    tags["cold_start"] = scores.cold_start
    tags["unsubscribed"] = scores.unreachable
    return tags[TAG_COLUMNS]


def tags_table(user_ids: pd.Index, scores: Scores, versions: dict[str, str | None], scored_at: datetime,
               explained: np.ndarray | None = None, reasons: Reasons | None = None) -> pa.Table:
    """The contract's tag table from the core's scores, as Arrow columns built from the
    arrays themselves (no Python object a user): the same table as ``tags_frame`` gives.

    ``explained``: the positions whose churn reasons ``reasons`` holds, ascending; the
    other users' reasons are null."""
    n = len(user_ids)
    columns: dict[str, pa.Array] = {"user_id": pa.array(np.asarray(user_ids, dtype=object), pa.string())}
    slot = scores.slot_probs
    if slot is not None:
        # a user with neither a score nor a prior has no probabilities and no best slot
        # (not a false slot 0), nor has one no message reaches
        has = ~np.isnan(slot).all(axis=1)
        width = slot.shape[1]
        offsets = pa.array(np.arange(0, (n + 1) * width, width, dtype=np.int32))
        values = pa.array(slot.astype(np.float32).reshape(-1), pa.float32())
        columns["slot_open_probs"] = pa.ListArray.from_arrays(offsets, values, mask=pa.array(~has))
    else:
        columns["slot_open_probs"] = pa.nulls(n, pa.list_(pa.float32()))
    best = scores.best_slot
    columns["best_slot"] = pa.array(best.astype(np.int32), pa.int32(), mask=best < 0)
    # NaN is "none" in these columns (as a frame's NaN becomes null in Parquet)
    columns["best_slot_open_prob"] = pa.array(scores.best_prob(), pa.float64(), from_pandas=True)
    columns["churn_prob"] = pa.array(np.asarray(scores.churn_prob, dtype=np.float64), pa.float64(), from_pandas=True)
    columns["churn_tier"] = pa.array(scores.churn_tier, pa.string())
    if reasons is not None and explained is not None and len(explained):
        counts = np.zeros(n, dtype=np.int32)
        counts[explained] = reasons.counts
        offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))
        told = np.zeros(n, dtype=bool)
        told[explained] = True
        columns["churn_reasons"] = pa.ListArray.from_arrays(offsets, pa.array(reasons.flat(), pa.string()),
                                                            mask=pa.array(~told))
    else:
        columns["churn_reasons"] = pa.nulls(n, pa.list_(pa.string()))
    for task in ("open", "churn"):
        version = versions[task]
        columns[f"{task}_model_version"] = (pa.nulls(n, pa.string()) if version is None else
                                            pa.DictionaryArray.from_arrays(np.zeros(n, np.int32), [version])
                                            .cast(pa.string()))
    stamp = pd.Timestamp(scored_at)
    stamp = stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")
    columns["scored_at"] = pa.array(np.full(n, stamp.tz_localize(None).as_unit("us").to_datetime64()),
                                    TAG_SCHEMA.field("scored_at").type)
    columns["cold_start"] = pa.array(np.asarray(scores.cold_start, dtype=bool))
    columns["unsubscribed"] = pa.array(np.asarray(scores.unreachable, dtype=bool))
    return pa.Table.from_arrays([columns[c] for c in TAG_COLUMNS], schema=TAG_SCHEMA)


def _active_hours(log_: EventLog, as_of: datetime, cfg: Config, user_ids: pd.Index) -> pa.Array:
    """Without an open model: each user's predicted local hours of any engagement, most
    active first (the population's for users without engagement up to T; null for everyone
    when the log has none)."""
    try:
        hours = predict_active_hours(log_, as_of, cfg, user_ids=user_ids)
    except NothingToPredictError as exc:
        log.warning("%s: the tags' active_hours stay empty", exc)
        return pa.nulls(len(user_ids), ACTIVE_HOURS_FIELD.type)
    log.info("no open champion: the tags carry active_hours (%s)", hours.choice.describe())
    n, k = hours.top_hours.shape
    offsets = pa.array(np.arange(0, (n + 1) * k, k, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(hours.top_hours.astype(np.int32).reshape(-1), pa.int32()))


@contextmanager
def _stage(name: str, timings: dict[str, float]):
    """Log a step's wall time, and the CPU time of the process's threads beside it (on a
    shared machine the CPU time says what the step costs, the wall time what it waited;
    steps that overlap share both)."""
    start, cpu = time.perf_counter(), time.process_time()
    yield
    timings[name] = time.perf_counter() - start
    log.info("%s: %.1f s (%.1f s of CPU)", name, timings[name], time.process_time() - cpu)


def _timed(name: str, timings: dict[str, float], step, *args, **kwargs):
    with _stage(name, timings):
        return step(*args, **kwargs)


def _score_everyone(core: ScoringCore, progress: bool, timings: dict[str, float]) -> tuple[Scores, pd.DataFrame]:
    """Every user's scores and the cold-start priors they imply."""
    everyone = np.arange(len(core.matrix))
    with _stage("model scores", timings):
        model = core.model_scores(everyone, progress)
    with _stage("cold-start priors and tiers", timings):
        priors = cold_start_priors(core.matrix.scalars, core.matrix.attributes, *model)
        scores = core.score(everyone, PriorTable(priors), model=model)
    return scores, priors


def _explain_everyone(core: ScoringCore, scores: Scores, cfg: Config, progress: bool,
                      timings: dict[str, float]) -> tuple[np.ndarray, Reasons | None]:
    """Churn reasons of the users at or above the configured tier: (their positions,
    ascending, and their reasons)."""
    k = cfg.serving.churn_reasons
    if not (core.champions.churn and k):
        return np.zeros(0, dtype=np.int64), None
    with _stage("churn reasons", timings):
        explain = core.explain_positions(scores.churn_tier, scores.cold_start)
        return explain, core.explain_churn(explain, k, feature_catalog(cfg), progress)


def refresh_tags(log_: EventLog, cfg: Config, champions: Champions, out: Path | None,
                 as_of: datetime | None = None, progress: bool = True, *, make_current: bool = False,
                 lock: RefreshLock | None = None, full: bool = False) -> RefreshResult:
    """The nightly job: features as of T, scores, tags, priors; published atomically.

    Holds the serving folder's refresh lock throughout (``lock``, when the caller took it
    already; else taken here, failing at once with :class:`serving.tagstore.RefreshBusyError`
    while another refresh runs). A refresh as of a time older than the current one's is
    published but stays out of service unless ``make_current``; ``out`` is written either way.
    """
    serving_dir = Path(cfg.serving.serving_dir)
    if lock is not None:
        lock.require(serving_dir)
    with nullcontext(lock) if lock is not None else refresh_lock(serving_dir) as held:
        return _refresh_locked(log_, cfg, champions, out, as_of, progress, make_current, held, full)


def publish_built(serving_dir: Path, building: RefreshPaths, refresh_id: str, table: pa.Table, out: Path | None,
                  cfg: Config, lock: RefreshLock, make_current: bool) -> Publication:
    """Swap the finished refresh folder in, and write ``out`` beside it: only a published
    refresh replaces ``out``, so the two never disagree after a failure."""
    with atomic_path(out) if out is not None else nullcontext() as staged:
        if staged is not None:
            pq.write_table(table, staged)
        return publish_refresh(serving_dir, building, refresh_id, cfg.serving.keep_refreshes,
                               lock=lock, make_current=make_current)


def publish_beyond(publication: Publication, cfg: Config) -> None:
    """After the swap, under the same refresh lock: PostgreSQL when configured (a backfill
    kept out of service stays out of it too), and a word about such a backfill."""
    tag_store_url = cfg.serving.resolved_tag_store_url()
    if tag_store_url:
        from serving.pg_tagstore import publish_to_postgres

        publish_to_postgres(tag_store_url, publication.paths, publication)
    if publication.backfill and not publication.became_current:
        log.info("backfill as of %s kept out of service: the current refresh %s is as of %s",
                 publication.as_of, publication.current.refresh_id, publication.current_as_of)


def _refresh_locked(log_: EventLog, cfg: Config, champions: Champions, out: Path | None,
                    as_of: datetime | None, progress: bool, make_current: bool,
                    lock: RefreshLock, full: bool = False) -> RefreshResult:
    as_of = resolve_as_of(as_of, log_.max_ts)
    serving_dir = Path(cfg.serving.serving_dir)
    building, refresh_id = new_refresh_dir(serving_dir)
    try:
        log.info("building features of every user as of %s", as_of)
        features = refresh_features(log_, as_of, cfg, serving_dir, full=full)
        matrix, population = features.matrix, features.priors
        timings: dict[str, float] = {}
        # one writer thread: the state (mostly disk) while the campaign rules' users are read
        # off it, then the snapshot (it needs the scores, not the reasons: Parquet encodes it
        # on one core while TreeSHAP and the tag table take the rest); the logged times overlap
        with ThreadPoolExecutor(max_workers=1) as writer:
            state_saved = writer.submit(_timed, "feature state saved", timings, write_state,
                                        building.root, features.state, cfg, features.fingerprint)
            with _stage("campaign rules' users", timings):
                plan_users = history_from_state(features.state, log_.query_df("SELECT user_id, signup_ts FROM users"),
                                                cfg)
            features_note = features.how
            # the state's arrays (1.5 GB at 1M users) are let go before scoring allocates:
            # held beside the models' rows they took the peak from 5.9 to 6.8 GB
            state_saved.result()
            del features
            log.info("features ready: %d users; scoring %d slots each", len(matrix), matrix.n_slots)
            scored_at = datetime.now(timezone.utc)
            with _stage("scoring core", timings):
                core = ScoringCore(champions, matrix, cfg)
            scores, priors = _score_everyone(core, progress, timings)
            n_cold_start = int(np.count_nonzero(scores.cold_start))
            snapshot = writer.submit(_timed, "feature snapshot", timings, write_snapshot,
                building.root, matrix, population, cfg, durable=False,
                refresh_id=refresh_id, scored_at=scored_at.isoformat(),
                n_cold_start=n_cold_start, model_versions=champions.versions(),
                churn_tier_cutoffs=scores.cutoffs, missing_tasks=champions.missing,
                events=log_.sources.get("events", ""), features=features_note)
            explained, reasons = _explain_everyone(core, scores, cfg, progress, timings)
            with _stage("tag table", timings):
                table = tags_table(matrix.user_ids, scores, champions.versions(), scored_at, explained, reasons)
                if champions.open is None:
                    table = table.append_column(ACTIVE_HOURS_FIELD, _active_hours(log_, as_of, cfg, matrix.user_ids))
                pq.write_table(table, building.tags)
                priors.to_parquet(building.priors, index=False)
            manifest = snapshot.result()
        with _stage("tag store", timings):
            write_store(building, priors, manifest)
        # what the campaign rules need of each user, as of T, for POST /plan (the service
        # never reads the log): streaks, first seen, and the recent sends
        with _stage("campaign rules' history", timings):
            if plan_users is None:   # the rules look further back than the features: read the log
                history = load_history(log_, as_of, cfg.serving.max_window_hours, cfg)
                history.users.to_parquet(building.root / PLAN_USERS_FILE, index=False)
                history.sends.to_parquet(building.root / PLAN_SENDS_FILE, index=False)
            else:
                plan_users.to_parquet(building.root / PLAN_USERS_FILE, index=False)
                copy_history_sends(log_, as_of, cfg.serving.max_window_hours, cfg, building.root / PLAN_SENDS_FILE)
        with _stage("published", timings):
            publication = publish_built(serving_dir, building, refresh_id, table, out, cfg, lock, make_current)
    except BaseException:
        shutil.rmtree(building.root, ignore_errors=True)
        raise
    publish_beyond(publication, cfg)
    with _stage("drift", {}):
        drift = check_drift(matrix, scores, champions, cfg, refresh_id=refresh_id)
    published = publication.paths
    return RefreshResult(tags_path=Path(out) if out else published.tags, refresh=published,
                         n_users=table.num_rows, n_cold_start=n_cold_start,
                         versions=champions.versions(), missing=champions.missing, publication=publication,
                         features=features_note, drift=drift)
