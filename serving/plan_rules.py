"""The campaign rules of a send plan: which send times of a window each user may get.

A window offers each time zone a list of candidate send times (every local hour that
starts inside it, and the window start itself); every user of a zone shares that list.
The rules of ``[plan]`` then strike candidates per user, from what the event log says
about them (:class:`PlanHistory`): quiet hours, sends per local day, the new-user cap,
the silence after consecutive unopened sends, the degraded weekly cap and the mass-send
quota. When nothing is left the user's reason names the rule that struck the last
candidates, the rules taken in the order quiet hours, frequency caps, silence, quota
(so a window that lies wholly in a user's night says ``quiet_hours``, and a user whose
quota is spent says ``quota`` unless an earlier rule had already struck everything).

Rules look at the logged sends before each candidate time; a log that reaches into the
window also counts toward the local days it touches.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np
import pandas as pd

from configs import Config
from features.attribution import attributed_sends_sql
from features.events import EventLog
from features.state import NONE_EARLY, FeatureState

__all__ = [
    "PLAN_SENDS_FILE",
    "PLAN_USERS_FILE",
    "read_history",
    "RULE_ORDER",
    "Candidates",
    "PlanHistory",
    "RuleCheck",
    "check_rules",
    "copy_history_sends",
    "history_from_state",
    "load_history",
    "quiet_hours",
    "window_candidates",
]

# the order rules strike candidates in; the last to strike a user's candidates is the reason
RULE_ORDER = ("quiet_hours", "frequency_cap", "silenced", "quota")
_DAY = 86400
_KEY = np.int64(1) << 32  # user index x 2^32 + seconds or days: one sortable int64 key


def quiet_hours(cfg: Config) -> np.ndarray:
    """(24,) True for the local hours inside the quiet window (the config says which)."""
    return np.asarray(cfg.plan.quiet_hours(), dtype=bool)


def _utc(value: datetime) -> datetime:
    return (
        value.replace(tzinfo=timezone.utc)
        if value.tzinfo is None
        else value.astimezone(timezone.utc)
    )


@dataclass(frozen=True)
class Candidates:
    """The candidate send times of a window, per time zone (rows), padded to one width.

    ``seconds``: UTC epoch seconds; ``bucket``: the hour of the window the time falls in
    (capacity is per such hour); ``slot``: the local slot; ``hour``: the local hour;
    ``day``/``month``: the local calendar day (days since 1970-01-01) and month (year * 12
    + month - 1); ``valid``: False in the padding.
    """

    zones: tuple[str, ...]
    start: datetime
    hours: int
    seconds: np.ndarray
    bucket: np.ndarray
    slot: np.ndarray
    hour: np.ndarray
    day: np.ndarray
    month: np.ndarray
    valid: np.ndarray

    @property
    def width(self) -> int:
        return self.seconds.shape[1]

    def bucket_starts(self) -> pd.DatetimeIndex:
        return pd.date_range(pd.Timestamp(self.start), periods=self.hours, freq="h")


def window_candidates(zones: list[str], start: datetime, hours: int, slot_kind: str) -> Candidates:
    """Every local hour that starts inside [start, start + hours) in each zone, and the
    window start itself; half-hour and 45-minute zones are handled (15-minute steps)."""
    start = _utc(start).replace(microsecond=0)
    first = pd.Timestamp(start)
    # the window start, then every quarter hour after it: local hours start on a quarter
    # hour in every zone, whatever minute the window starts at
    after = pd.date_range(first.ceil("15min"), first + pd.Timedelta(hours=hours), freq="15min",
                          inclusive="left")
    steps = after if len(after) and after[0] == first else pd.DatetimeIndex([first]).append(after)
    rows = []
    for zone in zones:
        local = steps.tz_convert(ZoneInfo(zone))
        keep = (local.minute == 0) & (local.second == 0)
        keep[0] = True
        times, loc = steps[keep], local[keep]
        slot = loc.hour if slot_kind == "hour_of_day" else loc.dayofweek * 24 + loc.hour
        naive = loc.tz_localize(None)
        rows.append(
            (
                times.as_unit("s").asi8,
                np.asarray(slot),
                np.asarray(loc.hour),
                np.asarray(naive.normalize().as_unit("s").asi8 // _DAY),
                np.asarray(naive.year * 12 + naive.month - 1),
            )
        )
    width = max(len(r[0]) for r in rows)
    out = {
        k: np.zeros((len(zones), width), dtype=np.int64)
        for k in ("s", "slot", "hour", "day", "month")
    }
    valid = np.zeros((len(zones), width), dtype=bool)
    for z, row in enumerate(rows):
        m = len(row[0])
        for key, values in zip(("s", "slot", "hour", "day", "month"), row):
            out[key][z, :m] = values
        valid[z, :m] = True
    t0 = int(pd.Timestamp(start).value // 10**9)
    bucket = np.clip((out["s"] - t0) // 3600, 0, hours - 1)
    return Candidates(
        zones=tuple(zones),
        start=start,
        hours=hours,
        seconds=out["s"],
        bucket=bucket,
        slot=out["slot"],
        hour=out["hour"],
        day=out["day"],
        month=out["month"],
        valid=valid,
    )


@dataclass
class PlanHistory:
    """What the rules need from the event log, for any set of users.

    ``users``: user_id, ``first_seen`` (signup_ts, else the first event; naive UTC),
    ``consecutive_unopened`` (sends since the last opened one), ``last_send``.
    ``sends``: user_id, ts (naive UTC), channel: the sends near the window.
    Users absent from ``users`` have no history (no streak, not new).
    """

    users: pd.DataFrame = field(
        default_factory=lambda: pd.DataFrame(
            {
                "user_id": pd.Series(dtype=object),
                "first_seen": pd.Series(dtype="datetime64[us]"),
                "consecutive_unopened": pd.Series(dtype="int64"),
                "last_send": pd.Series(dtype="datetime64[us]"),
            }
        )
    )
    sends: pd.DataFrame = field(
        default_factory=lambda: pd.DataFrame(
            {
                "user_id": pd.Series(dtype=object),
                "ts": pd.Series(dtype="datetime64[us]"),
                "channel": pd.Series(dtype=object),
            }
        )
    )

    @classmethod
    def empty(cls) -> "PlanHistory":
        return cls()


def _ts_sql(value: datetime) -> str:
    return f"TIMESTAMP '{value.replace(tzinfo=None).isoformat(sep=' ')}'"


def history_lookback_days(cfg: Config) -> float:
    """How far before the window the logged sends matter (weekly cap, new users, quota)."""
    plan = cfg.plan
    days = max(plan.degraded_days, plan.new_user_days, 1.0)
    if plan.quota_per_month:
        days = max(days, 32.0)
    return days + 1.0


# the rules' history as of a refresh, written beside its snapshot for POST /plan
PLAN_USERS_FILE = "plan_users.parquet"
PLAN_SENDS_FILE = "plan_sends.parquet"


def read_history(folder: Path) -> PlanHistory | None:
    """The history a refresh wrote (None for a refresh written before it existed)."""
    users, sends = Path(folder) / PLAN_USERS_FILE, Path(folder) / PLAN_SENDS_FILE
    if not users.exists() or not sends.exists():
        return None
    return PlanHistory(users=pd.read_parquet(users), sends=pd.read_parquet(sends))


def load_history(
    log: EventLog, window_start: datetime, window_hours: int, cfg: Config
) -> PlanHistory:
    """The rules' view of every user in the log, as of the window start.

    The streak counts sends since the last opened one (the contract's open label, with
    the opens known at the window start) within ``plan.streak_lookback_days``.
    """
    start = _utc(window_start).replace(tzinfo=None)
    since = start - timedelta(days=cfg.plan.streak_lookback_days)
    attributed = attributed_sends_sql(
        since, start, start, cfg.labels.open_attribution_hours, cfg.slots.kind
    )
    users = log.query_df(f"""
        WITH a AS ({attributed}),
        last_open AS (SELECT user_id, max(ts) AS last_opened FROM a WHERE opened GROUP BY 1),
        streak AS (
            SELECT a.user_id, max(a.ts) AS last_send,
                   count(*) FILTER (WHERE l.last_opened IS NULL OR a.ts > l.last_opened)
                       AS consecutive_unopened
            FROM a LEFT JOIN last_open l USING (user_id) GROUP BY a.user_id),
        seen AS (SELECT user_id, min(ts) AS first_event FROM events GROUP BY 1)
        SELECT coalesce(s.user_id, u.user_id) AS user_id,
               coalesce(u.signup_ts, s.first_event) AS first_seen,
               coalesce(k.consecutive_unopened, 0) AS consecutive_unopened, k.last_send
        FROM seen s FULL JOIN users u USING (user_id) LEFT JOIN streak k
          ON k.user_id = coalesce(s.user_id, u.user_id)""")
    return PlanHistory(users=users, sends=log.query_df(_sends_sql(window_start, window_hours, cfg)))


def _sends_sql(window_start: datetime, window_hours: int, cfg: Config) -> str:
    """The logged sends the rules look at: from the lookback before the window to its end."""
    start = _utc(window_start).replace(tzinfo=None)
    end = start + timedelta(hours=window_hours)
    lookback = start - timedelta(days=history_lookback_days(cfg))
    return f"""SELECT user_id, ts, channel FROM events
        WHERE event = 'send' AND ts > {_ts_sql(lookback)} AND ts < {_ts_sql(end)}"""


_NAT = np.iinfo(np.int64).min   # numpy's NaT, as µs since the epoch


def _us_times(us: np.ndarray) -> np.ndarray:
    return np.asarray(us, dtype=np.int64).view("datetime64[us]")


def history_from_state(state: FeatureState, signups: pd.DataFrame, cfg: Config) -> pd.DataFrame | None:
    """:func:`load_history`'s users frame as of the state's time, read off a refresh's feature
    state instead of the log (the state already holds each user's first event, last send and
    open streak under the same attribution), or None when the state's history window is not
    the rules' streak look-back. ``signups``: the users table's user_id and signup_ts.

    Users first seen after the state's time (no signup, events only later) are left out:
    nothing is known of them at T, which is also what :func:`check_rules` assumes of users
    absent from the frame."""
    if cfg.plan.streak_lookback_days != cfg.features.history_days:
        return None
    ids = pd.Index(np.asarray(state.user_ids, dtype=object))
    first = np.asarray(state.scan["days_since_first_event"])
    first_event = pd.Series(_us_times(np.where(first == NONE_EARLY, _NAT, first)), index=ids)
    known = state.history_sends > 0    # the last send counts only inside the look-back, as the log query has it
    last_send = _us_times(np.where(known, state.last_send, _NAT))
    signup = pd.Series(pd.to_datetime(signups["signup_ts"], utc=True).dt.tz_localize(None).to_numpy(),
                       index=pd.Index(signups["user_id"].to_numpy(dtype=object)))
    signup = signup[~signup.index.duplicated()]
    later = signup.index.difference(ids)    # signed up after T: new users to the rules, with no events yet
    users = pd.DataFrame({
        "user_id": np.concatenate([ids.to_numpy(), later.to_numpy()]),
        "first_seen": pd.concat([signup.reindex(ids).fillna(first_event), signup.reindex(later)]).to_numpy(),
        "consecutive_unopened": np.concatenate([state.streak, np.zeros(len(later), dtype=np.int64)]),
        "last_send": np.concatenate([last_send, np.full(len(later), np.datetime64("NaT"), "datetime64[us]")]),
    })
    for column in ("first_seen", "last_send"):
        users[column] = users[column].astype("datetime64[us]")
    return users


def copy_history_sends(log: EventLog, window_start: datetime, window_hours: int, cfg: Config, path: Path) -> None:
    """:func:`load_history`'s sends frame written straight from the log to Parquet (no
    Python objects for millions of sends)."""
    log.con.execute(f"COPY ({_sends_sql(window_start, window_hours, cfg)}) TO '{path}' (FORMAT parquet)")


@dataclass
class RuleCheck:
    """The outcome of the rules for n users over their zone's candidates."""

    allowed: np.ndarray  # (n, width) bool
    reason: np.ndarray  # (n,) object: None where a candidate is left, else a RULE_ORDER name


def _epoch_seconds(values: pd.Series) -> np.ndarray:
    ts = pd.to_datetime(values)
    if getattr(ts.dt, "tz", None) is not None:
        ts = ts.dt.tz_convert("UTC").dt.tz_localize(None)
    out = ts.astype("datetime64[us]").to_numpy().astype("datetime64[s]").astype(np.float64)
    out[pd.isna(ts).to_numpy()] = np.nan
    return out


def _local_day_month(seconds: np.ndarray, zones: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    day = np.zeros(len(seconds), dtype=np.int64)
    month = np.zeros(len(seconds), dtype=np.int64)
    for zone in pd.unique(zones):
        part = zones == zone
        local = pd.to_datetime(seconds[part].astype(np.int64), unit="s", utc=True).tz_convert(zone)
        naive = local.tz_localize(None)
        day[part] = naive.normalize().as_unit("s").asi8 // _DAY
        month[part] = naive.year * 12 + naive.month - 1
    return day, month


def _count_between(keys: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """How many sorted ``keys`` lie in [lo, hi)."""
    return np.searchsorted(keys, hi, side="left") - np.searchsorted(keys, lo, side="left")


def check_rules(
    cand: Candidates,
    zone_index: np.ndarray,
    user_ids: np.ndarray,
    zones: np.ndarray,
    history: PlanHistory | None,
    cfg: Config,
    channel: str,
) -> RuleCheck:
    """Strike the candidates each rule forbids; name the rule that struck a user's last one.

    ``zone_index[i]`` is user i's row in ``cand``; ``zones[i]`` its zone name.
    """
    plan = cfg.plan
    n, width = len(user_ids), cand.width
    sec = cand.seconds[zone_index].astype(np.float64)  # (n, width)
    valid = cand.valid[zone_index]
    blocked = {rule: np.zeros((n, width), dtype=bool) for rule in RULE_ORDER}
    blocked["quiet_hours"] = quiet_hours(cfg)[cand.hour[zone_index]]
    history = history or PlanHistory.empty()
    pos_of = pd.Series(np.arange(n), index=pd.Index(np.asarray(user_ids, dtype=object)))
    pos_of = pos_of[~pos_of.index.duplicated()]
    # ---- per-user scalars
    first_seen = np.full(n, np.nan)
    streak = np.zeros(n, dtype=np.int64)
    last_send = np.full(n, np.nan)
    hu = history.users
    if len(hu):
        where = pos_of.reindex(hu["user_id"].astype(object)).to_numpy()
        ok = ~np.isnan(where)
        at = where[ok].astype(np.int64)
        first_seen[at] = _epoch_seconds(hu["first_seen"])[ok]
        streak[at] = hu["consecutive_unopened"].fillna(0).to_numpy(np.int64)[ok]
        last_send[at] = _epoch_seconds(hu["last_send"])[ok]
    # ---- the logged sends, as sorted keys per user
    hs = history.sends
    if len(hs):
        where = pos_of.reindex(hs["user_id"].astype(object)).to_numpy()
        ok = ~np.isnan(where)
        s_user = where[ok].astype(np.int64)
        s_sec = _epoch_seconds(hs["ts"])[ok].astype(np.int64)
        s_channel = hs["channel"].astype(object).to_numpy()[ok]
    else:
        s_user = np.zeros(0, np.int64)
        s_sec = np.zeros(0, np.int64)
        s_channel = np.zeros(0, object)
    s_day, s_month = _local_day_month(s_sec, zones[s_user]) if len(s_user) else (s_sec, s_sec)
    counted = (
        np.ones(len(s_user), bool) if plan.rules_count_all_channels else (s_channel == channel)
    )
    quota_sends = np.isin(s_channel.astype(str), list(plan.quota_channels))
    rows = np.arange(n, dtype=np.int64)[:, None] * _KEY
    by_time = np.sort(s_user[counted] * _KEY + s_sec[counted])
    by_day = np.sort(s_user[counted] * _KEY + s_day[counted])
    # ---- frequency caps: per local day; new users; degraded weekly cap
    day_key = rows + cand.day[zone_index]
    per_day = _count_between(by_day, day_key, day_key + 1)
    new = sec < (first_seen + plan.new_user_days * _DAY)[:, None]
    fs = np.nan_to_num(first_seen, nan=0.0).astype(np.int64)
    new_period = _count_between(
        by_time, rows[:, 0] + fs, rows[:, 0] + fs + int(plan.new_user_days * _DAY)
    )[:, None]
    after_cap = min(plan.max_sends_per_local_day, plan.after_new_user_max_per_local_day)
    freq = np.where(
        new,
        (new_period >= plan.new_user_max_sends) | (per_day >= plan.max_sends_per_local_day),
        per_day >= after_cap,
    )
    t_key = rows + sec.astype(np.int64)
    last_week = _count_between(by_time, t_key - int(plan.degraded_days * _DAY) + 1, t_key)
    freq |= (streak >= plan.degrade_after_unopened)[:, None] & (
        last_week >= plan.degraded_max_sends
    )
    blocked["frequency_cap"] = freq
    # ---- silence after consecutive unopened sends
    silent_until = np.where(
        streak >= plan.silence_after_unopened, last_send + plan.silence_hours * 3600, -np.inf
    )
    blocked["silenced"] = sec < np.nan_to_num(silent_until, nan=-np.inf)[:, None]
    # ---- mass-send quota on the quota channels
    if channel in plan.quota_channels and (plan.quota_per_month or plan.quota_per_day):
        q = quota_sends
        quota = np.zeros((n, width), dtype=bool)
        if plan.quota_per_month:
            by_month = np.sort(s_user[q] * _KEY + s_month[q])
            month_key = rows + cand.month[zone_index]
            quota |= _count_between(by_month, month_key, month_key + 1) >= plan.quota_per_month
        if plan.quota_per_day:
            by_qday = np.sort(s_user[q] * _KEY + s_day[q])
            quota |= _count_between(by_qday, day_key, day_key + 1) >= plan.quota_per_day
        blocked["quota"] = quota
    remaining = valid.copy()
    reason = np.full(n, None, dtype=object)
    for rule in RULE_ORDER:
        after = remaining & ~blocked[rule]
        struck_out = remaining.any(axis=1) & ~after.any(axis=1)
        reason[struck_out] = rule
        remaining = after
    return RuleCheck(allowed=remaining, reason=reason)
