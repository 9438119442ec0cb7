"""Which sends were opened: the open label of the contract, as SQL over an EventLog.

Features (per-slot open histories) and training labels both use this one definition,
each with its own ``known_at``: a feature as of T may only see opens up to T.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import numpy as np

__all__ = ["attributed_sends_sql", "opened_flags", "slot_expr"]


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


# user * span + time must fit in int64 (with room for the window subtracted from it)
_KEY_LIMIT = 2**62


def opened_flags(send_user: np.ndarray, send_ts: np.ndarray, send_msg: np.ndarray, send_has_msg: np.ndarray,
                 open_user: np.ndarray, open_ts: np.ndarray, open_msg: np.ndarray, open_has_msg: np.ndarray,
                 window_us: int) -> np.ndarray:
    """:func:`attributed_sends_sql`'s ``opened`` flag on integer arrays: one flag per send.

    Users are integer codes, times µs, message ids integer codes (a 64-bit hash will do:
    two different ids of one user inside one window collide with odds of 2^-64) with
    ``*_has_msg`` False where the id is missing. Sends must be sorted by (user, ts) and
    opens by user; the sends are those of (since - window, horizon] and the opens those
    of (since, horizon], as in the SQL. The same rules, in the same order: an open answers
    every send of its window with its id; an open that answered none goes to its user's
    latest send at or before it, inside the window, when the open or that send has no id;
    sends at the same (user, ts) share their flag. Where several sends share the latest
    time, the SQL's ASOF join takes any one of them and this the last in the given order:
    they differ only if such tied sends disagree on having an id.

    Each open is binary-searched among its user's sends (user and time folded into one
    sorted int64 key), so this costs a few passes over the arrays, not a join.
    """
    flags = np.zeros(len(send_ts), dtype=bool)
    if not len(send_ts) or not len(open_ts):
        return flags
    if np.any(send_user[1:] < send_user[:-1]) or np.any(open_user[1:] < open_user[:-1]):
        raise ValueError("opened_flags needs sends sorted by (user, ts) and opens by user")
    t0 = int(min(send_ts.min(), open_ts.min())) - int(window_us)
    span = int(max(send_ts.max(), open_ts.max())) - t0 + 1
    per_block = max(1, _KEY_LIMIT // span)
    first_user, last_user = int(min(send_user[0], open_user[0])), int(max(send_user[-1], open_user[-1]))
    for a in range(first_user, last_user + 1, per_block):
        b = a + per_block
        s0, s1 = np.searchsorted(send_user, [a, b])
        o0, o1 = np.searchsorted(open_user, [a, b])
        if s0 == s1 or o0 == o1:
            continue
        flags[s0:s1] = _block_flags(
            (send_user[s0:s1].astype(np.int64) - a) * span + (send_ts[s0:s1] - t0),
            send_msg[s0:s1], send_has_msg[s0:s1],
            (open_user[o0:o1].astype(np.int64) - a) * span + (open_ts[o0:o1] - t0),
            open_msg[o0:o1], open_has_msg[o0:o1], int(window_us))
    return flags


def _block_flags(skey: np.ndarray, smsg: np.ndarray, shas: np.ndarray,
                 okey: np.ndarray, omsg: np.ndarray, ohas: np.ndarray, window_us: int) -> np.ndarray:
    if np.any(skey[1:] < skey[:-1]):
        raise ValueError("opened_flags needs sends sorted by (user, ts)")
    # each open's window of sends, [lo, hi): same user (the key's span exceeds the window), ts in [open - w, open]
    lo = np.searchsorted(skey, okey - window_us, "left")
    hi = np.searchsorted(skey, okey, "right")
    answered = np.zeros(len(skey), dtype=bool)
    matched = np.zeros(len(okey), dtype=bool)
    # by id: every send of the window (a handful per user and day), one offset at a time
    cand = np.flatnonzero(ohas & (hi > lo))
    step = 0
    while len(cand):
        idx = lo[cand] + step
        inside = idx < hi[cand]
        cand, idx = cand[inside], idx[inside]
        same = shas[idx] & (smsg[idx] == omsg[cand])
        answered[idx[same]] = True
        matched[cand[same]] = True
        step += 1
    # by time: the latest send at or before the open, if inside its window
    rest = np.flatnonzero(~matched & (hi > lo))
    latest = hi[rest] - 1
    answered[latest[~ohas[rest] | ~shas[latest]]] = True
    # sends at one (user, ts) share their flag (the SQL keys answered sends by it)
    tied = skey[1:] == skey[:-1]
    if tied.any():
        starts = np.flatnonzero(np.r_[True, ~tied])
        answered = np.repeat(np.logical_or.reduceat(answered, starts), np.diff(np.r_[starts, len(skey)]))
    return answered
