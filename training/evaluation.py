"""Active hours where a log has no opens (a purchases-only log): predicted hours beside
the hours customers actually came back in the month after."""

from __future__ import annotations

from datetime import datetime, timedelta

import numpy as np
import pandas as pd

from configs import Config
from features.events import EventLog
from features.matrix import circular_smooth, slot_counts, user_universe

__all__ = ["active_hours_report"]


def active_hours_report(log: EventLog, cfg: Config, as_of: datetime | None = None,
                        horizon_days: int = 30, top_k: int = 3, prior_weight: float = 5.0) -> pd.DataFrame:
    """Where there are no opens (a purchases-only log): each customer's predicted active
    hours as of T beside the hours they actually purchased in the month after T.

    A customer's active hours are their hour histogram of activity up to T (sessions,
    purchases, opens) shrunk toward the population's (``prior_weight`` pseudo-events) and
    smoothed over neighbouring hours. Reported over the purchases after T: how often the
    hour is among the customer's predicted top-k, beside the population's top-k.
    """
    as_of = as_of or (log.max_ts() - timedelta(days=horizon_days))
    ids = user_universe(log, as_of).index
    counts = slot_counts(log, as_of, cfg, ids)
    activity = counts.sessions + counts.opens_at + counts.purchases_at
    population = activity.sum(axis=0) / max(activity.sum(), 1.0)
    personal = circular_smooth(activity + prior_weight * population, cfg.features.circular_kernel)
    end = as_of + timedelta(days=horizon_days)
    after = log.query_df(
        f"""SELECT user_id, local_hour FROM events_local
        WHERE event = 'purchase' AND ts > TIMESTAMP '{as_of.isoformat(sep=' ')}'
          AND ts <= TIMESTAMP '{end.isoformat(sep=' ')}'""")
    pos = ids.get_indexer(after["user_id"])
    hours = after["local_hour"].to_numpy() % 24
    seen = pos >= 0
    had_activity = np.zeros(len(pos), dtype=bool)
    had_activity[seen] = activity[pos[seen]].sum(axis=1) > 0
    top = np.argsort(-personal, axis=1)[:, :top_k] % 24
    hit = np.zeros(len(pos), dtype=bool)
    hit[seen] = (top[pos[seen]] == hours[seen, None]).any(axis=1)
    base = np.isin(hours, np.argsort(-population)[:top_k] % 24)
    rows = []
    for name, mask in (("customers with history", had_activity), ("new customers", ~had_activity)):
        if mask.any():
            rows.append({"group": name, "purchases": int(mask.sum()),
                         "customers": int(after["user_id"][mask].nunique()),
                         f"in_predicted_top{top_k}": float(hit[mask].mean()) if name != "new customers"
                         else float(base[mask].mean()),
                         f"in_population_top{top_k}": float(base[mask].mean())})
    return pd.DataFrame(rows)
