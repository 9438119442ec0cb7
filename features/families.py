"""The user-level feature families, declared once.

Each family says what it computes, from which events, and the name, meaning and wording of
every column it yields (names follow the configured windows). The matrix is their join
(:func:`scalar_features`); churn reasons, baselines and documentation read these
declarations instead of parsing column names.

Three kinds, by how they reach the log:

- :class:`ScanFamily`: SQL aggregates over ``events`` up to T, all families' aggregates
  computed in one shared scan of the log (one pass over 100M rows, not one per family);
- :class:`QueryFamily`: a query of its own (distinct active days, open streaks, reachability);
- :class:`DerivedFamily`: arithmetic on columns of the other families.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

import pandas as pd

from configs import Config
from features.attribution import attributed_sends_sql
from features.events import EventLog

__all__ = ["COUNTED_EVENTS", "Column", "DerivedFamily", "QueryFamily", "ScanFamily", "active_days_column",
           "check_declarations", "count_column", "days_since_column", "describe_features", "feature_catalog", "phrase",
           "scalar_families", "scalar_features", "sql_ts"]

# events counted per window, in this order
COUNTED_EVENTS: tuple[str, ...] = ("open", "session", "send", "purchase", "click")
_NOUNS = {"open": "opens", "session": "sessions", "send": "messages received", "purchase": "purchases",
          "click": "clicks"}
_RECENCY = (("open", "event = 'open'", "no open for {d}", "never opened a message"),
            ("session", "event = 'session'", "no session for {d}", "never had a session"),
            ("purchase", "event = 'purchase'", "no purchase for {d}", "never purchased"),
            ("send", "event = 'send'", "no message received for {d}", "never received a message"))


def sql_ts(value: datetime) -> str:
    return f"TIMESTAMP '{value.isoformat(sep=' ')}'"


def _days(v: float) -> str:
    return f"{v:.0f} day{'s' if round(v) != 1 else ''}"


def count_column(event: str, days: int) -> str:
    return f"{event}s_{days}d"


def active_days_column(days: int) -> str:
    return f"active_days_{days}d"


def days_since_column(what: str) -> str:
    return f"days_since_{what}"


@dataclass(frozen=True)
class Column:
    """One feature column: its name, what it holds, and how a reason states a user's value."""

    name: str
    meaning: str
    wording: Callable[[float], str] | None = None

    def phrase(self, value: float) -> str:
        if self.wording is None:
            return f"{self.name.replace('_', ' ')} = {value:.3g}"
        return self.wording(float(value))


@dataclass(frozen=True)
class ScanFamily:
    """Aggregates over ``events`` (ts <= T) grouped by user, run in the shared scan."""

    name: str
    events: tuple[str, ...]
    aggregates: Callable[[Config, str], list[tuple[Column, str]]]   # (cfg, T as SQL) -> (column, SQL)
    fill: float | None = 0.0          # value for users without rows (None: keep missing)

    def columns(self, cfg: Config) -> list[Column]:
        return [c for c, _ in self.aggregates(cfg, "T")]


@dataclass(frozen=True)
class QueryFamily:
    """A query of its own returning ``user_id`` and the family's columns."""

    name: str
    events: tuple[str, ...]
    declare: Callable[[Config], list[Column]]
    query: Callable[[Config, datetime], str]
    fill: float | None = 0.0

    def columns(self, cfg: Config) -> list[Column]:
        return self.declare(cfg)


@dataclass(frozen=True)
class DerivedFamily:
    """Columns computed from other families' columns (no log access)."""

    name: str
    events: tuple[str, ...]
    declare: Callable[[Config], list[Column]]
    derive: Callable[[pd.DataFrame, Config], dict[str, pd.Series]]

    def columns(self, cfg: Config) -> list[Column]:
        return self.declare(cfg)


Family = ScanFamily | QueryFamily | DerivedFamily


# --------------------------------------------------------------------------- declarations

def _counts(cfg: Config, t: str) -> list[tuple[Column, str]]:
    out = []
    for days in cfg.features.frequency_windows_days:
        for event in COUNTED_EVENTS:
            noun = _NOUNS[event]
            out.append((Column(count_column(event, days), f"{noun} in the {days} days up to T",
                               lambda v, n=noun, d=days: f"{v:.0f} {n} in the last {d} days"),
                        f"count(*) FILTER (WHERE event = '{event}' AND ts > {t} - INTERVAL {days} DAY)"))
    return out


def _fatigue(cfg: Config, t: str) -> list[tuple[Column, str]]:
    return [(Column(f"sends_last_{h}h", f"messages received in the {h} hours up to T",
                    lambda v, h=h: f"{v:.0f} messages received in the last {h} h"),
             f"count(*) FILTER (WHERE event = 'send' AND ts > {t} - INTERVAL {h} HOUR)")
            for h in cfg.features.fatigue_windows_hours]


def _recency(cfg: Config, t: str) -> list[tuple[Column, str]]:
    rows = [(what, cond, seen, never) for what, cond, seen, never in _RECENCY]
    rows.append(("engagement", f"event IN ({cfg.labels.engagement_sql()})", "no activity for {d}",
                 "never active"))
    out = []
    for what, cond, seen, never in rows:
        out.append((Column(days_since_column(what), f"days since the last {what} event (missing: never)",
                           lambda v, s=seen, n=never: s.format(d=_days(v)) if v == v else n),
                    f"date_diff('second', max(ts) FILTER (WHERE {cond}), {t}) / 86400.0"))
    out.append((Column("days_since_first_event", "days since the user's first event of any kind",
                       lambda v: f"first seen {_days(v)} ago" if v == v else "never seen"),
                f"date_diff('second', min(ts), {t}) / 86400.0"))
    return out


def _value(cfg: Config, t: str) -> list[tuple[Column, str]]:
    longest = max(cfg.features.frequency_windows_days)
    return [(Column(f"value_{longest}d", f"purchase value in the {longest} days up to T",
                    lambda v, d=longest: f"purchases worth {v:.0f} in the last {d} days"),
             f"sum(value) FILTER (WHERE event = 'purchase' AND ts > {t} - INTERVAL {longest} DAY)")]


def _bookkeeping(cfg: Config, t: str) -> list[tuple[Column, str]]:
    return [(Column("unsubscribed", "1 when the user ever unsubscribed",
                    lambda v: "unsubscribed" if v > 0 else "subscribed"),
             "CAST(bool_or(event = 'unsubscribe') AS DOUBLE)"),
            (Column("n_events", "events of any kind up to T (bookkeeping, not a model input)"),
             "count(*)")]


def _active_days_columns(cfg: Config) -> list[Column]:
    return [Column(active_days_column(d), f"distinct days with an engagement event in the last {d} days",
                   lambda v, d=d: f"{v:.0f} active days in the last {d} days")
            for d in cfg.features.frequency_windows_days]


def _active_days_query(cfg: Config, as_of: datetime) -> str:
    t = sql_ts(as_of)
    longest = max(cfg.features.frequency_windows_days)
    counts = ", ".join(f"count(*) FILTER (WHERE day > CAST({t} - INTERVAL {d} DAY AS DATE)) AS "
                       f"{active_days_column(d)}" for d in cfg.features.frequency_windows_days)
    # distinct days are costly inside the big aggregate: count them over (user, day) pairs
    return f"""SELECT user_id, {counts}
        FROM (SELECT DISTINCT user_id, CAST(ts AS DATE) AS day FROM events
              WHERE event IN ({cfg.labels.engagement_sql()}) AND ts <= {t}
                AND ts > {t} - INTERVAL {longest + 1} DAY)
        GROUP BY user_id"""


def _response_columns(cfg: Config) -> list[Column]:
    out = [Column("consecutive_unopened", "sends since the last send known (at T) to be opened",
                  lambda v: f"{v:.0f} messages in a row unopened")]
    for d in cfg.features.frequency_windows_days:
        out.append(Column(f"matured_sends_{d}d", f"sends of the last {d} days whose attribution window closed",
                          lambda v, d=d: f"{v:.0f} messages with a known outcome in the last {d} days"))
        out.append(Column(f"matured_opened_{d}d", "of which opened",
                          lambda v, d=d: f"{v:.0f} messages opened in the last {d} days"))
    return out


def _response_query(cfg: Config, as_of: datetime) -> str:
    window_h = cfg.labels.open_attribution_hours
    since = as_of - timedelta(days=cfg.features.history_days)
    matured = sql_ts(as_of - timedelta(hours=window_h))
    windows = ", ".join(
        f"count(*) FILTER (WHERE a.ts <= {matured} AND a.ts > {matured} - INTERVAL {d} DAY) AS matured_sends_{d}d, "
        f"count(*) FILTER (WHERE a.opened AND a.ts <= {matured} AND a.ts > {matured} - INTERVAL {d} DAY)"
        f" AS matured_opened_{d}d"
        for d in cfg.features.frequency_windows_days)
    return f"""WITH a AS ({attributed_sends_sql(since, as_of, as_of, window_h, cfg.slots.kind)}),
        last_open AS (SELECT user_id, max(ts) FILTER (WHERE opened) AS last_opened FROM a GROUP BY 1)
        SELECT a.user_id,
               count(*) FILTER (WHERE l.last_opened IS NULL OR a.ts > l.last_opened) AS consecutive_unopened,
               {windows}
        FROM a LEFT JOIN last_open l USING (user_id)
        GROUP BY a.user_id"""


def _reachability_query(cfg: Config, as_of: datetime) -> str:
    t = sql_ts(as_of)
    # no message reaches a user who unsubscribed after their last send, from that send's
    # channel (or from every channel: an unsubscribe without one); a later send means they
    # came back
    return f"""WITH last_send AS (
                SELECT user_id, max(ts) AS ts, arg_max(channel, ts) AS channel
                FROM events WHERE event = 'send' AND ts <= {t} GROUP BY user_id)
            SELECT DISTINCT u.user_id, 1.0 AS unreachable
            FROM events u LEFT JOIN last_send s USING (user_id)
            WHERE u.event = 'unsubscribe' AND u.ts <= {t} AND (s.ts IS NULL OR u.ts > s.ts)
              AND (u.channel IS NULL OR s.channel IS NULL OR u.channel = s.channel)"""


def _trend_columns(cfg: Config) -> list[Column]:
    short, long_ = min(cfg.features.frequency_windows_days), max(cfg.features.frequency_windows_days)
    out = [Column(f"{event}_trend", f"{_NOUNS[event]} in the last {short} days, scaled to {long_} days, "
                  f"over the last {long_} days",
                  lambda v, n=_NOUNS[event], d=long_: f"{n} at {v:.0%} of their {d}-day pace")
           for event in ("open", "session", "send")]
    out += [Column(f"open_rate_{d}d", f"share of matured sends of the last {d} days opened (smoothed)",
                   lambda v, d=d: f"open rate {v:.0%} over the last {d} days")
            for d in cfg.features.frequency_windows_days]
    out.append(Column("open_rate_trend", f"the {short}-day open rate over the {long_}-day one",
                      lambda v, d=long_: f"open rate at {v:.0%} of its {d}-day level"))
    return out


def _trends(frame: pd.DataFrame, cfg: Config) -> dict[str, pd.Series]:
    windows = cfg.features.frequency_windows_days
    short, long_ = min(windows), max(windows)
    scale = long_ / short
    out = {}
    for event in ("open", "session", "send"):
        out[f"{event}_trend"] = ((frame[count_column(event, short)] * scale + 1.0)
                                 / (frame[count_column(event, long_)] + 1.0))
    for d in windows:
        out[f"open_rate_{d}d"] = (frame[f"matured_opened_{d}d"] + 1.0) / (frame[f"matured_sends_{d}d"] + 8.0)
    out["open_rate_trend"] = out[f"open_rate_{short}d"] / out[f"open_rate_{long_}d"]
    return out


def scalar_families() -> tuple[Family, ...]:
    """Every user-level family, in column order."""
    return (
        ScanFamily("activity", COUNTED_EVENTS, _counts),
        ScanFamily("fatigue", ("send",), _fatigue),
        ScanFamily("recency", ("open", "session", "purchase", "send", "click"), _recency, fill=None),
        ScanFamily("value", ("purchase",), _value),
        ScanFamily("bookkeeping", ("unsubscribe",), _bookkeeping),
        QueryFamily("active_days", ("open", "click", "purchase", "session"), _active_days_columns,
                    _active_days_query),
        QueryFamily("reachability", ("send", "unsubscribe"),
                    lambda cfg: [Column("unreachable", "1 when the user unsubscribed after their last send",
                                        lambda v: "unsubscribed since the last message" if v > 0
                                        else "still receives messages")],
                    _reachability_query),
        QueryFamily("response", ("send", "open"), _response_columns, _response_query),
        DerivedFamily("trends", ("open", "session", "send"), _trend_columns, _trends),
    )


# columns build_matrix adds beside the families (profile summaries and user attributes)
_PROFILE_COLUMNS = (
    Column("user_open_rate", "the user's open rate shrunk toward the population's",
           lambda v: f"opens {v:.0%} of messages"),
    Column("utc_offset_hours", "the user's time zone offset at T, hours"),
    Column("tenure_days", "days since signup", lambda v: f"signed up {_days(v)} ago" if v == v else "signup unknown"),
    Column("session_entropy", "entropy of the user's activity over slots (high: no habit)",
           lambda v: f"activity spread over the day (entropy {v:.2f})"),
    Column("has_history", "1 when the user has any event up to T (bookkeeping)"),
    Column("best_slot_rate", "the user's highest smoothed slot open rate",
           lambda v: f"best hour's open rate {v:.0%}"),
    Column("peak_session_share", "the busiest slot's session share (x slots; 1 = uniform)",
           lambda v: f"busiest hour holds {v:.1f}x an even share of sessions"),
)


def feature_catalog(cfg: Config) -> dict[str, Column]:
    """Every declared user-level column by name, with the configured windows."""
    out = {c.name: c for family in scalar_families() for c in family.columns(cfg)}
    out.update({c.name: c for c in _PROFILE_COLUMNS})
    return out


def phrase(catalog: dict[str, Column], feature: str, value: float,
           categories: tuple[str, ...] | None = None) -> str:
    """A reason in words: a categorical input arrives as its code and is named by its level."""
    if categories is not None:
        level = categories[int(value)] if value == value and 0 <= int(value) < len(categories) else "unknown"
        return f"{feature.replace('_', ' ')}: {level}"
    column = catalog.get(feature)
    return column.phrase(value) if column else f"{feature.replace('_', ' ')} = {value:.3g}"


def describe_features(cfg: Config) -> pd.DataFrame:
    """The catalog as a table: family, column, meaning, events read."""
    rows = [{"family": f.name, "column": c.name, "meaning": c.meaning, "events": ", ".join(f.events)}
            for f in scalar_families() for c in f.columns(cfg)]
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- the join

def scalar_features(log: EventLog, as_of: datetime, cfg: Config, user_ids: pd.Index) -> pd.DataFrame:
    """Every user-level family as of ``as_of``, one row per user of ``user_ids``."""
    t = sql_ts(as_of)
    families = scalar_families()
    scans = [(f, f.aggregates(cfg, t)) for f in families if isinstance(f, ScanFamily)]
    select = ", ".join(f"{sql} AS {col.name}" for _, pairs in scans for col, sql in pairs)
    parts = [log.query_df(f"SELECT user_id, {select} FROM events WHERE ts <= {t} GROUP BY user_id")
             .set_index("user_id")]
    fills: dict[str, float | None] = {c.name: f.fill for f, pairs in scans for c, _ in pairs}
    for family in families:
        if isinstance(family, QueryFamily):
            parts.append(log.query_df(family.query(cfg, as_of)).set_index("user_id"))
            fills.update({c.name: family.fill for c in family.columns(cfg)})
    out = pd.concat(parts, axis=1).reindex(user_ids)
    for name, fill in fills.items():
        if fill is not None:
            out[name] = out[name].fillna(fill)
    out = out.astype(float)
    for family in families:
        if isinstance(family, DerivedFamily):
            for name, values in family.derive(out, cfg).items():
                out[name] = values.astype(float)
    return out


def check_declarations(cfg: Config) -> None:
    """Two families must not declare one name (a test calls this)."""
    names = [c.name for f in scalar_families() for c in f.columns(cfg)]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise AssertionError(f"feature families declare these columns twice: {dupes}")

