"""The user matrix built by user partition on a Dask cluster (:mod:`features.cluster`).

Users are split into partitions by a hash of their id (:func:`features.events.user_partition_sql`);
each worker opens its partition of the log from the shared file system and aggregates only its
users. The per-slot features pool a user's counts with population priors over everyone known
at T, which no partition has alone, so a command runs in two rounds:

1. each partition returns the sufficient statistics of the priors (:class:`PriorSums`: per-slot
   sums, the engagement profiles' sum and centred Gram matrix; a few kB, not the counts);
   the client adds them, in partition order, into the one :class:`PopulationPriors`;
2. each partition builds its users' matrix with those priors (``build_matrix(priors=...)``),
   and the client puts the partitions together in user order.

Every feature is then the one-machine feature, bit for bit, except the two low-rank profile
families (``profile``, ``profile_rate``): they go through the eigenvectors of the Gram matrix,
whose sum over partitions rounds differently from one sum over everyone (relative 1e-15 in
the priors), which can move a float32 feature by an ulp or so. ``PROFILE_FAMILIES`` and
``PROFILE_RTOL`` state it; the cluster test holds every other column to exact equality.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from configs import Config, resolve_as_of
from features.btyd import fit_btyd
from features.cluster import (
    Partitions,
    cluster_client,
    parse_cluster,
    plan_partitions,
    run_partitions,
    worker_cached,
    worker_popped,
    worker_resources,
)
from features.events import EventLog, open_log
from features.matrix import (
    POPULATION,
    PopulationPriors,
    SlotCounts,
    UserMatrix,
    btyd_inputs_of,
    build_matrix,
    counts_of,
    fit_rhythm,
    rhythm_candidates,
)
from features.state import FeatureState, build_state, scalar_frame

__all__ = ["PROFILE_FAMILIES", "PROFILE_RTOL", "LogSource", "PriorSums", "build_matrix_on_cluster",
           "combine_prior_sums", "concat_matrices", "concat_states", "features_on_cluster", "part_log", "part_matrix",
           "part_prior_sums", "part_state", "population_priors_on_cluster", "prior_sums"]

log = logging.getLogger(__name__)

# the per-slot families derived from the profile's principal directions, and how far a
# partitioned build may move them (relative: a float32 ulp is 6e-8 to 1.2e-7)
PROFILE_FAMILIES = ("profile", "profile_rate")
PROFILE_RTOL = 1e-6


@dataclass(frozen=True)
class LogSource:
    """Where a log is and how to open it: what travels to the workers instead of the data."""

    events: str
    users: str | None
    default_timezone: str
    materialize_max_rows: int
    duckdb_memory_limit: str
    duckdb_memory_share: float

    @classmethod
    def of(cls, events: str | Path, users: str | Path | None, cfg: Config) -> "LogSource":
        # absolute paths: a worker's working folder is not the client's
        return cls(events=str(Path(events).resolve()), users=str(Path(users).resolve()) if users else None,
                   default_timezone=cfg.slots.default_timezone,
                   materialize_max_rows=cfg.features.materialize_max_rows,
                   duckdb_memory_limit=cfg.features.duckdb_memory_limit,
                   duckdb_memory_share=cfg.cluster.duckdb_memory_share)

    def open_whole(self, cfg: Config, quarantine: str | Path | None = None) -> EventLog:
        """The whole log on the client: validated once (bad rows raise or go to ``quarantine``),
        its time range and event counts; scanned from the files, not loaded."""
        return open_log(self.events, self.users, default_timezone=self.default_timezone, quarantine=quarantine,
                        threads=cfg.models.threads, materialize_max_rows=0,
                        memory_limit=self.duckdb_memory_limit or None)

    def open_part(self, partition: tuple[int, int]) -> EventLog:
        """One partition's users, opened on a worker with the worker's threads and a share of
        its memory; the client validated the log, so bad rows are left out without a report."""
        threads, memory = worker_resources()
        limit = self.duckdb_memory_limit or None
        if memory:
            from dask.utils import parse_bytes

            share = int(memory * self.duckdb_memory_share)
            if limit is None or share < parse_bytes(limit):
                limit = f"{share // 2**20}MiB"
        return open_log(self.events, self.users, default_timezone=self.default_timezone, threads=threads,
                        materialize_max_rows=self.materialize_max_rows, memory_limit=limit,
                        partition=partition, prevalidated=True)


# --------------------------------------------------------------------------- the priors' sums

@dataclass(frozen=True)
class PriorSums:
    """What a set of users contributes to the population priors; sums over users, so the
    sums of disjoint sets combine (:func:`combine_prior_sums`)."""

    n_users: int
    sends: np.ndarray            # (n_slots,) matured sends per slot
    opened: np.ndarray           # (n_slots,) of which opened
    profile_sum: np.ndarray      # (n_slots,) sum of the users' log engagement profiles
    profile_gram: np.ndarray     # (n_slots, n_slots) of the profiles centred on their own mean
    # the BG/NBD inputs of the users who ever engaged (features.matrix.btyd_inputs_of): the fit
    # runs once over the union, as on one machine
    btyd_inputs: pd.DataFrame | None = None
    # the rows of the partition's users the rhythm basis may be fitted on (user ids, engagement,
    # sends, opened: features.matrix.rhythm_candidates); the fit runs once over the union's
    # lowest id hashes, the users one machine fits it on
    rhythm_rows: tuple[np.ndarray, ...] | None = None


def _engagement_profile(counts: SlotCounts) -> np.ndarray:
    # the definition of features.matrix (its private _engagement_profile), which the priors'
    # sums must follow; tests/test_cluster.py checks the two agree
    activity = counts.sessions + counts.opens_at + 2.0 * counts.opened + counts.purchases_at
    n_slots = activity.shape[1]
    share = (activity + 1.0 / n_slots * 4.0) / (activity.sum(axis=1, keepdims=True) + 4.0)
    return np.log(share * n_slots)


def prior_sums(counts: SlotCounts, btyd_inputs: pd.DataFrame | None = None,
               rhythm_rows: tuple[np.ndarray, ...] | None = None) -> PriorSums:
    """The sums of the users of ``counts`` (and their BG/NBD inputs and rhythm candidates,
    passed through)."""
    profile = _engagement_profile(counts)
    n = len(counts.user_ids)
    total = profile.sum(axis=0)
    centred = profile - total / max(n, 1)
    return PriorSums(n_users=n, sends=counts.sends.sum(axis=0), opened=counts.opened.sum(axis=0),
                     profile_sum=total, profile_gram=centred.T @ centred, btyd_inputs=btyd_inputs,
                     rhythm_rows=rhythm_rows)


def combine_prior_sums(parts: list[PriorSums], cfg: Config, population: str = POPULATION) -> PopulationPriors:
    """The priors of the union of disjoint sets of users, as ``features.matrix.population_priors``
    computes them over that union. Counts add exactly (integers in float64); the profile's mean
    and Gram matrix (Chan's pairwise update) only to float rounding. Added in the given order,
    so the same partitions give the same bits on every run."""
    n = sum(p.n_users for p in parts)
    n_slots = len(parts[0].sends)
    sends, opened, total = np.zeros(n_slots), np.zeros(n_slots), np.zeros(n_slots)
    for p in parts:
        sends, opened, total = sends + p.sends, opened + p.opened, total + p.profile_sum
    overall = float((opened.sum() + 1.0) / (sends.sum() + 10.0))
    slot_rate = (opened + 20.0 * overall) / (sends + 20.0)
    mean = total / max(n, 1)
    gram = np.zeros((n_slots, n_slots))
    for p in parts:
        shift = p.profile_sum / max(p.n_users, 1) - mean
        gram = gram + p.profile_gram + p.n_users * np.outer(shift, shift)
    rank = min(cfg.features.profile_rank, n_slots - 1)
    if rank > 0 and n > rank:
        values, vectors = np.linalg.eigh(gram)
        basis = vectors[:, np.argsort(values)[::-1][:rank]]
    else:
        basis = np.zeros((n_slots, 0))
    priors = PopulationPriors(slot_rate=slot_rate, overall_rate=overall, profile_mean=mean, profile_basis=basis,
                              population=population)
    candidates = [p.rhythm_rows for p in parts if p.rhythm_rows is not None]
    if candidates:
        ids = np.concatenate([c[0] for c in candidates])
        order = np.argsort(ids, kind="stable")   # user id order, as one machine's state rows
        rows = [np.concatenate([c[k] for c in candidates])[order] for k in range(4)]
        priors = replace(priors, rhythm=fit_rhythm(rows[1], rows[2], rows[3], rows[0], cfg, population))
    inputs = [p.btyd_inputs for p in parts if p.btyd_inputs is not None]
    if not inputs:
        return priors
    fit = fit_btyd(pd.concat(inputs).sort_index(), cfg)
    return replace(priors, btyd=fit.to_dict() if fit is not None else None)


# --------------------------------------------------------------------------- worker tasks

def part_log(source: LogSource, partition: tuple[int, int]) -> EventLog:
    """This worker's opened log of ``partition`` (opened once per command)."""
    return worker_cached(("log", source, partition), lambda: source.open_part(partition))


def part_prior_sums(partition: tuple[int, int], source: LogSource, as_ofs: list[datetime],
                    cfg: Config) -> list[PriorSums]:
    """Round 1: the partition's sums of the priors at each time (its users known then). The
    feature states they come from stay on the worker for round 2 (:func:`part_state`)."""
    lg = part_log(source, partition)
    out = []
    for t in as_ofs:
        state = worker_cached(("state", source, partition, t), lambda t=t: build_state(lg, t, cfg))
        rhythm = rhythm_candidates(state, cfg) if cfg.features.rhythm_components else None
        out.append(prior_sums(counts_of(state), btyd_inputs_of(scalar_frame(state, cfg)), rhythm))
    return out


def part_state(source: LogSource, partition: tuple[int, int], as_of: datetime) -> FeatureState | None:
    """The feature state round 1 left on this worker, taken (None when it ran elsewhere:
    ``build_matrix`` then builds it again)."""
    return worker_popped(("state", source, partition, as_of))


def part_matrix(partition: tuple[int, int], source: LogSource, as_of: datetime, cfg: Config,
                priors: PopulationPriors) -> tuple[UserMatrix, FeatureState]:
    """Round 2: the partition's users' matrix with the population's priors, and the feature
    state it came from."""
    lg = part_log(source, partition)
    state = part_state(source, partition, as_of) or build_state(lg, as_of, cfg)
    matrix, _ = build_matrix(lg, as_of, cfg, priors=priors, state=state)
    return matrix, state


def _matrix_only(partition: tuple[int, int], source: LogSource, as_of: datetime, cfg: Config,
                 priors: PopulationPriors) -> UserMatrix:
    return part_matrix(partition, source, as_of, cfg, priors)[0]


# --------------------------------------------------------------------------- client side

def population_priors_on_cluster(client: Any, parts: Partitions, source: LogSource, as_ofs: list[datetime],
                                 cfg: Config) -> list[PopulationPriors]:
    """The priors of everyone known at each of ``as_ofs``, from the partitions' sums."""
    sums = run_partitions(client, parts, part_prior_sums, source, list(as_ofs), cfg)
    return [combine_prior_sums([per_part[k] for per_part in sums], cfg) for k in range(len(as_ofs))]


def concat_matrices(parts: list[UserMatrix]) -> tuple[UserMatrix, np.ndarray]:
    """The partitions' matrices as one, in user id order (as a one-machine build orders them);
    also each row's (partition, row in partition) as an (n, 2) array."""
    first = parts[0]
    scalars = pd.concat([p.scalars for p in parts])
    origin = np.concatenate([np.column_stack([np.full(len(p), k), np.arange(len(p))])
                             for k, p in enumerate(parts)]).astype(np.int64)
    order = np.argsort(scalars.index.to_numpy(dtype=object), kind="stable")
    slots = {family: np.concatenate([p.slots[family] for p in parts])[order] for family in first.slots}
    matrix = UserMatrix(as_of=first.as_of, n_slots=first.n_slots, scalars=scalars.iloc[order], slots=slots,
                        attributes=first.attributes)
    return matrix, origin[order]


def concat_states(states: list[FeatureState], order: np.ndarray) -> FeatureState:
    """The partitions' feature states as one, rows in ``order`` (that of :func:`concat_matrices`):
    every per-user array is stacked, whatever fields the state has."""
    first = states[0]
    values: dict[str, Any] = {}
    for f in fields(FeatureState):
        mine = [getattr(s, f.name) for s in states]
        if f.name in ("as_of", "fills"):
            values[f.name] = mine[0]
        elif mine[0] is None:
            values[f.name] = None
        elif isinstance(mine[0], dict):
            values[f.name] = {k: np.concatenate([m[k] for m in mine])[order] for k in mine[0]}
        elif isinstance(mine[0], np.ndarray):
            values[f.name] = np.concatenate(mine)[order]
        else:
            raise TypeError(f"feature state field {f.name!r} ({type(mine[0]).__name__}) has no rule to combine")
    if any(s.as_of != first.as_of for s in states):
        raise ValueError("feature states of different times cannot be combined")
    return FeatureState(**values)


def build_matrix_on_cluster(client: Any, parts: Partitions, source: LogSource, as_of: datetime,
                            cfg: Config) -> tuple[UserMatrix, PopulationPriors]:
    """``build_matrix(log, as_of, cfg)`` of the whole log, built by user partition."""
    (priors,) = population_priors_on_cluster(client, parts, source, [as_of], cfg)
    matrices = run_partitions(client, parts, _matrix_only, source, as_of, cfg, priors)
    log.info("features of %d users as of %s from %d partitions", sum(len(m) for m in matrices), as_of,
             parts.n_parts)
    matrix, _ = concat_matrices(matrices)
    return matrix, priors


def features_on_cluster(cluster: str, events: str | Path, users: str | Path | None, cfg: Config,
                        as_of: datetime | None = None, quarantine: str | Path | None = None,
                        ) -> tuple[UserMatrix, PopulationPriors]:
    """``sendtime features --cluster``: validate the log here, build its matrix as of ``as_of``
    (default: the last event) on the cluster."""
    parse_cluster(cluster)   # a wrong --cluster fails before the log is read
    source = LogSource.of(events, users, cfg)
    whole = source.open_whole(cfg, quarantine)
    as_of = resolve_as_of(as_of, whole.max_ts)
    with cluster_client(cluster, cfg) as client:
        return build_matrix_on_cluster(client, plan_partitions(client, cfg), source, as_of, cfg)
