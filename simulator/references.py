"""Reference estimators of each user's best slot on simulated data: what an estimator that
knows the simulator's own generative model (which no real model knows) can recover from
the same log. ``benchmarks/quality_ceiling.py`` prints them beside the model.

Every estimator reads the whole log up to T (:func:`read_evidence`), not the model's
``features.history_days`` window: a bound that throws evidence away is not a bound.

- ``session share``: the user's busiest session hour;
- ``structural EM``: fits each user's mixture over the simulator's archetype shapes to
  their session hours and opens (a point estimate that ignores unopened sends);
- ``Bayes posterior``: the default generator inverted. Per user, a posterior over the
  latent segment and the fading of engagement from the send volume, the session and
  purchase counts day by day and the observable attribute (``segment`` where the users
  table still has it, else the ``loyalty_tier`` that leans on it); then importance
  sampling over (archetype weights, personal shift, base open rate) from the generator's
  prior, weighed by every session hour and every send's outcome at its local hour,
  weekday and weekend apart, with each send's fatigue (earlier sends in the 24 h before
  it) and the engagement the user had that day. Its predictive is the posterior mean of
  the truth's own quantity (next week's open probability per hour, with fading, the
  expected fatigue of the user's send rate and the 0.95 cap), and its best slot is that
  mean's argmax, the Bayes act for slot capture.

What each one knows and ignores is data (:data:`REFERENCES`, :func:`bayes_ignores`), so
the benchmark can say which rows are bounds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta

import numpy as np
import pandas as pd
from scipy import sparse

from configs import Config
from features.attribution import attributed_sends_sql
from features.events import EventLog
from simulator import generate
from simulator.generate import ARCHETYPES, GENERIC_SESSION_SHAPE, RHYTHM_FLOOR, SEGMENT_OPENS, SEGMENT_SHARE, rhythms, von_mises

__all__ = ["BayesPosterior", "Evidence", "GeneratorPriors", "REFERENCES", "Reference", "archetype_shapes",
           "bayes_ignores", "bayes_posterior", "generator_priors", "read_evidence", "structural_em"]

# an open comes within hours of its send in the default generator (exponential, 40 min
# mean): a send this old has its answer in the log with probability 1 - e^-9
_ANSWERED_AFTER = timedelta(hours=6)
_LOG_ZERO = -40.0          # log of an engagement the generator sets to exactly 0


# --------------------------------------------------------------------------- labels

@dataclass(frozen=True)
class Reference:
    """One row of the ceiling table: what the estimator knows and what it leaves out."""

    name: str
    kind: str                      # "bound", "reference" or "oracle-informed"
    knows: str
    ignores: tuple[str, ...] = ()


REFERENCES: dict[str, Reference] = {
    "session share": Reference(
        "session share", "reference", "each user's session hours over the whole log",
        ("sends and opens", "the generator's shapes and priors", "weekday/weekend", "fading", "fatigue",
         "attributes")),
    "structural EM": Reference(
        "structural EM", "reference",
        "the simulator's archetype shapes and Dirichlet prior; session hours and opened sends' hours",
        ("unopened sends", "weekday/weekend", "personal shifts", "base open rates", "fading", "fatigue",
         "attributes", "probabilities (a slot ranking only)")),
    "Bayes posterior": Reference(
        "Bayes posterior", "bound",
        "the default generator's whole model and priors: every session hour and day, every send's "
        "outcome at its local hour with its fatigue and that day's engagement, send volume, purchases, "
        "the observable attribute",
        ()),
    "true dominant archetype": Reference(
        "true dominant archetype", "oracle-informed", "each user's main archetype, read from truth.parquet",
        ("everything else: not an estimator",)),
}

# settings of [simulate] the inversion does not model, with what it then ignores; each is
# off in the default setting (configs/harder_setting.toml turns them on)
_UNMODELLED = (
    ("rhythm_drift_hours_per_30_days", "drifting rhythms"),
    ("rhythm_switch_share", "archetype switches"),
    ("late_open_share", "late opens"),
    ("purchase_per_open", "purchases caused by opens"),
    ("winback_share", "win-back after dormancy"),
)


def bayes_ignores(cfg: Config) -> tuple[str, ...]:
    """What the Bayes posterior ignores of the generator ``cfg.simulate`` describes: empty
    for the default setting (then its row is a bound), else the mechanisms it leaves out."""
    sim = cfg.simulate
    out = [what for name, what in _UNMODELLED if getattr(sim, name, 0)]
    channels = getattr(sim, "channels", None) or {}
    factors = {(c.open_factor, c.open_delay_minutes) for c in channels.values()}
    if len(factors) > 1:
        out.append("per-channel open rates and delays")
    if getattr(sim, "unsubscribe_per_channel", False):
        out.append("per-channel unsubscribes")
    if sim.sender != "house":
        out.append("the logged sender's rules")
    return tuple(out)


# --------------------------------------------------------------------------- the generator's priors

@dataclass(frozen=True)
class GeneratorPriors:
    """What the inversion assumes: the default generator's priors and its [simulate] numbers."""

    segment_names: tuple[str, ...]
    segment_share: np.ndarray
    segment_opens: np.ndarray        # x base_open_rate
    segment_sends_per_day: np.ndarray  # first-round send rate per segment
    send_rate_floor: float
    segment_sessions: np.ndarray     # x sessions_per_day
    tiers: tuple[str, ...]
    tier_given_segment: np.ndarray | None   # (segments, tiers) or None where the generator has none
    extra_round: float               # the second daily send round, x the send rate
    dormant: float                   # engagement below this is none
    base_open_rate: float
    sessions_per_day: float
    purchase_per_session: float
    fade_share: float
    fade_days_mean: float
    fatigue_per_recent_send: float
    session_rhythm_share: float
    sender_timezone: str


def generator_priors(cfg: Config) -> GeneratorPriors:
    sim = cfg.simulate
    extra = float(generate.EXTRA_ROUND)
    weekly = tuple(getattr(sim, "segment_sends_per_week", ()) or ())
    if weekly:
        per_day, floor = np.asarray(weekly, dtype=float) / 7 / (1 + extra), 0.0
    else:
        per_day, floor = sim.send_rate * np.asarray(generate.SEGMENT_SENDS, dtype=float), 0.02
    tiers = tuple(str(t) for t in generate.TIERS)
    tier_given = np.asarray(generate.TIER_GIVEN_SEGMENT, dtype=float)
    return GeneratorPriors(
        segment_names=tuple(str(s) for s in generate.SEGMENTS),
        segment_share=np.asarray(SEGMENT_SHARE, dtype=float),
        segment_opens=np.asarray(SEGMENT_OPENS, dtype=float),
        segment_sends_per_day=per_day, send_rate_floor=floor,
        segment_sessions=np.asarray(generate.SEGMENT_SESSIONS, dtype=float),
        tiers=tiers, tier_given_segment=tier_given,
        extra_round=extra, dormant=float(generate.DORMANT),
        base_open_rate=sim.base_open_rate, sessions_per_day=sim.sessions_per_day,
        purchase_per_session=sim.purchase_per_session, fade_share=sim.fade_share,
        fade_days_mean=sim.fade_days_mean, fatigue_per_recent_send=sim.fatigue_per_recent_send,
        session_rhythm_share=sim.session_rhythm_share, sender_timezone=sim.sender_timezone)


# --------------------------------------------------------------------------- evidence

@dataclass
class Evidence:
    """Everything the log says about each user up to ``as_of``, from its first day on.

    Days count from ``start`` (the log's first UTC midnight): sessions by the user's local
    date, sends by the sender's local date, as the generator counts its days.
    """

    user_ids: pd.Index
    start: datetime
    as_of: datetime
    days: int
    first_day: np.ndarray            # (n,) the day each user could first be active (signup)
    sessions: np.ndarray             # (n, 2 [weekday, weekend], 24 local hours)
    sessions_by_day: np.ndarray      # (n, days)
    purchases: np.ndarray            # (n,)
    send_days: np.ndarray            # (n, 3): the user's days with 0, 1, 2+ sends while reachable
    unsubscribed: np.ndarray         # (n,) bool, at as_of
    # every answered send: its user's row, day (float), weekend flag, local hour, earlier
    # sends in the 24 h before it (0-2, the generator's fatigue count) and the outcome
    send_user: np.ndarray
    send_day: np.ndarray
    send_weekend: np.ndarray
    send_hour: np.ndarray
    send_recent: np.ndarray
    send_opened: np.ndarray
    attribute: np.ndarray            # (n,) code of the observable attribute (-1: unknown)
    attribute_kind: str              # "segment", "loyalty_tier" or ""

    def __len__(self) -> int:
        return len(self.user_ids)

    def by_hour(self, opened_only: bool) -> np.ndarray:
        """(n, 2, 24) answered sends (or opened ones) by day type and local hour."""
        out = np.zeros((len(self), 2, 24))
        keep = self.send_opened if opened_only else np.ones(len(self.send_user), dtype=bool)
        np.add.at(out, (self.send_user[keep], self.send_weekend[keep], self.send_hour[keep]), 1.0)
        return out


def _ts(value: datetime) -> str:
    return f"TIMESTAMP '{pd.Timestamp(value).isoformat(sep=' ')}'"


def read_evidence(log: EventLog, as_of: datetime, cfg: Config, user_ids: pd.Index,
                  priors: GeneratorPriors | None = None) -> Evidence:
    """Each of ``user_ids``'s evidence from every event up to ``as_of``, of any age."""
    priors = priors or generator_priors(cfg)
    ids = pd.Index(np.asarray(user_ids, dtype=object))
    n = len(ids)
    as_of = pd.Timestamp(as_of)
    as_of = as_of.tz_convert("UTC").tz_localize(None) if as_of.tzinfo is not None else as_of
    start = pd.Timestamp(log.min_ts()).normalize()
    days = int(math.ceil((as_of - start) / pd.Timedelta(days=1)))
    t = _ts(as_of)

    def rows(frame: pd.DataFrame) -> np.ndarray:
        return ids.get_indexer(frame["user_id"].to_numpy(dtype=object))

    users = log.query_df("SELECT * FROM users")
    users = users.set_index("user_id").reindex(ids)
    first_day = np.zeros(n, dtype=int)
    if "signup_ts" in users:
        signup = pd.to_datetime(users["signup_ts"], utc=True).dt.tz_localize(None)
        later = ((signup - start) / pd.Timedelta(days=1)).to_numpy(dtype=float)
        first_day = np.where(np.isfinite(later) & (later > 0), np.floor(np.nan_to_num(later)), 0).astype(int)
    attribute, kind = np.full(n, -1), ""
    for column, names in (("segment", priors.segment_names), ("loyalty_tier", priors.tiers)):
        if column in users and names and (column == "segment" or priors.tier_given_segment is not None):
            attribute = pd.Index(names).get_indexer(users[column].astype(object).to_numpy())
            kind = column
            break

    sessions = np.zeros((n, 2, 24))
    frame = log.query_df(f"""SELECT user_id, CAST(local_dow >= 5 AS INTEGER) AS we, local_hour AS h, count(*) AS k
        FROM events_local WHERE event = 'session' AND ts <= {t} GROUP BY ALL""")
    r = rows(frame)
    ok = r >= 0
    np.add.at(sessions, (r[ok], frame["we"].to_numpy()[ok], frame["h"].to_numpy()[ok]), frame["k"].to_numpy()[ok])

    by_day = np.zeros((n, days))
    frame = log.query_df(f"""SELECT user_id, date_diff('day', DATE '{start.date()}', CAST(local_ts AS DATE)) AS d,
               count(*) AS k
        FROM events_local WHERE event = 'session' AND ts <= {t} GROUP BY ALL""")
    r, d = rows(frame), frame["d"].to_numpy()
    ok = (r >= 0) & (d >= 0) & (d < days)
    np.add.at(by_day, (r[ok], d[ok]), frame["k"].to_numpy()[ok])

    purchases = np.zeros(n)
    frame = log.query_df(f"SELECT user_id, count(*) AS k FROM events WHERE event = 'purchase' AND ts <= {t} GROUP BY 1")
    r = rows(frame)
    purchases[r[r >= 0]] = frame["k"].to_numpy()[r >= 0]

    unsub_day = np.full(n, np.inf)
    frame = log.query_df(f"SELECT user_id, min(ts) AS ts FROM events WHERE event = 'unsubscribe' AND ts <= {t} GROUP BY 1")
    r = rows(frame)
    unsub_day[r[r >= 0]] = ((pd.to_datetime(frame["ts"]) - start) / pd.Timedelta(days=1)).to_numpy()[r >= 0]

    sql = attributed_sends_sql(start - timedelta(days=1), as_of, as_of, cfg.labels.open_attribution_hours,
                               "hour_of_day")
    sends = log.query_df(f"SELECT user_id, ts, local_hour, local_dow, opened FROM ({sql}) ORDER BY user_id, ts")
    user = rows(sends)
    ts = pd.to_datetime(sends["ts"])
    day = ((ts - start) / pd.Timedelta(days=1)).to_numpy(dtype=float)
    # the generator's fatigue counts the user's last two sends if they came in the 24 h before
    recent = np.zeros(len(user), dtype=int)
    for lag in (1, 2):
        if len(user) > lag:
            recent[lag:] += (user[lag:] == user[:-lag]) & (day[lag:] - day[:-lag] < 1.0)
    # send volume: days (the sender's local dates) with 0, 1 or 2+ sends while reachable
    sender_day = ((ts.dt.tz_localize("UTC").dt.tz_convert(priors.sender_timezone).dt.tz_localize(None).dt.normalize()
                   - start) / pd.Timedelta(days=1)).to_numpy().round().astype(int)
    send_days = np.zeros((n, 3))
    counted = pd.DataFrame({"u": user, "d": sender_day})[(user >= 0) & (sender_day < days)].value_counts()
    per_user = pd.DataFrame({"u": counted.index.get_level_values(0), "k": np.minimum(counted.to_numpy(), 2)})
    for k in (1, 2):
        hit = per_user[per_user["k"] == k]["u"].value_counts()
        send_days[hit.index.to_numpy(), k] = hit.to_numpy()
    last = np.minimum(np.floor(unsub_day), days - 1)
    send_days[:, 0] = np.maximum(last - first_day + 1 - send_days[:, 1] - send_days[:, 2], 0)

    answered = (user >= 0) & (ts <= as_of - _ANSWERED_AFTER).to_numpy()
    return Evidence(
        user_ids=ids, start=start.to_pydatetime(), as_of=as_of.to_pydatetime(), days=days, first_day=first_day,
        sessions=sessions, sessions_by_day=by_day, purchases=purchases, send_days=send_days,
        unsubscribed=np.isfinite(unsub_day),
        send_user=user[answered], send_day=day[answered],
        send_weekend=(sends["local_dow"].to_numpy()[answered] >= 5).astype(int),
        send_hour=sends["local_hour"].to_numpy()[answered].astype(int), send_recent=recent[answered],
        send_opened=sends["opened"].to_numpy(dtype=bool)[answered],
        attribute=attribute, attribute_kind=kind)


# --------------------------------------------------------------------------- structural EM

def archetype_shapes() -> np.ndarray:
    hours = np.arange(24.0)
    return np.array([5 / 7 * von_mises(hours, wd, k) + 2 / 7 * von_mises(hours, we, 0.7 * k)
                     for _, wd, we, k in ARCHETYPES])


def structural_em(sessions: np.ndarray, opened: np.ndarray, rhythm_share: float,
                  iterations: int = 60) -> np.ndarray:
    """Per-user archetype weights (MAP, Dirichlet(0.35) prior) -> rhythm per hour."""
    shapes = archetype_shapes()
    generic = GENERIC_SESSION_SHAPE / GENERIC_SESSION_SHAPE.sum()
    w = np.full((len(sessions), len(shapes)), 1.0 / len(shapes))
    for _ in range(iterations):
        mix = RHYTHM_FLOOR + w @ shapes
        p_session = rhythm_share * mix / mix.sum(axis=1, keepdims=True) + (1 - rhythm_share) * generic
        part = rhythm_share * (w[:, :, None] * shapes[None]) / mix.sum(axis=1)[:, None, None]
        from_sessions = (sessions[:, None, :] * part / p_session[:, None, :]).sum(axis=2)
        from_opens = (opened[:, None, :] * (w[:, :, None] * shapes[None]) / mix[:, None, :]).sum(axis=2)
        w = np.clip(from_sessions + from_opens + 0.35 - 1 + 1e-3, 1e-3, None)
        w /= w.sum(axis=1, keepdims=True)
    return RHYTHM_FLOOR + w @ shapes


# --------------------------------------------------------------------------- Bayes posterior

@dataclass
class BayesPosterior:
    """Per user: the posterior mean of next week's open probability per local hour (the
    truth's quantity), and what the first stage inferred."""

    predictive: np.ndarray           # (n, 24)
    segment: np.ndarray              # (n, segments) posterior of the latent segment
    engagement_now: np.ndarray       # (n,) posterior mean engagement over the next week

    @property
    def best_slot(self) -> np.ndarray:
        return self.predictive.argmax(axis=1)


def _logsumexp(a: np.ndarray, axis: int) -> np.ndarray:
    m = a.max(axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    return np.squeeze(m, axis=axis) + np.log(np.exp(a - m).sum(axis=axis))


def _lognormal_nodes(sd: float, k: int) -> np.ndarray:
    """Equal-mass nodes of lognormal(0, sd)."""
    from scipy.stats import norm

    return np.exp(sd * norm.ppf((np.arange(k) + 0.5) / k))


def _beta_log_weight(grid: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """(segments, grid) log prior of each base open rate on a geometric grid (density x
    spacing): the generator's Beta(4, 4 (1 - m) / m) with m the segment's mean."""
    from scipy.stats import beta

    m = np.clip(mean, 0.01, 0.6)[:, None]
    density = beta.pdf(grid[None, :], 4.0, 4.0 * (1 - m) / m)
    return np.log(density * grid[None, :] + 1e-300)


def _fade_states(days: int, priors: GeneratorPriors, horizon: int = 7,
                 step: float = 1.5, n_tau: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """(log prior (J,), engagement (J, days + horizon) at each day's middle) of the fading
    states: state 0 is "no fading before the truth's week is over" (users who never fade,
    and those whose fading starts later); the rest a grid over (start, time constant) of
    the generator's uniform start in (-20, days + 60) and 2 + exponential time constant."""
    lo, hi = -20.0, days + 60.0
    end = days + horizon - 0.5                       # the last day the truth looks at
    starts = np.arange(lo + step / 2, end, step)
    taus = 2.0 + priors.fade_days_mean * -np.log1p(-(np.arange(n_tau) + 0.5) / n_tau)
    x = np.arange(days + horizon) + 0.5
    f, tau = np.repeat(starts, n_tau), np.tile(taus, len(starts))
    e = np.exp(-np.maximum(x[None, :] - f[:, None], 0.0) / tau[:, None])
    e = np.where(e < priors.dormant, 0.0, e)
    fading = priors.fade_share * step / (hi - lo) / n_tau
    log_prior = np.r_[np.log(1 - fading * len(f)), np.full(len(f), np.log(fading))]
    return log_prior, np.vstack([np.ones(len(x)), e])


def _first_stage(ev: Evidence, priors: GeneratorPriors, chunk: int = 500):
    """Posteriors of the latent segment and of fading, and the send rate's posterior mean.

    The segment's leaves out the send outcomes, which the second stage weighs through the
    base open rate. Fading's uses the sessions day by day and the send outcomes day by day,
    the latter with a per-user open rate ``c`` on a grid in place of base rate x rhythm
    (the approximation: the hour of a send is ignored here)."""
    n, days = len(ev), ev.days
    n_seg = len(priors.segment_share)
    # send volume: each reachable day one send with probability r, a second with x r
    rate = priors.segment_sends_per_day[:, None] * _lognormal_nodes(0.15, 16)[None, :]
    rate = np.clip(rate, max(priors.send_rate_floor, 1e-6), 1.0)                 # (S, G)
    x = priors.extra_round
    p_day = np.stack([(1 - rate) * (1 - x * rate), rate * (1 - x * rate) + (1 - rate) * x * rate,
                      x * rate ** 2])                                            # (3, S, G)
    ll_rate = np.einsum("nk,ksg->nsg", ev.send_days, np.log(np.maximum(p_day, 1e-300)))
    ll_send = _logsumexp(ll_rate, axis=2) - np.log(rate.shape[1])                 # (n, S)
    w_rate = np.exp(ll_rate - ll_rate.max(axis=2, keepdims=True))
    rate_given_segment = (w_rate * rate[None]).sum(axis=2) / w_rate.sum(axis=2)   # (n, S)
    # purchases: each session leads to one with the segment's probability
    q = priors.purchase_per_session * priors.segment_opens
    total = ev.sessions_by_day.sum(axis=1)
    ll_buy = ev.purchases[:, None] * np.log(q)[None, :] + (total - ev.purchases)[:, None] * np.log1p(-q)[None, :]
    # the observable attribute
    ll_attr = np.zeros((n, n_seg))
    known = ev.attribute >= 0
    if ev.attribute_kind == "segment":
        ll_attr[known] = np.where(np.arange(n_seg)[None, :] == ev.attribute[known, None], 0.0, -np.inf)
    elif ev.attribute_kind == "loyalty_tier":
        ll_attr[known] = np.log(priors.tier_given_segment.T[ev.attribute[known]])
    base = np.log(priors.segment_share)[None, :] + ll_send + ll_buy + ll_attr      # (n, S)
    # sessions day by day: Poisson(activity x engagement) from the user's first day; the
    # log's first and last local days are cut by T or the start in some zones, so left out
    log_prior_j, e = _fade_states(days, priors)
    e_past = e[:, :days]
    log_e = np.where(e_past > 0, np.log(np.maximum(e_past, 1e-300)), _LOG_ZERO)   # (J, D)
    whole = e_past.copy()
    whole[:, [0, days - 1]] = 0.0
    after = np.cumsum(whole[:, ::-1], axis=1)[:, ::-1]                             # sum from day d on
    after = np.hstack([after, np.zeros((len(after), 1))])
    activity = priors.sessions_per_day * priors.segment_sessions[:, None] * _lognormal_nodes(0.4, 12)[None, :]
    # send outcomes by day and fatigue (0-2 earlier sends in the 24 h before)
    fatigue = 1.0 - priors.fatigue_per_recent_send
    day = np.clip(np.floor(ev.send_day).astype(int), 0, days - 1)
    sent = np.zeros((3, n, days))
    opened = np.zeros((3, n, days))
    np.add.at(sent, (ev.send_recent, ev.send_user, day), 1.0)
    np.add.at(opened, (ev.send_recent, ev.send_user, day), ev.send_opened.astype(float))
    c_grid = 0.6 * 0.7 ** np.arange(12)
    log_c_prior = _beta_log_weight(c_grid, priors.base_open_rate * priors.segment_opens)   # (S, C)
    log_c_prior -= _logsumexp(log_c_prior, axis=1)[:, None]
    # log P(no open) of each (grid point, fatigue) at each state and day: (C, 3, D, J)
    log_miss = np.log1p(-np.minimum(c_grid[:, None, None, None] * fatigue ** np.arange(3)[None, :, None, None]
                                    * e_past.T[None, None], 0.95))
    segment = np.zeros((n, n_seg))
    e_fade = np.zeros((n, e.shape[1]))
    for s0 in range(0, n, chunk):
        part = slice(s0, min(n, s0 + chunk))
        counts = ev.sessions_by_day[part].copy()
        counts[:, [0, days - 1]] = 0.0
        daily = counts @ log_e.T                                                   # (u, J)
        exposure = after[:, np.minimum(ev.first_day[part], days)].T                # (u, J)
        c = counts.sum(axis=1)[:, None, None]
        ll_sess = np.stack([
            _logsumexp(c * np.log(a)[None, None, :] - exposure[:, :, None] * a[None, None, :], axis=2)
            - np.log(len(a)) for a in activity], axis=1)                          # (u, S, J)
        hit = opened[:, part]                                                      # (3, u, D)
        miss = sent[:, part] - hit
        ll_hit = hit.sum(axis=0) @ log_e.T + (hit.sum(axis=2) * np.arange(3)[:, None]).sum(axis=0)[:, None] * \
            np.log(fatigue)                                                        # (u, J)
        ll_c = np.stack([hit.sum(axis=(0, 2))[:, None] * np.log(cv) + ll_hit
                         + sum(miss[k] @ log_miss[i, k] for k in range(3))
                         for i, cv in enumerate(c_grid)], axis=1)                 # (u, C, J)
        ll_out = _logsumexp(ll_c[:, None, :, :] + log_c_prior[None, :, :, None], axis=2)   # (u, S, J)
        joint = base[part, :, None] + ll_sess + daily[:, None, :] + log_prior_j[None, None, :]
        w = np.exp(joint - joint.max(axis=(1, 2), keepdims=True))
        segment[part] = w.sum(axis=2) / w.sum(axis=(1, 2))[:, None]
        joint += ll_out
        w = np.exp(joint - joint.max(axis=(1, 2), keepdims=True))
        w /= w.sum(axis=(1, 2), keepdims=True)
        e_fade[part] = w.sum(axis=1) @ e
    send_rate = (segment * rate_given_segment).sum(axis=1)
    return segment, e_fade, send_rate


# allowed shifts along the base-rate grid for a send's attenuation (fatigue x engagement):
# every step near 1, coarser where engagement has faded (those sends say little)
_LEVELS = np.array([0, 1, 2, 3, 4, 5, 6, 8, 10, 12, 15, 18, 22])


def bayes_posterior(ev: Evidence, priors: GeneratorPriors, draws: int = 4000, seed: int = 0,
                    chunk: int = 250) -> BayesPosterior:
    """The generator inverted (see the module's docstring). Approximations: fading enters
    the send outcomes as its posterior mean on each day (from the sessions), rounded with
    the fatigue to a step of the base-rate grid; the archetype mix and shift are
    importance-sampled from ``draws`` prior draws; the base rate is on a grid."""
    n = len(ev)
    segment, e_fade, send_rate = _first_stage(ev, priors)
    # a geometric grid of base open rates whose step is the generator's fatigue factor, so
    # that a send's attenuation is a shift along it
    ratio = 0.85
    b_grid = 0.65 * ratio ** np.arange(30)
    n_b = len(b_grid)
    b_ext = 0.65 * ratio ** np.arange(n_b + _LEVELS[-1])
    fatigue = 1.0 - priors.fatigue_per_recent_send
    day = np.clip(np.floor(ev.send_day).astype(int), 0, ev.days - 1)
    e_send = e_fade[ev.send_user, day]
    attenuation = np.log(fatigue) * ev.send_recent + np.log(np.maximum(e_send, 1e-12))
    steps = attenuation / np.log(ratio)
    level = _LEVELS[np.abs(steps[:, None] - _LEVELS[None, :]).argmin(axis=1)]
    useful = (e_send > 0) | ev.send_opened                 # an unopened send of a dormant day says nothing
    u, lv = ev.send_user[useful], level[useful]
    # outcome and local hour as one of 96 columns: opened x (weekend x 24 + hour)
    col = (~ev.send_opened[useful]) * 48 + ev.send_weekend[useful] * 24 + ev.send_hour[useful]
    user_levels = np.zeros(n, dtype=int)
    np.maximum.at(user_levels, u, lv)

    rng = np.random.default_rng(seed)
    weights = rng.dirichlet(np.full(len(ARCHETYPES), 0.35), size=draws)
    rhythm = rhythms(weights, rng.normal(0.0, 0.5, size=draws))                  # (M, 2, 24), mean 1
    generic = GENERIC_SESSION_SHAPE / GENERIC_SESSION_SHAPE.sum()
    share = priors.session_rhythm_share
    session_p = share * rhythm / rhythm.sum(axis=2, keepdims=True) + (1 - share) * generic
    log_session = np.log(session_p).reshape(draws, 48).T.astype(np.float32)       # (48, M)
    r = rhythm.reshape(draws, 48)                                                 # (M, 48)
    # (96, (B + L) x M): log P(open), then log P(no open), at each extended grid point and draw
    p_ext = np.minimum(b_ext[:, None, None] * r[None], 0.95).transpose(2, 0, 1).reshape(48, -1)
    table = np.vstack([np.log(p_ext), np.log1p(-p_ext)]).astype(np.float32)
    del p_ext
    log_b_prior = np.log(np.maximum(segment @ np.exp(_beta_log_weight(
        b_grid, priors.base_open_rate * priors.segment_opens)), 1e-300))          # (n, B)
    # next week: engagement and day types of the truth's seven days, and the fatigue the
    # truth expects of the user's send rate
    horizon = e_fade[:, ev.days:ev.days + 7]
    weekend = np.array([(pd.Timestamp(ev.start) + pd.Timedelta(days=ev.days + k)).dayofweek >= 5
                        for k in range(7)])
    scale = np.stack([horizon[:, ~weekend].mean(axis=1), horizon[:, weekend].mean(axis=1)], axis=1)
    scale *= (1.0 - send_rate * priors.fatigue_per_recent_send)[:, None]           # (n, 2)
    n_days = np.array([(~weekend).sum(), weekend.sum()])
    # the few (grid point x draw, hour) where b R passes the 0.95 cap, for its correction
    product = (b_grid[:, None, None] * r[None]).reshape(n_b * draws, 48)
    over_row, over_col = np.nonzero(product > 0.95)
    over_value = product[over_row, over_col]

    predictive = np.zeros((n, 24))
    order = np.argsort(user_levels, kind="stable")      # chunks of users with few attenuation levels
    send_order = np.argsort(u, kind="stable")
    bounds = np.searchsorted(u[send_order], np.arange(n + 1))
    for s0 in range(0, n, chunk):
        rows = order[s0:s0 + chunk]
        m = len(rows)
        local = np.full(n, -1)
        local[rows] = np.arange(m)
        idx = np.concatenate([send_order[bounds[i]:bounds[i + 1]] for i in rows])
        ll = np.zeros((m, n_b * draws), dtype=np.float32)
        for lvl in np.unique(lv[idx]):
            at = idx[lv[idx] == lvl]
            counts = np.zeros((m, 96), dtype=np.float32)
            np.add.at(counts, (local[u[at]], col[at]), 1.0)
            ll += counts @ table[:, lvl * draws:(lvl + n_b) * draws]
        ll = ll.reshape(m, n_b, draws)
        ll += (ev.sessions[rows].reshape(m, 48).astype(np.float32) @ log_session)[:, None, :]
        ll += log_b_prior[rows][:, :, None].astype(np.float32)
        ll -= ll.max(axis=(1, 2), keepdims=True)
        w = np.exp(ll, out=ll)
        w /= w.sum(axis=(1, 2), keepdims=True)
        mean_br = (w * b_grid[None, :, None]).sum(axis=1) @ r                      # (m, 48) E[b R]
        w = w.reshape(m, -1)
        # E[min(s b R, 0.95)] = s (E[b R] - E[max(b R - 0.95 / s, 0)]), users by 1 % steps of the cap
        cap = 0.95 / np.maximum(scale[rows], 1e-9)                                 # (m, 2)
        log_cap = np.round(np.log(cap) / 0.01) * 0.01
        for dt in (0, 1):
            for c in np.unique(log_cap[:, dt]):
                hit = (over_col // 24 == dt) & (over_value > math.exp(c))
                if not hit.any():
                    continue
                who = np.flatnonzero(log_cap[:, dt] == c)
                excess = sparse.csc_matrix((over_value[hit] - math.exp(c), (over_col[hit] % 24, over_row[hit])),
                                           shape=(24, n_b * draws))
                mean_br[who, dt * 24:(dt + 1) * 24] -= (excess @ w[who].T).T
        for dt in (0, 1):
            predictive[rows] += (n_days[dt] / 7) * scale[rows, dt][:, None] * mean_br[:, dt * 24:(dt + 1) * 24]
    predictive[ev.unsubscribed] = 0.0
    return BayesPosterior(predictive=predictive, segment=segment, engagement_now=horizon.mean(axis=1))
