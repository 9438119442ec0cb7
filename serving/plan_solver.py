"""One send per user, at most ``capacity`` sends per hour: the assignment that maximises
the expected opens, and the two baselines a plan is shown beside.

The problem is a transportation problem (users supply one send each, hours take at most
their capacity, a user x hour edge earns its open probability); its constraint matrix is
totally unimodular, so the linear programme has an integral optimum. A million users make
~14 million edges: too many for a general solver, few enough for prices. The method:

1. **Dual prices.** The LP dual is ``min sum_i max(0, max_h v_ih - p_h) + sum_h C_h p_h``
   over one price ``p_h >= 0`` per hour: a convex function of 24-169 numbers. Its entropic
   smoothing is minimised with L-BFGS-B at decreasing temperatures.
2. **A plan from the prices.** Users propose their best hour at those prices; an hour with
   more proposals than room keeps those who would lose most by moving; the rest propose
   again. Capacity left over goes to the remaining users by open probability.
3. **A certificate.** The dual at the prices bounds every plan from above, so
   ``bound - value`` bounds how far this plan is from the optimum.
4. **Exact where it matters.** An edge whose reduced cost exceeds that gap is in no
   optimal plan (reduced-cost fixing); the users left with a choice are handed to HiGHS
   (scipy's ``linprog``), whose answer is then optimal for the whole problem.

:func:`solve_exact` runs HiGHS on everything: the reference the tests compare against.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

__all__ = ["Assignment", "Options", "assign", "push_forward", "solve_exact"]

log = logging.getLogger(__name__)


@dataclass
class Options:
    """The allowed user x hour edges, sorted by user then hour, one per (user, hour).

    ``user`` indexes the plan's users (0..n_users-1); users without an edge are simply
    absent. ``value``: the edge's expected open probability.
    """

    user: np.ndarray
    bucket: np.ndarray
    value: np.ndarray
    n_users: int
    n_buckets: int
    seg_user: np.ndarray = field(init=False, repr=False)
    seg_start: np.ndarray = field(init=False, repr=False)
    seg_id: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.user = np.asarray(self.user, dtype=np.int64)
        self.bucket = np.asarray(self.bucket, dtype=np.int64)
        self.value = np.asarray(self.value, dtype=np.float64)
        change = np.ones(len(self.user), dtype=bool)
        change[1:] = self.user[1:] != self.user[:-1]
        self.seg_start = np.flatnonzero(change)
        self.seg_user = self.user[self.seg_start]
        self.seg_id = np.cumsum(change) - 1

    @property
    def n_edges(self) -> int:
        return len(self.user)

    def seg_max(self, x: np.ndarray) -> np.ndarray:
        return np.maximum.reduceat(x, self.seg_start) if len(x) else np.zeros(0)

    def seg_argmax(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per user with edges: the first edge of highest ``x``, and that value."""
        best = self.seg_max(x)
        hit = np.flatnonzero(x == best[self.seg_id])
        first = np.ones(len(hit), dtype=bool)
        first[1:] = self.seg_id[hit[1:]] != self.seg_id[hit[:-1]]
        out = np.empty(len(self.seg_start), dtype=np.int64)
        out[self.seg_id[hit[first]]] = hit[first]
        return out, best

    def subset(self, edges: np.ndarray) -> "Options":
        return Options(
            self.user[edges], self.bucket[edges], self.value[edges], self.n_users, self.n_buckets
        )


@dataclass
class Assignment:
    """``choice[i]``: the edge user i is sent on, or -1."""

    choice: np.ndarray
    prices: np.ndarray
    value: float
    bound: float
    method: str
    seconds: float = 0.0
    exact_users: int = 0

    @property
    def gap(self) -> float:
        """Relative distance to the dual bound: an upper bound on the distance to the optimum."""
        return max(self.bound - self.value, 0.0) / self.bound if self.bound > 0 else 0.0


def _loads(opts: Options, choice: np.ndarray) -> np.ndarray:
    chosen = choice[choice >= 0]
    return np.bincount(opts.bucket[chosen], minlength=opts.n_buckets).astype(np.float64)


def dual_bound(opts: Options, prices: np.ndarray, capacity: np.ndarray) -> float:
    """The LP dual at ``prices``: an upper bound on the expected opens of every plan."""
    u = np.maximum(opts.seg_max(opts.value - prices[opts.bucket]), 0.0)
    finite = np.isfinite(capacity)
    return float(u.sum() + (capacity[finite] * prices[finite]).sum())


def _minimise_dual(
    opts: Options,
    capacity: np.ndarray,
    z: np.ndarray,
    taus: np.ndarray,
    progress_log: bool,
    maxiter: int = 60,
) -> np.ndarray:
    from scipy.optimize import minimize

    fin = np.flatnonzero(np.isfinite(capacity))
    cap = capacity[fin]
    prices = np.zeros(opts.n_buckets)
    for tau in taus:

        def dual(zz: np.ndarray, tau: float = tau) -> tuple[float, np.ndarray]:
            prices[fin] = zz
            x = opts.value - prices[opts.bucket]
            m = np.maximum(opts.seg_max(x), 0.0)
            # below e^-40 a term is nothing; clipping spares exp the slow subnormal path
            e = np.exp(np.maximum((x - m[opts.seg_id]) / tau, -40.0))
            s = np.add.reduceat(e, opts.seg_start) + np.exp(np.maximum(-m / tau, -40.0))
            f = float((m + tau * np.log(s)).sum() + cap @ zz)
            load = np.bincount(opts.bucket, weights=e / s[opts.seg_id], minlength=opts.n_buckets)
            return f, cap - load[fin]

        res = minimize(
            dual,
            z,
            jac=True,
            method="L-BFGS-B",
            bounds=[(0, None)] * len(fin),
            options={"maxiter": maxiter, "gtol": 0.5, "ftol": 1e-12},
        )
        z = res.x
        if progress_log:
            log.info(
                "prices at temperature %.2g over %d users: dual %.1f after %d evaluations",
                tau,
                len(opts.seg_start),
                res.fun,
                res.nfev,
            )
    return z


def _sample_prices(
    opts: Options,
    capacity: np.ndarray,
    progress_log: bool,
    rng: np.random.Generator,
    sample_users: int = 200_000,
) -> np.ndarray | None:
    """Prices from a sample of users with capacity scaled to it: the prices of a large
    audience hardly depend on which of its users are in it. None for small audiences."""
    n_seg = len(opts.seg_start)
    if n_seg <= 2 * sample_users:
        return None
    users = np.flatnonzero(rng.random(n_seg) < sample_users / n_seg)
    sample = opts.subset(np.flatnonzero(np.isin(opts.seg_id, users)))
    sample_cap = np.where(np.isfinite(capacity), capacity * len(users) / n_seg, np.inf)
    return _minimise_dual(
        sample,
        sample_cap,
        np.zeros(int(np.isfinite(capacity).sum())),
        _temperatures(opts),
        progress_log,
    )


def _temperatures(opts: Options) -> np.ndarray:
    scale = float(opts.seg_max(opts.value).mean()) or 1.0
    return scale * np.array([1e-2, 1e-3, 1e-4])


def _plan_at(
    opts: Options, prices: np.ndarray, capacity: np.ndarray
) -> tuple[np.ndarray, float, float]:
    """The greedy plan at ``prices``, its expected opens and the dual bound."""
    choice = np.full(opts.n_users, -1, dtype=np.int64)
    room = np.where(np.isfinite(capacity), capacity, np.inf)
    reduced = opts.value - prices[opts.bucket]
    _greedy(opts, reduced, reduced >= 0, room, choice)
    # capacity the prices left unused goes to whoever still gains from a send
    _greedy(opts, opts.value, np.ones(opts.n_edges, dtype=bool), room, choice)
    return choice, float(opts.value[choice[choice >= 0]].sum()), dual_bound(opts, prices, capacity)


def _greedy(
    opts: Options, score: np.ndarray, eligible: np.ndarray, room: np.ndarray, choice: np.ndarray
) -> None:
    """Users without a choice propose their best eligible edge by ``score``; an hour with
    more proposals than room keeps the largest margins over the proposer's next best edge
    and closes. Fills ``choice`` and uses up ``room`` in place."""
    open_ = eligible & (choice[opts.user] < 0) & (room[opts.bucket] > 0)
    while True:
        live = np.flatnonzero(open_)
        if not len(live):
            return
        sub = opts.subset(live)
        x = score[live]
        best, best_val = sub.seg_argmax(x)
        x2 = x.copy()
        x2[best] = -np.inf
        second = sub.seg_max(x2)
        margin = best_val - np.maximum(second, 0.0)
        edge = live[best]
        bucket = opts.bucket[edge]
        order = np.lexsort((-margin, bucket))
        b_sorted = bucket[order]
        first_of = np.searchsorted(b_sorted, b_sorted, side="left")
        rank = np.arange(len(order)) - first_of
        accept = np.zeros(len(order), dtype=bool)
        accept[order] = rank < room[b_sorted]
        won = edge[accept]
        choice[opts.user[won]] = won
        room -= np.bincount(opts.bucket[won], minlength=opts.n_buckets)
        # losers lose that edge; full hours close for everyone
        open_[edge[~accept]] = False
        open_ &= (choice[opts.user] < 0) & (room[opts.bucket] > 0)


def solve_exact(opts: Options, capacity: np.ndarray) -> Assignment:
    """The exact optimum with HiGHS (scipy ``linprog``): for small instances and tests."""
    t0 = time.perf_counter()
    choice = _highs(opts, capacity)
    value = float(opts.value[choice[choice >= 0]].sum())
    return Assignment(
        choice=choice,
        prices=np.zeros(opts.n_buckets),
        value=value,
        bound=value,
        method="HiGHS",
        seconds=time.perf_counter() - t0,
        exact_users=len(opts.seg_user),
    )


def _highs(opts: Options, capacity: np.ndarray) -> np.ndarray:
    from scipy import sparse
    from scipy.optimize import Bounds, LinearConstraint, linprog, milp

    choice = np.full(opts.n_users, -1, dtype=np.int64)
    if not opts.n_edges:
        return choice
    n_seg = len(opts.seg_start)
    fin = np.isfinite(capacity)
    row_of_bucket = np.full(opts.n_buckets, -1)
    row_of_bucket[fin] = n_seg + np.arange(fin.sum())
    cols = np.arange(opts.n_edges)
    brow = row_of_bucket[opts.bucket]
    has = brow >= 0
    rows = np.concatenate([opts.seg_id, brow[has]])
    cols = np.concatenate([cols, cols[has]])
    a = sparse.csr_matrix(
        (np.ones(len(rows)), (rows, cols)), shape=(n_seg + int(fin.sum()), opts.n_edges)
    )
    b = np.concatenate([np.ones(n_seg), capacity[fin]])
    res = linprog(-opts.value, A_ub=a, b_ub=b, bounds=(0, 1), method="highs")
    x = res.x if res.status == 0 else None
    if x is None or np.any((x > 1e-6) & (x < 1 - 1e-6)):
        # the matrix is totally unimodular, so a vertex is integral; an interior answer
        # (or a failure) goes to the MIP solver, which settles it at the root
        res = milp(
            -opts.value,
            constraints=LinearConstraint(a, -np.inf, b),
            integrality=np.ones(opts.n_edges),
            bounds=Bounds(0, 1),
        )
        x = res.x
        if x is None:
            raise RuntimeError(f"HiGHS found no plan: {res.message}")
    picked = np.flatnonzero(x > 0.5)
    choice[opts.user[picked]] = picked
    return choice


def assign(
    opts: Options,
    capacity: np.ndarray,
    *,
    gap_tolerance: float = 5e-4,
    exact_max_vars: int = 2_000_000,
    progress_log: bool = False,
    seed: int = 0,
) -> Assignment:
    """The plan with the most expected opens under per-hour ``capacity`` (inf: no limit).

    Returns it with its dual bound; when the bound is further than ``gap_tolerance`` and
    the undecided users make at most ``exact_max_vars`` edges, HiGHS settles them exactly.
    """
    t0 = time.perf_counter()
    capacity = np.asarray(capacity, dtype=np.float64)
    choice = np.full(opts.n_users, -1, dtype=np.int64)
    if not opts.n_edges:
        return Assignment(choice, np.zeros(opts.n_buckets), 0.0, 0.0, "empty")
    best, best_val = opts.seg_argmax(opts.value)
    choice[opts.seg_user] = best
    if (_loads(opts, choice) <= capacity).all():
        value = float(best_val.sum())
        return Assignment(
            choice,
            np.zeros(opts.n_buckets),
            value,
            value,
            "no capacity binds",
            time.perf_counter() - t0,
        )
    fin = np.flatnonzero(np.isfinite(capacity))
    prices = np.zeros(opts.n_buckets)
    z = _sample_prices(opts, capacity, progress_log, np.random.default_rng(seed))
    result = None
    if z is not None:
        prices[fin] = z
        choice, value, bound = _plan_at(opts, prices, capacity)
        result = Assignment(
            choice, prices.copy(), value, bound, "dual prices", time.perf_counter() - t0
        )
        log.info("plan at sampled prices: gap to the dual bound %.5f%%", 100 * result.gap)
    if result is None or result.gap > gap_tolerance:
        taus = _temperatures(opts)[-1:] if z is not None else _temperatures(opts)
        # on everyone, a few steps from the sample's prices are enough
        prices[fin] = _minimise_dual(
            opts, capacity, prices[fin], taus, progress_log, maxiter=25 if z is not None else 60
        )
        choice, value, bound = _plan_at(opts, prices, capacity)
        result = Assignment(
            choice, prices.copy(), value, bound, "dual prices", time.perf_counter() - t0
        )
    reduced = opts.value - prices[opts.bucket]
    if result.gap <= gap_tolerance:
        return result
    # reduced-cost fixing: an edge costing more than the gap is in no plan better than this one
    value, bound = result.value, result.bound
    gap = bound - value + 1e-9
    u = np.maximum(opts.seg_max(reduced), 0.0)
    keep = (u[opts.seg_id] - reduced) <= gap
    n_keep = np.bincount(opts.seg_id[keep], minlength=len(opts.seg_start))
    null_ok = u <= gap
    decided = (n_keep == 1) & ~null_ok | (n_keep == 0)
    undecided_edges = np.flatnonzero(keep & ~decided[opts.seg_id])
    if len(undecided_edges) > exact_max_vars:
        log.info(
            "plan: %d undecided edges exceed plan.solver_exact_max_vars; keeping the "
            "certified plan (gap %.4f%%)",
            len(undecided_edges),
            100 * result.gap,
        )
        return result
    fixed = np.full(opts.n_users, -1, dtype=np.int64)
    single = np.flatnonzero(keep & ((n_keep == 1) & ~null_ok)[opts.seg_id])
    fixed[opts.user[single]] = single
    rest = opts.subset(undecided_edges)
    left = capacity - _loads(opts, fixed)
    sub = _highs(rest, left)
    picked = sub[sub >= 0]
    fixed[rest.user[picked]] = undecided_edges[picked]
    new_value = float(opts.value[fixed[fixed >= 0]].sum())
    if new_value + 1e-9 < value:  # numerical trouble in the sub-problem: keep the greedy plan
        return result
    return Assignment(
        fixed,
        prices,
        new_value,
        bound,
        "dual prices + HiGHS",
        time.perf_counter() - t0,
        exact_users=len(rest.seg_user),
    )


def push_forward(
    opts: Options, desired: np.ndarray, capacity: np.ndarray, queue_rank: np.ndarray
) -> np.ndarray:
    """The throttling scheduler's answer to a full hour: hold the overflow to the user's
    next allowed hour with room. ``desired[i]``: the edge user i asks for (-1: none);
    users enter each hour in ``queue_rank`` order, those held over first. Returns choices."""
    choice = np.full(opts.n_users, -1, dtype=np.int64)
    # a user's edge in each hour, looked up directly (a search per hour cost seconds)
    edge_at = np.full((opts.n_users, opts.n_buckets), -1, dtype=np.int64)
    edge_at[opts.user, opts.bucket] = np.arange(opts.n_edges)
    room = np.asarray(capacity, dtype=np.float64).copy()
    want_bucket = np.full(opts.n_users, -1, dtype=np.int64)
    asks = desired >= 0
    want_bucket[asks] = opts.bucket[desired[asks]]
    waiting = np.zeros(0, dtype=np.int64)  # users held over, in queue order
    for b in range(opts.n_buckets):
        new = np.flatnonzero(want_bucket == b)
        new = new[np.argsort(queue_rank[new], kind="stable")]
        q = edge_at[waiting, b]
        here = q >= 0
        pool_users = np.concatenate([waiting[here], new])
        pool_edges = np.concatenate([q[here], desired[new]])
        n_take = int(min(len(pool_users), room[b])) if np.isfinite(room[b]) else len(pool_users)
        choice[pool_users[:n_take]] = pool_edges[:n_take]
        room[b] -= n_take
        held = pool_users[n_take:]
        waiting = np.concatenate([waiting[~here], held])
        waiting = waiting[np.argsort(queue_rank[waiting], kind="stable")]
    return choice
