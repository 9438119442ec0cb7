"""Active hours where a log has no opens (purchases only, app sessions only): the predicted
hours as of T (:mod:`features.active_hours`) checked on the engagement of the month after,
beside each user's own most frequent past hours and the population's top hours."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import numpy as np
import pandas as pd

from configs import Config
from features.active_hours import ActiveHours, engagement_after, predict_active_hours, top_hours_hits
from features.events import EventLog

__all__ = ["ActiveHoursReport", "active_hours_report"]


@dataclass
class ActiveHoursReport:
    """The predicted hours and, when the log goes on after T, how they held up.

    ``table``: one row per way of choosing the hours (predicted, own, population, and the
    population's for new users), with the share of the checked events that fell in them."""

    hours: ActiveHours
    horizon_days: int
    table: pd.DataFrame
    note: str            # why nothing was checked; empty when something was
    end_of_log: datetime | None
    zone_note: str = ""  # every user read in the default zone: say which

    def to_text(self) -> str:
        h, k = self.hours, self.hours.top_hours.shape[1]
        with_history = int(np.count_nonzero(h.n_events))
        kinds = ", ".join(f"{e} {n:,}" for e, n in h.events_by_kind.items())
        lines = [
            f"active hours as of {h.as_of:%Y-%m-%d %H:%M} UTC (local hours of each user): {with_history:,} users "
            f"with engagement up to then ({kinds})",
            f"predictor: {h.choice.describe()}",
            f"population's top {k} hours: {', '.join(str(int(x)) for x in h.population_top)}",
        ] + ([self.zone_note] if self.zone_note else [])
        if len(self.table):
            lines.append(f"share of the next {self.horizon_days} days' engagement events that fell in the hours:")
            table = self.table.copy()
            table["share"] = table["share"].map(lambda v: f"{v:.3f}")
            lines.append(table.to_string(index=False))
        return "\n".join(lines + ([self.note] if self.note else []))


def active_hours_report(log: EventLog, cfg: Config, as_of: datetime | None = None,
                        horizon_days: int | None = None, top_k: int | None = None) -> ActiveHoursReport:
    """Each user's predicted active hours as of T (default: ``horizon_days`` before the last
    event) and the share of the engagement events in (T, T + horizon] that fell in them,
    for users with history up to T, beside the same share for their own ``top_k`` most
    frequent past hours and for the population's ``top_k``; new users get the population's.

    Raises :class:`features.active_hours.NothingToPredictError` when the log has no
    engagement event up to T; with nothing after T, the report says so instead of a table.
    """
    horizon = horizon_days or cfg.active_hours.check_days
    last = log.max_ts()
    as_of = as_of or (last - timedelta(days=horizon) if last is not None else None)
    if as_of is None:
        as_of = datetime.now()
    hours = predict_active_hours(log, as_of, cfg, top_k=top_k)
    zoned = log.query_df("SELECT count(*) AS n FROM users WHERE timezone IS NOT NULL")["n"].iloc[0]
    zone_note = ("" if zoned else f"every user's hours are local hours of {log.default_timezone} (no time zone in --users)"
                 + (": if they live elsewhere, pass --timezone (in a zone with daylight saving, their UTC hours move by "
                    "one twice a year)" if log.default_timezone == "UTC" else ""))
    end = as_of + timedelta(days=horizon)
    after = engagement_after(log, as_of, end, cfg)
    k = hours.top_hours.shape[1]
    empty = pd.DataFrame(columns=["hours", "share", "events", "users"])
    if not len(after):
        why = ("the log ends at or before T" if last is None or last <= as_of
               else f"no engagement event in ({as_of:%Y-%m-%d %H:%M}, {end:%Y-%m-%d %H:%M}]")
        return ActiveHoursReport(hours, horizon, empty, f"nothing after T to check the hours against: {why} "
                                 f"(pass an earlier --as-of to check them)", last, zone_note)
    known = hours.user_ids.get_indexer(after["user_id"]) >= 0
    old, new = after[known], after[~known]
    population = np.broadcast_to(hours.population_top, (len(hours.user_ids), k))
    rows = []
    if len(old):
        users = int(old["user_id"].nunique())
        for name, top in ((f"predicted top {k}", hours.top_hours),
                          (f"each user's own {k} most frequent past hours", hours.own_top_hours),
                          (f"population's top {k}", population)):
            hit, n = top_hours_hits(top, hours.user_ids, old)
            rows.append({"hours": f"{name} (users with history)", "share": hit / n, "events": n, "users": users})
    if len(new):
        new_ids = pd.Index(new["user_id"].unique())
        hit, n = top_hours_hits(np.broadcast_to(hours.population_top, (len(new_ids), k)), new_ids, new)
        rows.append({"hours": f"population's top {k} (new users)", "share": hit / n, "events": n,
                     "users": len(new_ids)})
    note = "" if len(old) else (f"nothing to check the predictions against: none of the {int(after['n'].sum()):,} "
                                f"engagement events after T is by a user with history up to T")
    return ActiveHoursReport(hours, horizon, pd.DataFrame(rows), note, last, zone_note)
