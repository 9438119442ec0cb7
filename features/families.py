"""The user-level feature families, declared once.

Each family says what it computes, from which events, and the name, meaning and wording of
every column it yields (names follow the configured windows). The matrix is their join
(:func:`scalar_features`); churn reasons, baselines and documentation read these
declarations instead of parsing column names.

Three kinds, by how they reach the log:

- :class:`ScanFamily`: aggregates over ``events`` up to T, each one of four kinds
  (:class:`Count` or :class:`Sum` over a window ending at T, :class:`Last`/:class:`First`
  event time, :class:`Ever`); all families' aggregates run in one shared scan of the log,
  and because each kind says how it combines, the feature state
  (:mod:`features.state`) can move them from one refresh to the next from the events in
  between instead of re-reading the whole log;
- :class:`StateFamily`: columns kept by a handler of their own in :mod:`features.state`
  (distinct active days, open streaks, reachability);
- :class:`DerivedFamily`: arithmetic on columns of the other families.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import pandas as pd

from configs import Config

__all__ = ["COUNTED_EVENTS", "Aggregate", "Column", "Count", "Decayed", "DerivedFamily", "Ever", "First", "Last", "ScanFamily",
           "StateFamily", "Sum", "active_days_column",
           "check_declarations", "count_column", "days_since_column", "describe_features", "feature_catalog", "phrase",
           "scalar_families"]

# events counted per window, in this order
COUNTED_EVENTS: tuple[str, ...] = ("open", "session", "send", "purchase", "click")
_NOUNS = {"open": "opens", "session": "sessions", "send": "messages received", "purchase": "purchases",
          "click": "clicks"}
_RECENCY = (("open", "event = 'open'", "no open for {d}", "never opened a message"),
            ("session", "event = 'session'", "no session for {d}", "never had a session"),
            ("purchase", "event = 'purchase'", "no purchase for {d}", "never purchased"),
            ("send", "event = 'send'", "no message received for {d}", "never received a message"))


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
class Count:
    """Events matching ``condition`` (SQL over ``events``) in the ``window`` up to T (None:
    the whole history). Additive: the count at T' is the count at T, plus the events in
    (T, T'], minus those that left the window."""

    condition: str
    window: timedelta | None = None


@dataclass(frozen=True)
class Sum:
    """The sum of ``expr`` over events matching ``condition`` in the ``window`` up to T."""

    expr: str
    condition: str
    window: timedelta | None = None


@dataclass(frozen=True)
class Last:
    """Days from the last event matching ``condition`` to T (missing: none yet)."""

    condition: str


@dataclass(frozen=True)
class First:
    """Days from the first event matching ``condition`` to T (missing: none yet)."""

    condition: str


@dataclass(frozen=True)
class Decayed:
    """Events matching ``condition`` up to T, each weighing 2^(-age / half_life): the whole
    history, the recent part counting most. Moves forward by decaying the old value by the
    time passed and adding the new events' weights."""

    condition: str
    half_life: timedelta


@dataclass(frozen=True)
class Ever:
    """1 when any event up to T matches ``condition``."""

    condition: str


Aggregate = Count | Sum | Last | First | Ever | Decayed


@dataclass(frozen=True)
class ScanFamily:
    """Aggregates over ``events`` (ts <= T) grouped by user, run in the shared scan."""

    name: str
    events: tuple[str, ...]
    aggregates: Callable[[Config], list[tuple[Column, Aggregate]]]
    fill: float | None = 0.0          # value for users without rows (None: keep missing)

    def columns(self, cfg: Config) -> list[Column]:
        return [c for c, _ in self.aggregates(cfg)]


@dataclass(frozen=True)
class StateFamily:
    """Columns computed by the feature state's handler of the same name (:mod:`features.state`)."""

    name: str
    events: tuple[str, ...]
    declare: Callable[[Config], list[Column]]

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


Family = ScanFamily | StateFamily | DerivedFamily


# --------------------------------------------------------------------------- declarations

def _counts(cfg: Config) -> list[tuple[Column, Aggregate]]:
    out = []
    for days in cfg.features.frequency_windows_days:
        for event in COUNTED_EVENTS:
            noun = _NOUNS[event]
            out.append((Column(count_column(event, days), f"{noun} in the {days} days up to T",
                               lambda v, n=noun, d=days: f"{v:.0f} {n} in the last {d} days"),
                        Count(f"event = '{event}'", timedelta(days=days))))
    return out


def _fatigue(cfg: Config) -> list[tuple[Column, Aggregate]]:
    return [(Column(f"sends_last_{h}h", f"messages received in the {h} hours up to T",
                    lambda v, h=h: f"{v:.0f} messages received in the last {h} h"),
             Count("event = 'send'", timedelta(hours=h)))
            for h in cfg.features.fatigue_windows_hours]


def _recency(cfg: Config) -> list[tuple[Column, Aggregate]]:
    rows = [(what, cond, seen, never) for what, cond, seen, never in _RECENCY]
    rows.append(("engagement", f"event IN ({cfg.labels.engagement_sql()})", "no activity for {d}",
                 "never active"))
    out: list[tuple[Column, Aggregate]] = []
    for what, cond, seen, never in rows:
        out.append((Column(days_since_column(what), f"days since the last {what} event (missing: never)",
                           lambda v, s=seen, n=never: s.format(d=_days(v)) if v == v else n),
                    Last(cond)))
    out.append((Column("days_since_first_event", "days since the user's first event of any kind",
                       lambda v: f"first seen {_days(v)} ago" if v == v else "never seen"),
                First("true")))
    out.append((Column("days_since_first_engagement", "days since the user's first engagement event",
                       lambda v: f"first active {_days(v)} ago" if v == v else "never active"),
                First(f"event IN ({cfg.labels.engagement_sql()})")))
    return out


def _value(cfg: Config) -> list[tuple[Column, Aggregate]]:
    longest = max(cfg.features.frequency_windows_days)
    return [(Column(f"value_{longest}d", f"purchase value in the {longest} days up to T",
                    lambda v, d=longest: f"purchases worth {v:.0f} in the last {d} days"),
             Sum("coalesce(value, 0)", "event = 'purchase'", timedelta(days=longest)))]


def _lifetime(cfg: Config) -> list[tuple[Column, Aggregate]]:
    engagement = f"event IN ({cfg.labels.engagement_sql()})"
    out = [(Column(f"{event}s_ever", f"{_NOUNS[event]} up to T, the whole history",
                   lambda v, n=_NOUNS[event]: f"{v:.0f} {n} in all"),
            Count(f"event = '{event}'")) for event in COUNTED_EVENTS]
    out.append((Column("engagements_ever", "engagement events up to T, the whole history",
                       lambda v: f"{v:.0f} engagements in all"), Count(engagement)))
    out.append((Column("value_ever", "purchase value up to T, the whole history",
                       lambda v: f"purchases worth {v:.0f} in all"), Sum("coalesce(value, 0)", "event = 'purchase'")))
    return out


def decayed_column(event: str, half_life_days: float) -> str:
    return f"{event}s_decayed_{half_life_days:g}d"


def _decayed(cfg: Config) -> list[tuple[Column, Aggregate]]:
    return [(Column(decayed_column(event, h), f"{_NOUNS[event]} up to T, each weighing 2^(-age / {h:g} days)",
                    lambda v, n=_NOUNS[event], h=h: f"{v:.1f} recent-weighted {n} (half-life {h:g} days)"),
             Decayed(f"event = '{event}'", timedelta(days=h)))
            for h in cfg.features.decay_half_lives_days for event in COUNTED_EVENTS]


def _bookkeeping(cfg: Config) -> list[tuple[Column, Aggregate]]:
    return [(Column("unsubscribed", "1 when the user ever unsubscribed",
                    lambda v: "unsubscribed" if v > 0 else "subscribed"),
             Ever("event = 'unsubscribe'")),
            (Column("n_events", "events of any kind up to T (bookkeeping, not a model input)"),
             Count("true"))]


def _active_days_columns(cfg: Config) -> list[Column]:
    return [Column(active_days_column(d), f"distinct days with an engagement event in the last {d} days",
                   lambda v, d=d: f"{v:.0f} active days in the last {d} days")
            for d in cfg.features.frequency_windows_days]


def _rhythm_columns(cfg: Config) -> list[Column]:
    return [Column("active_days_ever", "distinct days with an engagement event up to T, the whole history",
                   lambda v: f"{v:.0f} active days in all"),
            Column("active_span_days", "days from the first to the last active day (0: one or none)",
                   lambda v: f"active over a span of {_days(v)}"),
            Column("active_gap_sq_days", "sum of squared gaps between consecutive active days (bookkeeping)")]


def _rhythm_derived_columns(cfg: Config) -> list[Column]:
    return [Column("mean_active_gap_days", "mean days between consecutive active days (missing: under two)",
                   lambda v: f"active every {v:.1f} days on average" if v == v else "too few active days"),
            Column("active_gap_cv", "spread of the gaps between active days over their mean",
                   lambda v: f"irregular rhythm (gap spread {v:.2f})" if v == v else "too few active days"),
            Column("overdue_ratio", "days since the last engagement over the user's mean gap (>1: overdue)",
                   lambda v: f"{v:.1f}x their usual gap since the last activity" if v == v
                   else "no rhythm yet"),
            Column("lifetime_active_rate", "active days per day since the first engagement",
                   lambda v: f"active on {v:.0%} of days since first seen" if v == v else "never active")] + [
        Column(f"{event}s_per_day_ever", f"{_NOUNS[event]} per day since the user's first event",
               lambda v, n=_NOUNS[event]: f"{v:.2f} {n} a day since first seen")
        for event in COUNTED_EVENTS]


def _rhythm(frame: pd.DataFrame, cfg: Config) -> dict[str, pd.Series]:
    n = frame["active_days_ever"]
    span = frame["active_span_days"]
    gaps = (n - 1).where(n >= 2)
    mean = span / gaps
    var = (frame["active_gap_sq_days"] / gaps - mean ** 2).clip(lower=0)
    age = frame["days_since_first_engagement"]
    return {"mean_active_gap_days": mean, "active_gap_cv": var ** 0.5 / mean.where(mean > 0),
            "overdue_ratio": frame["days_since_engagement"] / mean.where(mean > 0),
            "lifetime_active_rate": n / (age.clip(lower=0) + 1.0),
            **{f"{event}s_per_day_ever": frame[f"{event}s_ever"] / (frame["days_since_first_event"].clip(lower=0) + 1.0)
               for event in COUNTED_EVENTS}}


def _response_columns(cfg: Config) -> list[Column]:
    out = [Column("consecutive_unopened", "sends since the last send known (at T) to be opened",
                  lambda v: f"{v:.0f} messages in a row unopened")]
    for d in cfg.features.frequency_windows_days:
        out.append(Column(f"matured_sends_{d}d", f"sends of the last {d} days whose attribution window closed",
                          lambda v, d=d: f"{v:.0f} messages with a known outcome in the last {d} days"))
        out.append(Column(f"matured_opened_{d}d", "of which opened",
                          lambda v, d=d: f"{v:.0f} messages opened in the last {d} days"))
    return out


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
        ScanFamily("lifetime", COUNTED_EVENTS, _lifetime),
        ScanFamily("decayed", COUNTED_EVENTS, _decayed),
        ScanFamily("bookkeeping", ("unsubscribe",), _bookkeeping),
        StateFamily("active_days", ("open", "click", "purchase", "session"), _active_days_columns),
        StateFamily("rhythm", ("open", "click", "purchase", "session"), _rhythm_columns),
        StateFamily("reachability", ("send", "unsubscribe"),
                    lambda cfg: [Column("unreachable", "1 when the user unsubscribed after their last send",
                                        lambda v: "unsubscribed since the last message" if v > 0
                                        else "still receives messages")]),
        StateFamily("response", ("send", "open"), _response_columns),
        DerivedFamily("trends", ("open", "session", "send"), _trend_columns, _trends),
        DerivedFamily("rhythm_derived", ("open", "click", "purchase", "session"), _rhythm_derived_columns, _rhythm),
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
    from features.btyd import btyd_declarations  # features.btyd reads Column from here

    out = {c.name: c for family in scalar_families() for c in family.columns(cfg)}
    out.update({c.name: c for c in _PROFILE_COLUMNS})
    out.update({c.name: c for c in btyd_declarations(cfg)})
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


def check_declarations(cfg: Config) -> None:
    """Two families must not declare one name (a test calls this)."""
    names = [c.name for f in scalar_families() for c in f.columns(cfg)]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise AssertionError(f"feature families declare these columns twice: {dupes}")

