"""The contract's labels, next to the datasets that use them.

- open: a send is opened when its open follows within the attribution window
  (``features.attribution`` holds the SQL, shared with the per-slot histories).
- churn at T: among users with an engagement event in [T - lookback, T], churned means
  no engagement event in (T, T + horizon].
"""

from __future__ import annotations

from datetime import datetime, timedelta

import pandas as pd

from configs import Config
from features.attribution import attributed_sends_sql
from features.events import EventLog

__all__ = ["open_labels", "churn_labels"]


def _ts(value: datetime) -> str:
    return f"TIMESTAMP '{value.isoformat(sep=' ')}'"


def open_labels(log: EventLog, since: datetime, until: datetime, known_at: datetime,
                cfg: Config) -> pd.DataFrame:
    """Sends in (since, until] with ``opened`` as known at ``known_at``.

    ``known_at`` must be at least one attribution window after ``until`` for the labels
    to be complete; callers choose windows so that it is.
    """
    window_h = cfg.labels.open_attribution_hours
    if known_at < until + timedelta(hours=window_h):
        raise ValueError("open labels would be incomplete: known_at is within the window of the last send")
    frame = log.query_df(
        attributed_sends_sql(since, until, known_at, window_h, cfg.slots.kind) + " ORDER BY 1, 2"
    )
    frame["opened"] = frame["opened"].astype(int)
    return frame


def churn_labels(log: EventLog, snapshot: datetime, cfg: Config) -> pd.DataFrame:
    """The churn population at ``snapshot`` with ``churned`` (needs the horizon observed)."""
    lab = cfg.labels
    eng = lab.engagement_sql()
    t = _ts(snapshot)
    frame = log.query_df(
        f"""SELECT user_id,
               count(*) FILTER (WHERE ts > {t}) = 0 AS churned
        FROM events
        WHERE event IN ({eng})
          AND ts >= {t} - INTERVAL {lab.churn_lookback_days} DAY
          AND ts <= {t} + INTERVAL {lab.churn_horizon_days} DAY
        GROUP BY user_id
        HAVING count(*) FILTER (WHERE ts <= {t}) > 0
        ORDER BY user_id"""
    )
    frame["churned"] = frame["churned"].astype(int)
    return frame
