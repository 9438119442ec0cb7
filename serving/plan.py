"""The send plan of a campaign: one send time per audience user inside a window, under the
rules of ``[plan]`` and a capacity per hour, with the most expected opens, a share of
logged exploration, and the reason for every user left out (contract: "Send plan").

    audience (tags WHERE ... | ids) ─┐
    time zones (feature snapshot) ───┼─> candidates per zone ─> rules (plan_rules) ─> edges
    history (event log) ─────────────┘        user x hour edges ─> exploration + optimiser
                                                                 (plan_solver) ─> rows

:func:`plan_users` is the pure core (arrays in, rows out) that ``POST /plan`` calls on a
bounded list of users; :func:`plan_campaign` reads the audience from the tag store.

Exploration and ``propensity``. Each user with an allowed hour explores with probability
``eps``: their hour is drawn uniformly from their k allowed send times. Explorers claim
capacity first; where they alone overflow an hour, a random subset of them as large as
the capacity is kept (the others get ``capacity``). The optimiser then plans everyone
else in the room left. A row's propensity is the probability that this policy sends the
user at the row's slot, given everyone else's draws:

    propensity = (1 - eps) * [greedy slot == slot] + eps / k * sum_{allowed times t at that
                 slot} keep(t)

with keep(t) = min(1, capacity / explorers in t's hour, counting the user) and the greedy
slot the optimiser's choice for the user (for an explorer, their best time at the
optimiser's final hour prices, which is what the optimiser gives a user it plans: one
user more or less hardly moves the prices). Without a capacity keep is 1, so an
exploiting row has (1 - eps) + eps/k and an explored one eps/k (or the former when the
draw hit the greedy slot).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import numpy as np
import pandas as pd

from configs import Config, SendtimeError
from features.events import EventLog
from serving.plan_rules import Candidates, PlanHistory, check_rules, window_candidates
from serving.plan_solver import Assignment, Options, assign, push_forward

__all__ = [
    "PLAN_COLUMNS",
    "REASONS",
    "PlanError",
    "PlanResult",
    "plan_campaign",
    "plan_users",
    "read_audience",
]

log = logging.getLogger(__name__)

PLAN_COLUMNS = ["user_id", "send_at", "slot", "expected_open_prob", "propensity", "reason"]
REASONS = (
    "unsubscribed",
    "quota",
    "frequency_cap",
    "silenced",
    "quiet_hours",
    "capacity",
    "low_value",
    "no_prediction",
)


class PlanError(SendtimeError, ValueError):
    """A plan that cannot be made as asked (no tags, a bad audience, a bad window)."""


@dataclass
class PlanResult:
    """``rows``: one per user (PLAN_COLUMNS, then ``channel`` and ``explored``);
    ``by_hour``: sends and expected opens per hour of the window for the plan and both
    baselines beside the capacity; ``summary``: the totals, the solver and the timings."""

    rows: pd.DataFrame
    by_hour: pd.DataFrame
    summary: dict = field(default_factory=dict)
    # the baselines' sends under the same rules and capacity: user_id, send_at, slot,
    # expected_open_prob (keys "global_best" and "own_best")
    baselines: dict[str, pd.DataFrame] = field(default_factory=dict)


def _utc(value: datetime) -> datetime:
    return (
        value.replace(tzinfo=timezone.utc)
        if value.tzinfo is None
        else value.astimezone(timezone.utc)
    )


def _zones(timezones: Sequence[str | None], default: str) -> np.ndarray:
    raw = pd.Series(list(timezones), dtype=object).fillna(default).astype(str)
    good = {}
    for zone in raw.unique():
        try:
            ZoneInfo(zone)
            good[zone] = zone
        except (ZoneInfoNotFoundError, ValueError):
            good[zone] = default
    return raw.map(good).to_numpy(dtype=object)


def _edges(values: np.ndarray, allowed: np.ndarray, bucket: np.ndarray) -> tuple[np.ndarray, ...]:
    """Flat (user, candidate column) edges, one per (user, hour of the window): the most
    valuable when two send times of a user share an hour (half-hour zones)."""
    user, col = np.nonzero(allowed)
    b = bucket[user, col]
    v = values[user, col]
    order = np.lexsort((-v, b, user))
    user, col, b, v = user[order], col[order], b[order], v[order]
    first = np.ones(len(user), dtype=bool)
    first[1:] = (user[1:] != user[:-1]) | (b[1:] != b[:-1])
    return user[first], col[first], b[first], v[first]


def plan_users(
    user_ids: Sequence[str],
    slot_open_probs: np.ndarray,
    timezones: Sequence[str | None],
    window_start: datetime,
    cfg: Config,
    *,
    window_hours: int | None = None,
    history: PlanHistory | None = None,
    unsubscribed: np.ndarray | None = None,
    channel: str | None = None,
    capacity_per_hour: int | None = None,
    explore: float | None = None,
    min_open_prob: float | None = None,
    seed: int = 0,
) -> PlanResult:
    """Plan one send per user inside [window_start, window_start + window_hours).

    ``slot_open_probs``: (n, n_slots) predicted open probabilities (a row of NaN: no
    prediction); ``timezones``: IANA names (None or unknown: the configured default);
    ``history``: what the event log says (:func:`serving.plan_rules.load_history`; None:
    nobody has history); ``unsubscribed``: (n,) bool. Options left None come from
    ``cfg.plan``; ``capacity_per_hour`` 0 means no limit.
    """
    t0 = time.perf_counter()
    plan = cfg.plan
    hours = int(window_hours or plan.default_window_hours)
    channel = channel or plan.default_channel
    eps = plan.explore if explore is None else float(explore)
    floor = plan.min_open_prob if min_open_prob is None else float(min_open_prob)
    cap_n = plan.capacity_per_hour if capacity_per_hour is None else int(capacity_per_hour)
    if not 0 <= eps <= 1:
        raise PlanError(f"--explore: {eps} is not a share between 0 and 1")
    if hours < 1:
        raise PlanError(f"--window-hours: {hours} must be at least 1")
    if cap_n < 0:
        raise PlanError(f"--capacity-per-hour: {cap_n} must be 0 (no limit) or more")
    start = _utc(window_start).replace(microsecond=0)
    ids = np.asarray(list(user_ids), dtype=object)
    n = len(ids)
    probs = (
        np.asarray(slot_open_probs, dtype=np.float64).reshape(n, -1)
        if n
        else np.zeros((0, cfg.slots.n_slots))
    )
    zones = _zones(timezones, cfg.slots.default_timezone) if n else np.zeros(0, dtype=object)
    distinct = sorted(set(zones)) or [cfg.slots.default_timezone]
    cand = window_candidates(distinct, start, hours, cfg.slots.kind)
    zone_index = pd.Index(distinct).get_indexer(zones) if n else np.zeros(0, dtype=np.int64)
    reason = np.full(n, None, dtype=object)
    if unsubscribed is not None:
        reason[np.asarray(unsubscribed, dtype=bool)] = "unsubscribed"
    reason[(reason == None) & np.isnan(probs).all(axis=1)] = "no_prediction"  # noqa: E711
    checked = check_rules(cand, zone_index, ids, zones, history, cfg, channel)
    slots = cand.slot[zone_index]
    values = np.take_along_axis(probs, slots, axis=1) if n else np.zeros((0, cand.width))
    allowed = checked.allowed & ~np.isnan(values) & (reason == None)[:, None]  # noqa: E711
    rule_reason = (reason == None) & ~allowed.any(axis=1)  # noqa: E711
    reason[rule_reason] = checked.reason[rule_reason]
    reason[rule_reason & (checked.reason == None)] = "no_prediction"  # noqa: E711
    best_allowed = np.where(allowed, values, -np.inf).max(axis=1) if n else np.zeros(0)
    low = allowed.any(axis=1) & ((best_allowed < floor) | (best_allowed <= 0))
    reason[low] = "low_value"
    allowed[low] = False
    t_rules = time.perf_counter() - t0

    user, col, bucket, value = _edges(values, allowed, cand.bucket[zone_index])
    opts = Options(user, bucket, value, n, hours)
    capacity = np.full(hours, float(cap_n) if cap_n else np.inf)
    rng = np.random.default_rng(seed)
    chosen, explored, greedy_edge, n_explore, result = _explore_and_assign(
        opts, capacity, eps, rng, cfg
    )
    sent = chosen >= 0
    has_edges = np.zeros(n, dtype=bool)
    has_edges[opts.seg_user] = True
    reason[has_edges & ~sent] = "capacity"
    edge_slot = slots[user, col] if len(user) else np.zeros(0, dtype=np.int64)
    propensity = _propensity(
        opts, edge_slot, chosen, explored, greedy_edge, n_explore, capacity, eps
    )

    rows = pd.DataFrame({"user_id": ids})
    e = chosen[sent]
    send_seconds = np.full(n, np.iinfo(np.int64).min)
    send_seconds[sent] = cand.seconds[zone_index[sent], col[e]]
    rows["send_at"] = pd.to_datetime(np.where(sent, send_seconds, 0), unit="s", utc=True).where(
        sent
    )
    slot_col = np.full(n, -1)
    slot_col[sent] = edge_slot[e]
    rows["slot"] = pd.array(np.where(sent, slot_col, 0), dtype="Int64")
    rows.loc[~sent, "slot"] = pd.NA
    exp_prob = np.full(n, np.nan)
    exp_prob[sent] = value[e]
    rows["expected_open_prob"] = exp_prob
    rows["propensity"] = np.where(sent, propensity, np.nan)
    rows["reason"] = pd.Series(reason, dtype=object)
    rows["channel"] = channel
    rows["explored"] = explored & sent

    # the baselines: the same edges and capacity, a scheduler that holds overflow over
    queue = rng.permutation(n)
    global_score = (
        np.nanmean(np.where(np.isnan(probs).all(axis=1)[:, None], np.nan, probs), axis=0)
        if n and not np.isnan(probs).all()
        else np.zeros(probs.shape[1])
    )
    global_score = np.nan_to_num(global_score, nan=-1.0)
    desired_global = _desired(opts, global_score[edge_slot] if len(user) else np.zeros(0))
    desired_own = _desired(opts, value)
    base_global = push_forward(opts, desired_global, capacity, queue)
    base_own = push_forward(opts, desired_own, capacity, queue)
    by_hour = _by_hour(
        cand, opts, capacity, {"plan": chosen, "global_best": base_global, "own_best": base_own}
    )
    summary = {
        "users": n,
        "planned": int(sent.sum()),
        "explored": int((explored & sent).sum()),
        "expected_opens": float(value[e].sum()),
        "global_best_expected_opens": float(value[base_global[base_global >= 0]].sum()),
        "own_best_expected_opens": float(value[base_own[base_own >= 0]].sum()),
        "reasons": {r: int((reason == r).sum()) for r in REASONS if (reason == r).any()},
        "solver": result.method,
        "solver_gap": result.gap,
        "solver_seconds": result.seconds,
        "window_start": start.isoformat(),
        "window_hours": hours,
        "channel": channel,
        "capacity_per_hour": cap_n,
        "explore": eps,
        "min_open_prob": floor,
        "rules_seconds": t_rules,
        "plan_seconds": time.perf_counter() - t0,
    }
    baselines = {}
    for name, choice in (("global_best", base_global), ("own_best", base_own)):
        got = np.flatnonzero(choice >= 0)
        edge = choice[got]
        baselines[name] = pd.DataFrame(
            {
                "user_id": ids[got],
                "send_at": pd.to_datetime(
                    cand.seconds[zone_index[got], col[edge]], unit="s", utc=True
                ),
                "slot": edge_slot[edge],
                "expected_open_prob": value[edge],
            }
        )
    return PlanResult(rows=rows, by_hour=by_hour, summary=summary, baselines=baselines)


def _desired(opts: Options, score: np.ndarray) -> np.ndarray:
    desired = np.full(opts.n_users, -1, dtype=np.int64)
    if opts.n_edges:
        best, _ = opts.seg_argmax(score)
        desired[opts.seg_user] = best
    return desired


def _explore_and_assign(
    opts: Options, capacity: np.ndarray, eps: float, rng: np.random.Generator, cfg: Config
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, Assignment]:
    """Explorers first (uniform over their edges, kept at random where they overflow an
    hour), then the optimiser on everyone else in the room left."""
    n = opts.n_users
    chosen = np.full(n, -1, dtype=np.int64)
    explored = np.zeros(n, dtype=bool)
    k = np.diff(np.append(opts.seg_start, opts.n_edges))
    coin = rng.random(len(opts.seg_start)) < eps
    pick = opts.seg_start + np.minimum((rng.random(len(k)) * k).astype(np.int64), k - 1)
    explorers = opts.seg_user[coin]
    explored[explorers] = True
    x_edges = pick[coin]
    x_bucket = opts.bucket[x_edges]
    n_explore = np.bincount(x_bucket, minlength=opts.n_buckets).astype(np.float64)
    # where explorers alone overflow an hour, keep a random subset as large as the capacity
    priority = rng.random(len(x_edges))
    order = np.lexsort((priority, x_bucket))
    first_of = np.searchsorted(x_bucket[order], x_bucket[order], side="left")
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order)) - first_of
    kept = rank < capacity[x_bucket]
    chosen[explorers[kept]] = x_edges[kept]
    room = capacity - np.bincount(x_bucket[kept], minlength=opts.n_buckets)
    exploit_edges = np.flatnonzero(~coin[opts.seg_id])
    sub = opts.subset(exploit_edges)
    result = assign(
        sub,
        room,
        gap_tolerance=cfg.plan.solver_gap_tolerance,
        exact_max_vars=cfg.plan.solver_exact_max_vars,
        progress_log=n > 100_000,
        seed=int(rng.integers(2**31)),
    )
    got = result.choice >= 0
    chosen[np.flatnonzero(got)] = exploit_edges[result.choice[got]]
    # the greedy slot of an explorer: their best edge at the optimiser's final prices
    greedy_edge = np.full(n, -1, dtype=np.int64)
    greedy_edge[~explored & (chosen >= 0)] = chosen[~explored & (chosen >= 0)]
    if len(explorers):
        x_opts = opts.subset(np.flatnonzero(coin[opts.seg_id]))
        best, _ = x_opts.seg_argmax(x_opts.value - result.prices[x_opts.bucket])
        greedy_edge[x_opts.seg_user] = np.flatnonzero(coin[opts.seg_id])[best]
    return chosen, explored, greedy_edge, n_explore, result


def _propensity(
    opts: Options,
    edge_slot: np.ndarray,
    chosen: np.ndarray,
    explored: np.ndarray,
    greedy_edge: np.ndarray,
    n_explore: np.ndarray,
    capacity: np.ndarray,
    eps: float,
) -> np.ndarray:
    """The probability that the policy sent each user at their chosen slot (module doc)."""
    out = np.full(opts.n_users, np.nan)
    if not opts.n_edges:
        return out
    target = np.full(opts.n_users, -1, dtype=np.int64)
    sent = chosen >= 0
    target[sent] = edge_slot[chosen[sent]]
    user = opts.user
    same = sent[user] & (edge_slot == target[user])
    # explorers in each hour had this user explored into it: the user counts once, either
    # among them already (an explorer's own draw) or on top of them
    own_draw = explored[user] & (np.arange(opts.n_edges) == chosen[user])
    crowd = n_explore[opts.bucket] + np.where(own_draw, 0.0, 1.0)
    keep = np.minimum(1.0, capacity[opts.bucket] / crowd)
    k = np.diff(np.append(opts.seg_start, opts.n_edges))
    k_of = np.zeros(opts.n_users)
    k_of[opts.seg_user] = k
    explore_part = np.bincount(user[same], weights=keep[same], minlength=opts.n_users)
    greedy_same = np.zeros(opts.n_users, dtype=bool)
    has = greedy_edge >= 0
    greedy_same[has] = edge_slot[greedy_edge[has]] == target[has]
    prob = (1 - eps) * greedy_same + eps * explore_part / np.maximum(k_of, 1)
    out[sent] = prob[sent]
    return out


def _by_hour(
    cand: Candidates, opts: Options, capacity: np.ndarray, plans: dict[str, np.ndarray]
) -> pd.DataFrame:
    frame = pd.DataFrame(
        {
            "hour_start": cand.bucket_starts(),
            "capacity": np.where(np.isfinite(capacity), capacity, np.nan),
        }
    )
    for name, choice in plans.items():
        e = choice[choice >= 0]
        frame[f"{name}_sends"] = np.bincount(opts.bucket[e], minlength=opts.n_buckets)
        frame[f"{name}_expected_opens"] = np.bincount(
            opts.bucket[e], weights=opts.value[e], minlength=opts.n_buckets
        )
    return frame


def read_audience(
    serving_dir: Path,
    *,
    where: str | None = None,
    user_ids: Sequence[str] | None = None,
    n_slots: int | None = None,
    tag_store_url: str | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The audience from the current tag store: ids, (n, n_slots) open probabilities (NaN
    rows: no prediction), time zones (from the feature snapshot) and the unsubscribed flag.

    ``where``: a SQL condition over the ``tags`` table; ``user_ids``: a list (ids the tags
    do not know come back with no prediction). Neither: every user in the tags.
    ``tag_store_url``: read the PostgreSQL tag store instead of the DuckDB one under
    ``serving_dir`` (the same condition gives the same audience, in the same order).
    """
    if tag_store_url:
        ids, probs, zones, unsub, known = _audience_from_postgres(tag_store_url, where, user_ids, n_slots)
    else:
        ids, probs, zones, unsub, known = _audience_from_duckdb(Path(serving_dir), where, user_ids, n_slots)
    if user_ids is not None:
        # listed ids the tags do not hold at all come back with no prediction; ids the
        # condition left out stay out
        missing = [u for u in dict.fromkeys(user_ids) if u not in known]
        if missing:
            width = probs.shape[1]
            ids = np.concatenate([ids, np.asarray(missing, dtype=object)])
            probs = np.vstack([probs, np.full((len(missing), width), np.nan)])
            zones = np.concatenate([zones, np.full(len(missing), None, dtype=object)])
            unsub = np.concatenate([unsub, np.zeros(len(missing), dtype=bool)])
    return ids, probs, zones, unsub


def _audience_from_duckdb(serving_dir: Path, where: str | None, user_ids: Sequence[str] | None,
                          n_slots: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, set]:
    import duckdb
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from serving.tagstore import current_refresh

    paths = current_refresh(serving_dir)
    if paths is None:
        raise PlanError(f"no tags under {serving_dir}: run `sendtime score` first")
    condition = f"({where})" if where else "true"
    params: list = []
    if user_ids is not None:
        condition += " AND user_id IN (SELECT unnest(?))"
        params.append(list(dict.fromkeys(user_ids)))
    zones_table = (pq.read_table(paths.features, columns=["user_id", "timezone"]) if paths.features.exists()
                   else pa.table({"user_id": pa.array([], pa.string()), "timezone": pa.array([], pa.string())}))
    # like `sendtime tags`: the audience's SQL cannot read or write files
    con = duckdb.connect(str(paths.store), read_only=True,
                         config={"enable_external_access": False, "lock_configuration": True})
    try:
        con.register("zones", zones_table)
        table = con.sql(
            f"""WITH t AS (SELECT * FROM tags WHERE {condition})
                SELECT t.user_id, t.slot_open_probs, t.unsubscribed, f.timezone
                FROM t LEFT JOIN zones f ON f.user_id = t.user_id
                ORDER BY t.user_id""",
            params=params or None,
        ).to_arrow_table()
        known: set = set()
        if user_ids is not None:
            known = set(con.sql("SELECT user_id FROM tags WHERE user_id IN (SELECT unnest(?))",
                                params=[list(dict.fromkeys(user_ids))]).to_arrow_table()
                        .column("user_id").to_pylist())
    except duckdb.Error as exc:
        raise PlanError(
            f"--audience: {where!r} is not a condition over the tags: {str(exc).splitlines()[0]}"
        ) from exc
    finally:
        con.close()
    ids = np.asarray(table.column("user_id").to_pylist(), dtype=object)
    lists = table.column("slot_open_probs").combine_chunks()
    width = n_slots or (
        int(pc.max(pc.list_value_length(lists)).as_py() or 24) if len(lists) else 24
    )
    probs = np.full((len(ids), width), np.nan)
    valid = lists.is_valid().to_numpy(zero_copy_only=False)
    if valid.any():
        probs[valid] = (
            lists.flatten().to_numpy(zero_copy_only=False).astype(np.float64).reshape(-1, width)
        )
    zones = np.asarray(table.column("timezone").to_pylist(), dtype=object)
    unsub = np.asarray(table.column("unsubscribed").fill_null(False).to_pylist(), dtype=bool)
    return ids, probs, zones, unsub, known


def _audience_from_postgres(url: str, where: str | None, user_ids: Sequence[str] | None,
                            n_slots: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, set]:
    """The same audience from the PostgreSQL tag store, in one read-only transaction (so a
    publish cannot swap the tables between the audience and the listed ids)."""
    from serving.pg_tagstore import TagStoreError, audience_query, decode_float_arrays, read_rows_pg
    from serving.tagstore import TagQueryError

    listed = list(dict.fromkeys(user_ids)) if user_ids is not None else None
    queries = [(audience_query(where or "true", listed is not None), listed)]
    if listed is not None:
        queries.append(("SELECT user_id FROM tags WHERE user_id = ANY($1)", listed))
    try:
        results = read_rows_pg(url, queries, binary=True)
    except TagStoreError as exc:
        raise PlanError(str(exc)) from exc
    except TagQueryError as exc:
        reason = str(exc).removeprefix("tags query failed: ")
        raise PlanError(f"--audience: {where!r} is not a condition over the tags: {reason}") from exc
    rows = results[0][1]
    ids = np.asarray([r[0] for r in rows], dtype=object)
    probs = decode_float_arrays([r[1] for r in rows], n_slots)
    zones = np.asarray([r[3] for r in rows], dtype=object)
    unsub = np.asarray([bool(r[2]) for r in rows], dtype=bool)
    known = {r[0] for r in results[1][1]} if listed is not None else set()
    return ids, probs, zones, unsub, known


def plan_campaign(
    cfg: Config,
    window_start: datetime,
    *,
    serving_dir: Path | None = None,
    audience: str | None = None,
    user_ids: Sequence[str] | None = None,
    log_: EventLog | None = None,
    tag_store_url: str | None = None,
    **options,
) -> PlanResult:
    """``sendtime plan``: the audience from the tag store (the PostgreSQL one at
    ``tag_store_url`` when given), the history from the event log (when given), then
    :func:`plan_users` with ``options`` (window_hours, channel, capacity_per_hour, explore,
    min_open_prob, seed)."""
    from serving.plan_rules import load_history

    t0 = time.perf_counter()
    ids, probs, zones, unsub = read_audience(
        Path(serving_dir or cfg.serving.serving_dir),
        where=audience,
        user_ids=user_ids,
        n_slots=cfg.slots.n_slots,
        tag_store_url=tag_store_url,
    )
    t_audience = time.perf_counter() - t0
    log.info("audience: %d users read in %.1f s", len(ids), t_audience)
    history = None
    if log_ is not None:
        t1 = time.perf_counter()
        history = load_history(
            log_, window_start, options.get("window_hours") or cfg.plan.default_window_hours, cfg
        )
        log.info(
            "history of %d users, %d recent sends, in %.1f s",
            len(history.users),
            len(history.sends),
            time.perf_counter() - t1,
        )
    result = plan_users(
        ids, probs, zones, window_start, cfg, history=history, unsubscribed=unsub, **options
    )
    result.summary["audience_seconds"] = t_audience
    result.summary["total_seconds"] = time.perf_counter() - t0
    return result
