"""Active hours from any engagement, for logs no open model can be trained on (purchases
only, app sessions only): each user's predicted local hours of engagement as of T.

A user's hours are their whole history of engagement events (``labels.engagement_events``)
up to T, each event weighted by its age (a half-life), smoothed over neighbouring hours (a
circular kernel) and shrunk toward the population's hours (pseudo-events): the posterior
mean of a Dirichlet whose prior is the population. Which half-life, kernel and strength is
chosen on earlier months of the same log: fit at T - k x ``check_days`` and score the hours
of the following ``check_days``' events by their predicted shares (log-likelihood), for
k = 1..``selection_splits``. Those months end at T at the latest, so nothing after T is read
and a prediction is point-in-time correct.

The same evidence gives the two references a prediction must beat: each user's own most
frequent past hours and the population's top hours. Ties go to the population's order.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

import numpy as np
import pandas as pd

from configs import Config, SendtimeError
from features.events import EventLog, sql_ts
from features.matrix import circular_smooth

__all__ = [
    "HOURS",
    "ActiveHours",
    "ActiveHoursChoice",
    "NothingToPredictError",
    "choose_active_hours",
    "engagement_after",
    "predict_active_hours",
    "top_hours_hits",
]

log = logging.getLogger(__name__)

HOURS = 24


class NothingToPredictError(SendtimeError, ValueError):
    """The log holds no engagement event up to T: no hours to predict from."""


@dataclass(frozen=True)
class ActiveHoursChoice:
    """The predictor's settings and where they came from."""

    half_life_days: float      # 0: no fading
    kernel: str                # "none", "circular" or "session"
    prior_strength: float      # pseudo-events of the population's hours
    how: str                   # chosen on which months, with what share; or why the defaults

    def describe(self) -> str:
        fading = "no fading" if self.half_life_days == 0 else f"half-life {self.half_life_days:g} d"
        smoothing = ("no smoothing" if self.kernel == "none"
                     else f"smoothed over neighbouring hours (features.{self.kernel}_kernel)")
        return (f"whole history ({fading}), {smoothing}, {self.prior_strength:g} pseudo-events of the "
                f"population's hours; {self.how}")


@dataclass
class ActiveHours:
    """Every asked user's predicted active hours as of ``as_of`` (local hours 0-23)."""

    as_of: datetime
    user_ids: pd.Index
    shares: np.ndarray            # (n_users, 24): predicted share of the user's engagement per hour
    top_hours: np.ndarray         # (n_users, top_k): predicted, most active first
    own_top_hours: np.ndarray     # (n_users, top_k): the user's own most frequent past hours
    n_events: np.ndarray          # (n_users,): engagement events up to T (0: the population's hours)
    population_share: np.ndarray  # (24,): the population's share of engagement per hour
    population_top: np.ndarray    # (top_k,)
    choice: ActiveHoursChoice
    events_by_kind: dict[str, int]

    def frame(self) -> pd.DataFrame:
        """One row per user: predicted hours, own most frequent past hours, events before T."""
        return pd.DataFrame({
            "user_id": np.asarray(self.user_ids, dtype=object),
            "active_hours": list(self.top_hours.astype(np.int32)),
            "own_top_hours": [row if n else None for row, n in zip(self.own_top_hours.astype(np.int32), self.n_events)],
            "events_before": self.n_events.astype(np.int64),
            "hour_shares": list(self.shares.astype(np.float32)),
        })


# --------------------------------------------------------------------------- evidence

def _kernel(name: str, cfg: Config) -> tuple[float, ...]:
    """The kernel scaled to sum to 1 over the circle, so a strength is in events."""
    raw = {"none": (1.0,), "circular": cfg.features.circular_kernel, "session": cfg.features.session_kernel}[name]
    total = raw[0] + 2.0 * sum(raw[1:])
    return tuple(v / total for v in raw)


def _sample_sql(log_: EventLog, as_of: datetime, cfg: Config) -> str:
    """A condition keeping about ``selection_max_users`` of the users (by a hash of the id)."""
    n = log_.query_df(f"""SELECT count(DISTINCT user_id) AS n FROM events
        WHERE event IN ({cfg.labels.engagement_sql()}) AND ts <= {sql_ts(as_of)}""")["n"].iloc[0]
    keep = cfg.active_hours.selection_max_users
    if n <= keep:
        return ""
    per_million = max(1, int(1_000_000 * keep / n))
    return f"AND hash(CAST(user_id AS VARCHAR)) % 1000000 < {per_million}"


def _hour_evidence(log_: EventLog, as_of: datetime, cfg: Config, half_lives: list[float],
                   sample: str = "") -> tuple[pd.Index, list[np.ndarray]]:
    """(users with engagement up to T, one (n_users, 24) array of age-weighted counts per
    half-life); a half-life of 0 gives plain counts."""
    t = sql_ts(as_of)
    sums = ", ".join(f"CAST(sum(pow(0.5, age / {hl!r})) AS DOUBLE) AS d{i}" if hl > 0 else
                     f"CAST(count(*) AS DOUBLE) AS d{i}" for i, hl in enumerate(half_lives))
    log_.con.execute(f"""
        CREATE OR REPLACE TEMP TABLE active_hours_evidence AS
        SELECT user_id, CAST(local_hour % 24 AS TINYINT) AS hour, {sums}
        FROM (SELECT user_id, local_hour, (epoch_us({t}) - epoch_us(ts)) / 86400e6 AS age FROM events_local
              WHERE event IN ({cfg.labels.engagement_sql()}) AND ts <= {t} {sample})
        GROUP BY ALL""")
    try:
        # positions instead of ids in the (user, hour) rows: a million users' ids are held once
        ids = pd.Index(log_.query_df("SELECT DISTINCT user_id FROM active_hours_evidence ORDER BY user_id")
                       ["user_id"].to_numpy(dtype=object))
        frame = log_.query_df(f"""SELECT CAST(dense_rank() OVER (ORDER BY user_id) - 1 AS INTEGER) AS pos, hour,
            {", ".join(f"d{i}" for i in range(len(half_lives)))} FROM active_hours_evidence""")
    finally:
        log_.con.execute("DROP TABLE IF EXISTS active_hours_evidence")
    rows, hours = frame["pos"].to_numpy(), frame["hour"].to_numpy()
    out = []
    for i in range(len(half_lives)):
        values = np.zeros((len(ids), HOURS))
        values[rows, hours] = frame[f"d{i}"].to_numpy()
        out.append(values)
    return ids, out


def engagement_after(log_: EventLog, start: datetime, end: datetime, cfg: Config, sample: str = "") -> pd.DataFrame:
    """Engagement events in (start, end], counted by user and local hour (user_id, hour, n)."""
    return log_.query_df(f"""
        SELECT user_id, CAST(local_hour % 24 AS INTEGER) AS hour, count(*) AS n FROM events_local
        WHERE event IN ({cfg.labels.engagement_sql()}) AND ts > {sql_ts(start)} AND ts <= {sql_ts(end)} {sample}
        GROUP BY ALL""")


def _checked(user_ids: pd.Index, after: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row of the user, hour, events) of the rows of ``after`` whose user is in ``user_ids``."""
    rows = user_ids.get_indexer(after["user_id"])
    known = rows >= 0
    return rows[known], after["hour"].to_numpy()[known], after["n"].to_numpy()[known]


def _hits(top: np.ndarray, rows: np.ndarray, hours: np.ndarray, n: np.ndarray) -> int:
    return int(n[(top[rows] == hours[:, None]).any(axis=1)].sum())


def top_hours_hits(top: np.ndarray, user_ids: pd.Index, after: pd.DataFrame) -> tuple[int, int]:
    """(events of ``after`` in their user's ``top`` hours, events of ``after`` by ``user_ids``)."""
    rows, hours, n = _checked(user_ids, after)
    return _hits(top, rows, hours, n), int(n.sum())


def _population(counts: np.ndarray) -> np.ndarray:
    total = counts.sum(axis=0)
    return total / total.sum() if total.sum() > 0 else np.full(HOURS, 1.0 / HOURS)


def _top(values: np.ndarray, population: np.ndarray, k: int) -> np.ndarray:
    """Each row's k highest hours, ties in the population's order."""
    # a stable sort over the hours laid out in the population's order keeps that order in ties
    by_population = np.argsort(-population, kind="stable")
    return by_population[np.argsort(-values[:, by_population], axis=1, kind="stable")[:, :k]]


def _shares(smoothed: np.ndarray, population: np.ndarray, strength: float) -> np.ndarray:
    """The posterior mean share per hour: smoothed evidence plus ``strength`` pseudo-events."""
    weight = smoothed.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        shares = (smoothed + strength * population) / (weight + strength)
    # no evidence and no prior (strength 0): the population's hours
    return np.where(weight + strength > 0, shares, population)


# --------------------------------------------------------------------------- choice

def _defaults(cfg: Config, why: str) -> ActiveHoursChoice:
    ah = cfg.active_hours
    return ActiveHoursChoice(ah.default_half_life_days, ah.default_kernel, ah.default_prior_strength,
                             f"configured defaults ({why})")


def choose_active_hours(log_: EventLog, as_of: datetime, cfg: Config, top_k: int | None = None) -> ActiveHoursChoice:
    """The half-life, kernel and strength under which the hours of the next ``check_days``'
    events were most likely, over the months before T (never after T); the configured
    defaults when those months hold fewer than ``min_check_events`` checked events."""
    ah = cfg.active_hours
    k = top_k or ah.top_k
    half_lives = list(dict.fromkeys(ah.half_lives_days))
    candidates = list(itertools.product(range(len(half_lives)), ah.kernels, ah.prior_strengths))
    kernels = {name: _kernel(name, cfg) for name in ah.kernels}
    hits = np.zeros(len(candidates), dtype=np.int64)
    loglik = np.zeros(len(candidates))
    checked, months = 0, 0
    first = log_.min_ts()
    sample = _sample_sql(log_, as_of, cfg)
    for split in range(1, ah.selection_splits + 1):
        fit_at = as_of - timedelta(days=split * ah.check_days)
        if first is None or fit_at < first:
            break
        ids, evidence = _hour_evidence(log_, fit_at, cfg, half_lives + [0.0], sample)
        after = engagement_after(log_, fit_at, fit_at + timedelta(days=ah.check_days), cfg, sample)
        if not len(ids) or not len(after):
            continue
        population = _population(evidence[-1])
        rows, hours, n = _checked(ids, after)
        smoothed = {(h, name): circular_smooth(evidence[h], kernel)
                    for h in range(len(half_lives)) for name, kernel in kernels.items()}
        for c, (h, kernel, strength) in enumerate(candidates):
            shares = _shares(smoothed[h, kernel], population, strength)
            loglik[c] += float(n @ np.log(np.maximum(shares[rows, hours], 1e-12)))
            hits[c] += _hits(_top(shares, population, k), rows, hours, n)
        checked += int(n.sum())
        months += 1
    if checked < ah.min_check_events:
        return _defaults(cfg, f"{checked} events of users with history in the {ah.selection_splits} earlier "
                              f"{ah.check_days}-day checks, fewer than active_hours.min_check_events = "
                              f"{ah.min_check_events}")
    # the likelihood of the checked hours, not the top-k share itself: a proper score over
    # every hour varies less from month to month than a count of hits in three of them, so
    # the choice carries over to the month after T better (on Online Retail in London time, its
    # top 3 beat both references at 5 of 6 monthly cut-offs, against 4 of 6 when chosen on hits)
    best = int(np.argmax(loglik))
    h, kernel, strength = candidates[best]
    return ActiveHoursChoice(half_lives[h], kernel, strength,
                             f"chosen on {months} earlier {ah.check_days}-day check(s) before T (the most likely "
                             f"hours of their {checked:,} events; its top {k} held {hits[best] / checked:.3f} of them)")


# --------------------------------------------------------------------------- prediction

def _events_by_kind(log_: EventLog, as_of: datetime) -> dict[str, int]:
    rows = log_.query_df(f"SELECT event, count(*) AS n FROM events WHERE ts <= {sql_ts(as_of)} GROUP BY 1 ORDER BY 1")
    return dict(zip(rows["event"], rows["n"].astype(int)))


def predict_active_hours(log_: EventLog, as_of: datetime, cfg: Config, user_ids: pd.Index | None = None,
                         top_k: int | None = None, choice: ActiveHoursChoice | None = None) -> ActiveHours:
    """Each user's predicted active hours as of T, beside their own most frequent past
    hours and the population's; for ``user_ids`` (the population's hours for those without
    engagement up to T), else for every user with engagement up to T.

    Raises :class:`NothingToPredictError` when the log has no engagement event up to T."""
    k = top_k or cfg.active_hours.top_k
    kinds = _events_by_kind(log_, as_of)
    engagement = {e: n for e, n in kinds.items() if e in cfg.labels.engagement_events}
    if not engagement:
        seen = ", ".join(f"{e} {n:,}" for e, n in kinds.items()) or "none"
        raise NothingToPredictError(
            f"active hours: the log has no engagement event ({', '.join(cfg.labels.engagement_events)}; "
            f"labels.engagement_events) at or before {as_of}, so there is nothing to predict from "
            f"(its events up to then: {seen})")
    choice = choice or choose_active_hours(log_, as_of, cfg, k)
    ids, (evidence, counts) = _hour_evidence(log_, as_of, cfg, [choice.half_life_days, 0.0])
    population = _population(counts)
    if user_ids is not None:
        user_ids = pd.Index(user_ids)
        rows = ids.get_indexer(user_ids)
        found = rows >= 0
        evidence, counts = (np.where(found[:, None], a[np.maximum(rows, 0)], 0.0) for a in (evidence, counts))
        ids = user_ids
    shares = _shares(circular_smooth(evidence, _kernel(choice.kernel, cfg)), population, choice.prior_strength)
    return ActiveHours(as_of=as_of, user_ids=ids, shares=shares, top_hours=_top(shares, population, k),
                       own_top_hours=_top(counts, population, k), n_events=counts.sum(axis=1).round().astype(np.int64),
                       population_share=population, population_top=_top(population[None, :], population, k)[0],
                       choice=choice, events_by_kind=engagement)
