"""Point-in-time user-behaviour matrices: everything known about each user at ``as_of``.

One function per feature family, each ``(log, as_of, cfg) -> frame indexed by user_id``;
training and scoring both call :func:`build_matrix`, so a feature cannot see past
``as_of`` in one and not the other. Aggregation runs in DuckDB; the per-slot
pooling (empirical Bayes, circular smoothing, low-rank profiles) in numpy.

The per-slot part is split into raw counts (:class:`SlotCounts`, additive over users),
population priors (:class:`PopulationPriors`, sums over users) and derived features, so
that user-partitioned chunks (the Dask path) only need the priors exchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime

import numpy as np
import pandas as pd
import pyarrow as pa
from threadpoolctl import threadpool_limits

from configs import Config
from features.btyd import INPUT_COLUMNS, BtydFit, btyd_columns, fit_btyd
from features.events import EventLog, process_cores, sql_ts
from features.rhythm_basis import RHYTHM_FAMILIES, RhythmBasis, fit_evidence, fit_rhythm_basis, fit_rows, rhythm_families
from features.state import DECAYED, SLOT_COUNTS, FeatureState, build_state, scalar_frame, stage_timer

__all__ = [
    "SLOT_FAMILIES",
    "UserMatrix",
    "SlotCounts",
    "PopulationPriors",
    "build_matrix",
    "slot_counts",
    "population_priors",
    "POPULATION",
    "circular_smooth",
    "population_priors_at",
    "slot_features_in_blocks",
    "user_attributes",
    "user_universe",
    "counts_of",
    "btyd_inputs_of",
    "with_btyd",
    "with_rhythm",
    "priors_of",
    "fit_rhythm",
    "rhythm_candidates",
    "rhythm_inputs",
]

logger = logging.getLogger(__name__)

# per-slot feature families, each an (n_users, n_slots) array
SLOT_FAMILIES: tuple[str, ...] = (
    "sends",            # matured sends in the slot (history window)
    "opened",           # of which opened
    "eb_rate",          # open rate shrunk toward the user's rate x the population's slot shape
    "circ_rate",        # the same after circular smoothing over neighbouring hours
    "lift",             # circ_rate over the user's overall rate
    "session_share",    # share of sessions in the slot, x n_slots (1 = uniform)
    "open_at_share",    # share of opens happening in the slot, x n_slots
    "profile",          # low-rank reconstruction of the engagement profile (pooled across users)
    "profile_rate",     # user rate x population slot shape x exp(profile deviation)
    "rate_rank",        # rank of circ_rate within the user (0 = best slot)
    "session_circ",     # share of sessions after wide circular smoothing, x n_slots
    "session_rank",     # rank of session_circ within the user (0 = busiest slot)
    "pooled_rate",      # circ_rate x session_circ: the user's open rate shaped by app use
    "pooled_rank",      # rank of pooled_rate within the user
) + tuple(f"decayed_{name}" for name in (
    # the same pooling over the whole history, each event weighted by its age
    # (features.slot_half_life_days): old evidence counts, recent evidence counts more
    "eb_rate", "circ_rate", "rate_rank", "open_at_share", "session_circ", "session_rank",
    "pooled_rate", "pooled_rank")) + RHYTHM_FAMILIES   # each user's posterior rhythm (features.rhythm_basis)


@dataclass
class SlotCounts:
    """Raw per-user, per-slot counts: additive, so chunks can be summed."""

    user_ids: np.ndarray
    sends: np.ndarray
    opened: np.ndarray
    sessions: np.ndarray
    opens_at: np.ndarray
    purchases_at: np.ndarray

    def take(self, user_ids: pd.Index) -> "SlotCounts":
        """The rows of ``user_ids`` (zeros for users these counts do not hold)."""
        rows = pd.Index(self.user_ids).get_indexer(user_ids)
        found = rows >= 0

        def pick(values: np.ndarray) -> np.ndarray:
            out = np.zeros((len(rows), values.shape[1]), dtype=values.dtype)
            out[found] = values[rows[found]]
            return out

        return SlotCounts(user_ids=np.asarray(user_ids), sends=pick(self.sends), opened=pick(self.opened),
                          sessions=pick(self.sessions), opens_at=pick(self.opens_at),
                          purchases_at=pick(self.purchases_at))


@dataclass(frozen=True)
class PopulationPriors:
    """What the whole population says about slots; computed once over all users."""

    slot_rate: np.ndarray          # population open rate per slot (smoothed)
    overall_rate: float
    profile_mean: np.ndarray       # mean log engagement profile
    profile_basis: np.ndarray      # (n_slots, rank) principal directions
    population: str = ""           # which users these sums ran over
    btyd: dict | None = None       # the BG/NBD fit over the same users (features.btyd.BtydFit), if any
    rhythm: dict | None = None     # the rhythm basis over the same users (features.rhythm_basis.RhythmBasis), if any

    def to_dict(self) -> dict:
        return {
            "population": self.population,
            "slot_rate": self.slot_rate.tolist(),
            "overall_rate": self.overall_rate,
            "profile_mean": self.profile_mean.tolist(),
            "profile_basis": self.profile_basis.tolist(),
            "btyd": self.btyd,
            "rhythm": self.rhythm,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "PopulationPriors":
        return cls(
            slot_rate=np.asarray(data["slot_rate"], dtype=float),
            overall_rate=float(data["overall_rate"]),
            profile_mean=np.asarray(data["profile_mean"], dtype=float),
            profile_basis=np.asarray(data["profile_basis"], dtype=float).reshape(
                len(data["profile_mean"]), -1
            ),
            population=data.get("population", ""),
            btyd=data.get("btyd"),
            rhythm=data.get("rhythm"),
        )


@dataclass
class UserMatrix:
    """User-level scalar features plus per-slot families, all as of one time."""

    as_of: datetime
    n_slots: int
    scalars: pd.DataFrame                      # index user_id
    slots: dict[str, np.ndarray] = field(default_factory=dict)  # family -> (n_users, n_slots)
    attributes: tuple[str, ...] = ()           # categorical attribute columns in ``scalars``

    @property
    def user_ids(self) -> pd.Index:
        return self.scalars.index

    def __len__(self) -> int:
        return len(self.scalars)

    def subset(self, positions: np.ndarray) -> "UserMatrix":
        return UserMatrix(
            as_of=self.as_of,
            n_slots=self.n_slots,
            scalars=self.scalars.iloc[positions],
            slots={k: v[positions] for k, v in self.slots.items()},
            attributes=self.attributes,
        )

    def to_frame(self) -> pd.DataFrame:
        """One wide frame (per-slot families as ``family__SSS`` columns) for Parquet."""
        blocks = [self.scalars.reset_index()]
        for family, values in self.slots.items():
            cols = [f"{family}__{s:03d}" for s in range(self.n_slots)]
            blocks.append(pd.DataFrame(values.astype(np.float32), columns=cols))
        return pd.concat(blocks, axis=1)

    def to_arrow(self, rows: slice = slice(None)) -> pa.Table:
        """The same table as :meth:`to_frame` (of the users ``rows``), built column by column
        (no copy of the per-slot arrays into one wide frame: 1.3 GB less at 1M users)."""
        table = pa.Table.from_pandas(self.scalars.iloc[rows].reset_index(), preserve_index=False)
        names, columns = list(table.column_names), list(table.columns)
        for family, values in self.slots.items():
            block = values[rows]
            for s in range(self.n_slots):
                names.append(f"{family}__{s:03d}")
                columns.append(pa.array(np.ascontiguousarray(block[:, s], dtype=np.float32)))
        return pa.Table.from_arrays(columns, names=names)

    @classmethod
    def from_frame(cls, frame: pd.DataFrame, as_of: datetime, n_slots: int,
                   attributes: tuple[str, ...]) -> "UserMatrix":
        slot_cols = [c for c in frame.columns if "__" in c]
        families = sorted({c.split("__")[0] for c in slot_cols}, key=SLOT_FAMILIES.index)
        slots = {
            f: frame[[f"{f}__{s:03d}" for s in range(n_slots)]].to_numpy(np.float32)
            for f in families
        }
        scalars = frame.drop(columns=slot_cols).set_index("user_id")
        return cls(as_of=as_of, n_slots=n_slots, scalars=scalars, slots=slots,
                   attributes=tuple(attributes))


# --------------------------------------------------------------------------- universe

def user_attributes(log: EventLog, user_ids: pd.Index) -> pd.DataFrame:
    """Time zone, signup time and attributes of ``user_ids`` (in that order) from the users table."""
    attrs = "".join(f', u."{a}"' for a in log.attribute_columns + log.numeric_attributes)
    log.con.register("wanted_ids", pd.DataFrame({"user_id": np.asarray(user_ids, dtype=object),
                                                 "_pos": np.arange(len(user_ids))}))
    try:
        frame = log.query_df(
            f"""SELECT w.user_id, coalesce(u.timezone, '{log.default_timezone}') AS timezone, u.signup_ts{attrs}
                FROM wanted_ids w LEFT JOIN users u USING (user_id) ORDER BY w._pos""")
    finally:
        log.con.unregister("wanted_ids")
    return frame.set_index("user_id")


def user_universe(log: EventLog, as_of: datetime, user_ids: pd.Index | None = None) -> pd.DataFrame:
    """Everyone known at ``as_of`` (signed up by then, or seen in the log by then), or
    exactly ``user_ids`` when given (their attributes from the users table)."""
    if user_ids is None:
        t = sql_ts(as_of)
        ids = log.query_df(f"""SELECT user_id FROM users WHERE signup_ts IS NULL OR signup_ts <= {t}
            UNION SELECT DISTINCT user_id FROM events WHERE ts <= {t} ORDER BY user_id""")["user_id"]
        user_ids = pd.Index(ids.to_numpy(dtype=object))
    return user_attributes(log, pd.Index(user_ids).unique())


# --------------------------------------------------------------------------- families

def counts_of(state: FeatureState) -> SlotCounts:
    """The state's per-slot counts as :class:`SlotCounts`: its own arrays, not copies (the
    pooling turns a block at a time into double precision; sums of integers are exact)."""
    return SlotCounts(user_ids=state.user_ids, **{k: state.slots[k] for k in SLOT_COUNTS})


def slot_counts(log: EventLog, as_of: datetime, cfg: Config, user_ids: pd.Index) -> SlotCounts:
    """Per-slot sends/opened (matured sends only), sessions and opens by their own hour."""
    return counts_of(build_state(log, as_of, cfg)).take(pd.Index(user_ids))


def _engagement_profile(counts: SlotCounts) -> np.ndarray:
    """Log share of engagement per slot, with a flat pseudo-count so empty users are flat."""
    # purchases count too: a purchases-only log (retail) still has active hours
    activity = counts.sessions + counts.opens_at + 2.0 * counts.opened + counts.purchases_at
    n_slots = activity.shape[1]
    share = (activity + 1.0 / n_slots * 4.0) / (activity.sum(axis=1, keepdims=True) + 4.0)
    return np.log(share * n_slots)


def population_priors(counts: SlotCounts | list[SlotCounts], cfg: Config,
                      population: str = "") -> PopulationPriors:
    """Population slot rates and the principal directions of engagement profiles.

    Accepts one SlotCounts or the chunks of a user-partitioned log (sums are additive).
    """
    parts = counts if isinstance(counts, list) else [counts]
    sends = sum(p.sends.sum(axis=0) for p in parts)
    opened = sum(p.opened.sum(axis=0) for p in parts)
    overall = float((opened.sum() + 1.0) / (sends.sum() + 10.0))
    # slots nobody was sent at borrow the overall rate instead of being zero
    slot_rate = (opened + 20.0 * overall) / (sends + 20.0)
    n_slots = len(sends)
    rank = min(cfg.features.profile_rank, n_slots - 1)
    n = sum(len(p.user_ids) for p in parts)
    total = sum(_engagement_profile(p).sum(axis=0) for p in parts)
    mean = total / max(n, 1)
    gram = np.zeros((n_slots, n_slots))
    for p in parts:
        centred = _engagement_profile(p) - mean
        gram += centred.T @ centred
    if rank > 0 and n > rank:
        values, vectors = np.linalg.eigh(gram)
        basis = vectors[:, np.argsort(values)[::-1][:rank]]
    else:
        basis = np.zeros((n_slots, 0))
    return PopulationPriors(slot_rate=slot_rate, overall_rate=overall,
                            profile_mean=mean, profile_basis=basis, population=population)


def circular_smooth(values: np.ndarray, kernel: tuple[float, ...]) -> np.ndarray:
    """Weighted sum over neighbouring slots, wrapping around midnight (and the week)."""
    out = kernel[0] * values
    for offset, weight in enumerate(kernel[1:], start=1):
        out = out + weight * (np.roll(values, offset, axis=1) + np.roll(values, -offset, axis=1))
    return out


# a rank family is whole numbers below the number of slots (at most 168): one byte each
# instead of four (0.4 GB less at 1M users x 24 slots for the six of them); model rows and
# the feature snapshot convert them to floats, the same numbers
RANK_DTYPE = np.uint8


def _rank(values: np.ndarray) -> np.ndarray:
    """0 for the user's highest slot, 1 for the next, ..."""
    return np.argsort(np.argsort(-values, axis=1), axis=1).astype(RANK_DTYPE)


def slot_features(counts: SlotCounts, priors: PopulationPriors, cfg: Config) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Derived per-slot families and each user's shrunk overall open rate."""
    f = cfg.features
    n_slots = counts.sends.shape[1]
    user_sends = counts.sends.sum(axis=1, keepdims=True)
    user_opened = counts.opened.sum(axis=1, keepdims=True)
    user_rate = (user_opened + f.user_prior_strength * priors.overall_rate) / (
        user_sends + f.user_prior_strength
    )
    shape = priors.slot_rate / priors.overall_rate
    prior = np.clip(user_rate * shape, 1e-4, 0.999)
    eb_rate = (counts.opened + f.slot_prior_strength * prior) / (counts.sends + f.slot_prior_strength)
    kernel = f.circular_kernel
    circ_sends = circular_smooth(counts.sends, kernel)
    circ_opened = circular_smooth(counts.opened, kernel)
    circ_rate = (circ_opened + f.slot_prior_strength * prior) / (circ_sends + f.slot_prior_strength)

    def share(values: np.ndarray) -> np.ndarray:
        return (values + 0.5) / (values.sum(axis=1, keepdims=True) + 0.5 * n_slots) * n_slots

    profile = _engagement_profile(counts)
    if priors.profile_basis.shape[1]:
        centred = profile - priors.profile_mean
        recon = centred @ priors.profile_basis @ priors.profile_basis.T + priors.profile_mean
    else:
        recon = np.broadcast_to(priors.profile_mean, profile.shape).copy()
    profile_rate = np.clip(prior * np.exp(recon - priors.profile_mean), 1e-4, 0.999)
    rate_rank = np.argsort(np.argsort(-circ_rate, axis=1), axis=1)
    wide = f.session_kernel
    circ_sess = circular_smooth(counts.sessions + counts.purchases_at, wide)
    session_circ = (circ_sess + 1e-3) / (circ_sess.sum(axis=1, keepdims=True) + 1e-3 * n_slots) * n_slots
    wide_rate = (circular_smooth(counts.opened, wide) + f.slot_prior_strength * prior) / (
        circular_smooth(counts.sends, wide) + f.slot_prior_strength)
    pooled_rate = wide_rate * session_circ
    families = {
        "sends": counts.sends,
        "opened": counts.opened,
        "eb_rate": eb_rate,
        "circ_rate": circ_rate,
        "lift": circ_rate / user_rate,
        "session_share": share(counts.sessions),
        "open_at_share": share(counts.opens_at),
        "profile": recon,
        "profile_rate": profile_rate,
        "rate_rank": rate_rank.astype(RANK_DTYPE),
        "session_circ": session_circ,
        "session_rank": _rank(session_circ),
        "pooled_rate": pooled_rate,
        "pooled_rank": _rank(pooled_rate),
    }
    return {k: v if v.dtype == RANK_DTYPE else v.astype(np.float32) for k, v in families.items()}, user_rate[:, 0]


def slot_features_in_blocks(counts: SlotCounts, priors: PopulationPriors, cfg: Config, block: int = 5_000,
                            keep: set[str] | None = None, threads: int = 1) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """:func:`slot_features` a block of users at a time (each user's features are their own
    counts with the priors), the blocks on ``threads`` threads: the same numbers, with float64
    temporaries the size of a block instead of a million users' (a few GB at 1M users x 24
    slots); small blocks stay in cache, and one BLAS thread per block keeps the threads from
    oversubscribing the cores."""
    n = len(counts.user_ids)
    out: dict[str, np.ndarray] = {}
    rate = np.empty(n)

    def one_block(start: int) -> None:
        part = slice(start, min(start + block, n))
        # in double precision a block at a time (counts may be stored narrower)
        chunk = SlotCounts(user_ids=counts.user_ids[part],
                           **{k: getattr(counts, k)[part].astype(np.float64) for k in SLOT_COUNTS})
        families, user_rate = slot_features(chunk, priors, cfg)
        for name, values in families.items():
            if keep is not None and name not in keep:
                continue    # only the families asked for get a whole matrix's array
            if name not in out:
                out[name] = np.empty((n, values.shape[1]), dtype=values.dtype)
            out[name][part] = values
        rate[part] = user_rate

    with threadpool_limits(limits=1, user_api="blas"):
        one_block(0)        # an empty matrix still has its families; this one allocates them
        # numpy releases the GIL in its loops; the blocks write disjoint rows of ``out``
        with ThreadPoolExecutor(max(1, threads)) as pool:
            list(pool.map(one_block, range(block, n, block)))
    return out, rate


def _utc_offset_hours(zones: pd.Series, as_of: datetime) -> np.ndarray:
    stamp = pd.Timestamp(as_of, tz="UTC")
    cache = {z: stamp.tz_convert(z).utcoffset().total_seconds() / 3600 for z in zones.unique()}
    return zones.map(cache).to_numpy(dtype=float)


POPULATION = "everyone known at the snapshot (signed up or seen in the log by then)"


def population_priors_at(log: EventLog, as_of: datetime, cfg: Config) -> PopulationPriors:
    """The priors of :data:`POPULATION` at ``as_of``."""
    return priors_of(build_state(log, as_of, cfg), cfg)


def priors_of(state: FeatureState, cfg: Config, everyone: pd.DataFrame | None = None,
              rhythm: bool = True) -> PopulationPriors:
    """The priors of everyone in ``state`` (:data:`POPULATION`): slot rates and profile
    directions, the BG/NBD fit, and the rhythm basis unless ``rhythm`` is False (a caller that
    reads no rhythm family). ``everyone``: the state's scalar frame, when already built."""
    scalars = scalar_frame(state, cfg) if everyone is None else everyone
    priors = with_btyd(population_priors(counts_of(state), cfg, POPULATION), scalars, cfg)
    return with_rhythm(priors, state, cfg) if rhythm else priors


def rhythm_inputs(state: FeatureState) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(engagement, sends, opened) by slot, over the whole history weighted by age where the
    state keeps it (a rhythm is learned from every event a user has), else the window's.
    Engagement is sessions and purchases, as the session families read it."""
    key = DECAYED if "sends" + DECAYED in state.slots else ""
    slots = state.slots
    return slots["sessions" + key] + slots["purchases_at" + key], slots["sends" + key], slots["opened" + key]


def rhythm_candidates(state: FeatureState, cfg: Config) -> tuple[np.ndarray, ...]:
    """(user ids, engagement, sends, opened) of the users of ``state`` the rhythm basis would
    be fitted on (features.rhythm_basis.fit_rows): a partition's candidates; the lowest id
    hashes of all partitions' candidates are the whole population's fit users."""
    activity, sends, opened = rhythm_inputs(state)
    rows = fit_rows(fit_evidence(activity, opened), cfg.features.rhythm_max_fit_users, state.user_ids)
    return state.user_ids[rows], activity[rows], sends[rows], opened[rows]


def fit_rhythm(activity: np.ndarray, sends: np.ndarray, opened: np.ndarray, user_ids: np.ndarray, cfg: Config,
               population: str = POPULATION) -> dict | None:
    """The rhythm basis of these users (rows in user id order), as stored in the priors."""
    f = cfg.features
    if not f.rhythm_components:
        return None
    # rhythm_harmonics counts harmonics of a day; an hour-of-week cycle has 7 days of them
    harmonics = f.rhythm_harmonics * np.asarray(activity).shape[1] // 24
    return fit_rhythm_basis(activity, sends, opened, n_components=f.rhythm_components, n_starts=f.rhythm_starts,
                            iterations=f.rhythm_fit_iterations, min_evidence=f.rhythm_min_evidence,
                            max_fit_users=f.rhythm_max_fit_users, user_ids=user_ids,
                            population=population, harmonics=harmonics, threads=process_cores(),
                            background_share=f.rhythm_background_share,
                            level_groups=f.rhythm_level_groups).to_dict()


def configured_rhythm_families(rhythm: dict, activity: np.ndarray, sends: np.ndarray, opened: np.ndarray,
                               cfg: Config, keep: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The rhythm families in ``keep`` of these users under a stored basis (the priors'
    ``rhythm``), with the configuration's posterior and pooling settings."""
    f = cfg.features
    return rhythm_families(RhythmBasis.from_dict(rhythm), activity, sends, opened,
                           slot_prior_strength=f.slot_prior_strength, user_prior_strength=f.user_prior_strength,
                           iterations=f.rhythm_iterations, keep=keep, shifts=tuple(f.rhythm_shifts),
                           shift_iterations=f.rhythm_shift_iterations, threads=f.rhythm_threads or process_cores(),
                           level_strength=f.rhythm_level_strength)


def with_rhythm(priors: PopulationPriors, state: FeatureState, cfg: Config) -> PopulationPriors:
    """The priors with the rhythm basis fitted on the same population (``state``: everyone's)."""
    return replace(priors, rhythm=fit_rhythm(*rhythm_inputs(state), state.user_ids, cfg, priors.population))


def btyd_inputs_of(scalars: pd.DataFrame) -> pd.DataFrame:
    """The BG/NBD inputs of the users who ever engaged, in user id order (a fit over the same
    users is then the same numbers however they were gathered: one machine or partitions)."""
    frame = scalars.loc[scalars["active_days_ever"] > 0, list(INPUT_COLUMNS)]
    return frame.sort_index()


def with_btyd(priors: PopulationPriors, scalars: pd.DataFrame, cfg: Config) -> PopulationPriors:
    """The priors with the BG/NBD fit over the same population (``scalars``: its users' columns)."""
    fit = fit_btyd(btyd_inputs_of(scalars), cfg)
    return replace(priors, btyd=fit.to_dict() if fit is not None else None)


def build_matrix(
    log: EventLog,
    as_of: datetime,
    cfg: Config,
    priors: PopulationPriors | None = None,
    user_ids: pd.Index | None = None,
    state: FeatureState | None = None,
    slot_families: Collection[str] | None = None,
) -> tuple[UserMatrix, PopulationPriors]:
    """Everything known about each user at ``as_of`` (events with ts <= as_of only).

    The per-slot features pool each user's counts with population priors (slot rates, the
    engagement profile's principal directions). Those are computed over one stated
    population, everyone known at ``as_of`` (:data:`POPULATION`), whoever ``user_ids``
    asks for: a user's features never depend on who else is in the call (training asks
    for the users sent to in the following week, scoring for everyone). Pass ``priors``
    when building a chunk of users of a population whose priors are already known, and
    ``state`` when the feature state as of ``as_of`` is at hand (the incremental refresh
    moves yesterday's forward instead of reading the whole log). ``slot_families``: the
    per-slot families the caller reads (None: all of :data:`SLOT_FAMILIES`); the others are
    not built, and priors computed here then lack the rhythm basis unless a rhythm family is
    asked for (the churn rows read two summaries: the age-weighted pooling and the learned
    rhythm would be most of a snapshot's cost, for nothing).
    """
    asked = set(SLOT_FAMILIES if slot_families is None else slot_families)
    rhythm_wanted = [name for name in cfg.features.rhythm_families if name in asked]
    stage = stage_timer(f"features as of {as_of}")
    if state is None:
        state = build_state(log, as_of, cfg)
    elif state.as_of != as_of:
        raise ValueError(f"the feature state is as of {state.as_of}, not {as_of}")
    stage(f"feature state of {len(state)} users")
    everyone = None
    if priors is None:
        everyone = scalar_frame(state, cfg)
        priors = priors_of(state, cfg, everyone, rhythm=bool(rhythm_wanted))
    if user_ids is not None:
        state = state.take(pd.Index(user_ids).unique())
        everyone = None
    counts = counts_of(state)
    universe = user_attributes(log, state.index)
    stage("population priors and attributes")
    families, user_rate = slot_features_in_blocks(counts, priors, cfg, keep=asked, threads=process_cores())
    wanted = {name: name[len("decayed_"):] for name in SLOT_FAMILIES if name.startswith("decayed_") and name in asked}
    if "sends" + DECAYED in state.slots and wanted:
        decayed = SlotCounts(user_ids=state.user_ids,
                             **{k: state.slots[k + DECAYED] for k in SLOT_COUNTS})
        pooled, _ = slot_features_in_blocks(decayed, priors, cfg, keep=set(wanted.values()),
                                            threads=process_cores())
        families.update({name: pooled[base] for name, base in wanted.items()})
        del decayed, pooled
    if priors.rhythm and rhythm_wanted:
        families.update(configured_rhythm_families(priors.rhythm, *rhythm_inputs(state), cfg, tuple(rhythm_wanted)))
    stage("per-slot pooling")
    scalars = everyone if everyone is not None else scalar_frame(state, cfg)
    fit = BtydFit.from_dict(priors.btyd) if priors.btyd else None
    for name, values in btyd_columns(fit, scalars, cfg).items():
        scalars[name] = values
    stage("recency, frequency, fatigue, trends, BG/NBD")
    scalars["user_open_rate"] = user_rate
    scalars["utc_offset_hours"] = _utc_offset_hours(universe["timezone"], as_of)
    signup = pd.to_datetime(universe["signup_ts"])
    scalars["tenure_days"] = ((pd.Timestamp(as_of) - signup).dt.total_seconds() / 86400).to_numpy()
    scalars["session_entropy"] = _entropy(counts.sessions + counts.opens_at)
    scalars["has_history"] = (scalars["n_events"] > 0).astype(float)
    scalars["timezone"] = universe["timezone"].astype(str).to_numpy()
    for attr in log.attribute_columns:
        scalars[attr] = universe[attr].astype("string").to_numpy()
    for attr in log.numeric_attributes:
        scalars[attr] = universe[attr].astype(float).to_numpy()
    matrix = UserMatrix(as_of=as_of, n_slots=cfg.slots.n_slots, scalars=scalars, slots=families,
                        attributes=("timezone",) + log.attribute_columns)
    return matrix, priors


def _entropy(activity: np.ndarray) -> np.ndarray:
    p = (activity + 1e-9) / (activity.sum(axis=1, keepdims=True) + 1e-9 * activity.shape[1])
    return -(p * np.log(p)).sum(axis=1)
