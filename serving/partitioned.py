"""The nightly refresh on a Dask cluster: features and the champions' numbers by user
partition, then the same tags, tag store, snapshot and publication as a one-machine refresh.

Rounds, each partition on its worker (:mod:`features.cluster`, :mod:`features.partitioned`):

1. the sums of the population priors; the client combines them into the one set of priors;
2. the partition's matrix with those priors, its users' slot and churn probabilities from the
   scoring core (:class:`serving.core.ScoringCore`, the champions sent once to every worker)
   and the campaign rules' history of its users;
3. after the client has gathered everyone: churn reasons for the partition's users at or above
   the configured tier (the tiers' cut-offs and the cold-start priors are over everyone, so they
   are computed on the client, from the gathered numbers, as a one-machine refresh does).

The client then writes and publishes the refresh as :mod:`serving.refresh` does: the same
files (tags, store, snapshot, priors, the rules' history, the feature state the next refresh
can move forward), the users in the same order, the PostgreSQL tag store when configured, and
the drift logged. The features are always
built from the whole log (a refresh on the cluster does not move a state forward).
"""

from __future__ import annotations

import logging
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from configs import Config, resolve_as_of
from features.cluster import Partitions, cluster_client, parse_cluster, plan_partitions, run_partitions, worker_cached
from features.events import EventLog
from features.families import feature_catalog
from features.matrix import PopulationPriors
from features.partitioned import (
    LogSource,
    concat_matrices,
    concat_states,
    part_log,
    part_matrix,
    population_priors_on_cluster,
)
from features.snapshot import write_snapshot
from features.state import log_fingerprints, write_state
from serving.core import PriorTable, ScoringCore, cold_start_priors
from serving.drift import check_drift
from serving.models import Champions
from serving.plan_rules import PLAN_SENDS_FILE, PLAN_USERS_FILE, PlanHistory, load_history
from serving.refresh import TAG_SCHEMA, RefreshResult, publish_beyond, publish_built, tags_frame
from serving.tagstore import RefreshLock, new_refresh_dir, write_store

__all__ = ["refresh_on_cluster", "score_on_cluster"]

log = logging.getLogger(__name__)


def _kept_matrix(partition: tuple[int, int], source: LogSource, as_of: datetime, cfg: Config,
                 priors: PopulationPriors):
    # the matrix round 2 left on this worker (built again where a round lands elsewhere)
    return worker_cached(("matrix", source, partition, as_of),
                         lambda: part_matrix(partition, source, as_of, cfg, priors)[0])


def _part_scores(partition: tuple[int, int], source: LogSource, as_of: datetime, cfg: Config,
                 priors: PopulationPriors, champions: Champions) -> dict[str, Any]:
    """Round 2 on a worker: the partition's matrix and feature state, its users' model numbers
    and the rules' history."""
    matrix, state = part_matrix(partition, source, as_of, cfg, priors)
    worker_cached(("matrix", source, partition, as_of), lambda: matrix)
    slot, churn = ScoringCore(champions, matrix, cfg).model_scores(np.arange(len(matrix)))
    history = load_history(part_log(source, partition), as_of, cfg.serving.max_window_hours, cfg)
    return {"matrix": matrix, "state": state, "slot": slot, "churn": churn, "history": history}


def _part_reasons(partition: tuple[int, int], source: LogSource, as_of: datetime, cfg: Config,
                  priors: PopulationPriors, champions: Champions, rows: dict[int, np.ndarray], k: int) -> list:
    """Round 3 on a worker: churn reasons of the partition's rows the client asked about."""
    wanted = rows.get(partition[0], np.zeros(0, dtype=np.int64))
    if not len(wanted):
        return []
    matrix = _kept_matrix(partition, source, as_of, cfg, priors)
    return ScoringCore(champions, matrix, cfg).churn_reasons(wanted, k, feature_catalog(cfg))


def refresh_on_cluster(client: Any, parts: Partitions, source: LogSource, whole: EventLog, cfg: Config,
                       champions: Champions, out: Path | None, as_of: datetime | None, lock: RefreshLock, *,
                       make_current: bool = False, cluster: str = "") -> RefreshResult:
    """:func:`serving.refresh.refresh_tags` with the features, scores and reasons computed by
    user partition on ``client``'s cluster. ``whole`` is the client's validated view of the
    log (its time range, its fingerprint); the caller holds the serving folder's refresh ``lock``."""
    serving_dir = Path(cfg.serving.serving_dir)
    lock.require(serving_dir)
    as_of = resolve_as_of(as_of, whole.max_ts)
    building, refresh_id = new_refresh_dir(serving_dir)
    features_note = (f"built from the whole log by {parts.n_parts} user partitions on "
                     f"{cluster or client.scheduler.address}")
    try:
        log.info("building features and scores of every user as of %s in %d partitions", as_of, parts.n_parts)
        (population,) = population_priors_on_cluster(client, parts, source, [as_of], cfg)
        shared = client.scatter(champions, broadcast=True, hash=False)
        results = run_partitions(client, parts, _part_scores, source, as_of, cfg, population, shared)
        matrix, origin = concat_matrices([r["matrix"] for r in results])
        rows = _order(origin, results)
        write_state(building.root, concat_states([r["state"] for r in results], rows), cfg,
                    log_fingerprints(whole, [as_of])[0])
        model = tuple(None if results[0][key] is None else np.concatenate([r[key] for r in results])[rows]
                      for key in ("slot", "churn"))
        history = _concat_history([r["history"] for r in results])
        del results
        log.info("features and scores ready: %d users", len(matrix))
        scored_at = datetime.now(timezone.utc)
        core = ScoringCore(champions, matrix, cfg)
        everyone = np.arange(len(matrix))
        priors = cold_start_priors(matrix.scalars, matrix.attributes, *model)
        scores = core.score(everyone, PriorTable(priors), model=model)
        reasons = _reasons(client, parts, source, as_of, cfg, population, shared, core, scores, origin)
        tags = tags_frame(matrix.user_ids, scores, champions.versions(), scored_at, reasons)
        table = pa.Table.from_pandas(tags, schema=TAG_SCHEMA, preserve_index=False)
        pq.write_table(table, building.tags)
        priors.to_parquet(building.priors, index=False)
        manifest = write_snapshot(
            building.root, matrix, population, cfg,
            refresh_id=refresh_id, scored_at=scored_at.isoformat(),
            n_cold_start=int(tags["cold_start"].sum()), model_versions=champions.versions(),
            churn_tier_cutoffs=scores.cutoffs, missing_tasks=champions.missing,
            events=whole.sources.get("events", ""), features=features_note)
        write_store(building, priors, manifest)
        history.users.to_parquet(building.root / PLAN_USERS_FILE, index=False)
        history.sends.to_parquet(building.root / PLAN_SENDS_FILE, index=False)
        publication = publish_built(serving_dir, building, refresh_id, table, out, cfg, lock, make_current)
    except BaseException:
        shutil.rmtree(building.root, ignore_errors=True)
        raise
    publish_beyond(publication, cfg)
    drift = check_drift(matrix, scores, champions, cfg, refresh_id=refresh_id)
    published = publication.paths
    return RefreshResult(tags_path=Path(out) if out else published.tags, refresh=published,
                         n_users=len(tags), n_cold_start=int(tags["cold_start"].sum()),
                         versions=champions.versions(), missing=champions.missing, publication=publication,
                         features=features_note, drift=drift)


def _order(origin: np.ndarray, results: list[dict]) -> np.ndarray:
    """Rows of the partitions' concatenated arrays in the matrix's (user id) order."""
    starts = np.cumsum([0] + [len(r["matrix"]) for r in results])[:-1]
    return starts[origin[:, 0]] + origin[:, 1]


def _reasons(client: Any, parts: Partitions, source: LogSource, as_of: datetime, cfg: Config,
             population: PopulationPriors, champions: Any, core: ScoringCore, scores: Any,
             origin: np.ndarray) -> list:
    """Churn reasons for the users the one-machine refresh explains, each on its partition."""
    reasons: list = [None] * len(origin)
    k = cfg.serving.churn_reasons
    if not (core.champions.churn and k):
        return reasons
    explain = core.explain_positions(scores.churn_tier, scores.cold_start)
    if not len(explain):
        return reasons
    part_of = origin[explain, 0]
    wanted = {int(p): origin[explain[part_of == p], 1] for p in np.unique(part_of)}
    answered = run_partitions(client, parts, _part_reasons, source, as_of, cfg, population, champions, wanted, k,
                              only=sorted(wanted))
    for p, part_reasons in zip(sorted(wanted), answered):
        for i, r in zip(explain[part_of == p], part_reasons):
            reasons[i] = r
    return reasons


def _concat_history(parts: list[PlanHistory]) -> PlanHistory:
    return PlanHistory(users=pd.concat([p.users for p in parts], ignore_index=True),
                       sends=pd.concat([p.sends for p in parts], ignore_index=True))


def score_on_cluster(cluster: str, events: str | Path, users: str | Path | None, cfg: Config, champions: Champions,
                     out: Path | None, as_of: datetime | None, lock: RefreshLock, *, make_current: bool = False,
                     quarantine: str | Path | None = None) -> RefreshResult:
    """``sendtime score --cluster``: validate the log here, refresh on the cluster, publish here."""
    parse_cluster(cluster)   # a wrong --cluster fails before the log is read
    source = LogSource.of(events, users, cfg)
    whole = source.open_whole(cfg, quarantine)
    with cluster_client(cluster, cfg) as client:
        return refresh_on_cluster(client, plan_partitions(client, cfg), source, whole, cfg, champions, out, as_of,
                                  lock, make_current=make_current, cluster=cluster)
