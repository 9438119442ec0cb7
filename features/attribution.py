"""Which sends were opened: the open label of the contract, as SQL over an EventLog.

Features (per-slot open histories) and training labels both use this one definition,
each with its own ``known_at``: a feature as of T may only see opens up to T.
"""

from __future__ import annotations

from datetime import datetime, timedelta

__all__ = ["attributed_sends_sql", "slot_expr"]


def _ts(value: datetime) -> str:
    return f"TIMESTAMP '{value.isoformat(sep=' ')}'"


def slot_expr(kind: str) -> str:
    """SQL for a row's slot in ``events_local``: local hour, or local hour of the week."""
    if kind == "hour_of_day":
        return "local_hour"
    if kind == "hour_of_week":
        return "local_dow * 24 + local_hour"
    raise ValueError(f"unknown slot kind {kind!r}")


def attributed_sends_sql(
    since: datetime,
    until: datetime,
    known_at: datetime,
    window_hours: float,
    slot_kind: str,
) -> str:
    """A query giving every send in (since, until] with its slot and ``opened`` flag.

    A send is opened when an open with its ``message_id`` follows within the window;
    opens without a message id go to the latest send at or before them (DuckDB's ASOF
    join), which is "the first open after the send, before the next send"; so do opens
    whose id names no send of the window before them when that latest send has no id
    itself (a log whose sends carry no ids), while a send with an id is only answered by
    its own id. Only opens at or before ``known_at`` count, so the flag is what one could
    know at that time.

    A send's flag depends only on the events of the attribution window around it (opens
    up to a window after it, sends up to a window before those opens), so the flags of any
    slice of sends equal those of the whole log: the feature state moves from one refresh
    to the next by reading such slices (:mod:`features.state`).
    """
    window = f"INTERVAL '{int(round(window_hours * 3600))} seconds'"
    # nothing after a window past the last send can answer one of them
    horizon = min(known_at, until + timedelta(hours=window_hours))
    return f"""
    WITH s AS (
        SELECT user_id, ts, message_id, {slot_expr(slot_kind)} AS slot, local_hour, local_dow
        FROM events_local
        WHERE event = 'send' AND ts > {_ts(since)} AND ts <= {_ts(until)}
    ),
    o AS (
        SELECT user_id, ts, message_id FROM events
        WHERE event = 'open' AND ts > {_ts(since)} AND ts <= {_ts(horizon)}
    ),
    s_all AS (
        SELECT user_id, ts, message_id FROM events
        WHERE event = 'send' AND ts > {_ts(since)} - {window} AND ts <= {_ts(horizon)}
    ),
    matched AS (        -- opens answering, by id, a send of the window before them
        SELECT o.user_id, o.ts AS o_ts, o.message_id, x.ts AS s_ts
        FROM o JOIN s_all x ON o.user_id = x.user_id AND o.message_id = x.message_id
         AND x.ts <= o.ts AND x.ts >= o.ts - {window}
    ),
    o_by_time AS (
        SELECT o.* FROM o ANTI JOIN matched m
          ON o.user_id = m.user_id AND o.ts = m.o_ts AND o.message_id = m.message_id
    ),
    by_time AS (        -- the rest: the latest send at or before them (only their users' sends)
        SELECT DISTINCT o.user_id, x.ts
        FROM o_by_time o
        ASOF JOIN (SELECT * FROM s_all WHERE user_id IN (SELECT user_id FROM o_by_time)) x
          ON o.user_id = x.user_id AND o.ts >= x.ts
        WHERE o.ts <= x.ts + {window} AND (o.message_id IS NULL OR x.message_id IS NULL)
    ),
    answered AS (SELECT DISTINCT user_id, s_ts AS ts FROM matched UNION SELECT user_id, ts FROM by_time)
    SELECT s.user_id, s.ts, s.slot, s.local_hour, s.local_dow, (a.user_id IS NOT NULL) AS opened
    FROM s LEFT JOIN answered a ON a.user_id = s.user_id AND a.ts = s.ts
    """
