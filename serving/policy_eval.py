"""Off-policy evaluation: what a timing policy would have earned in opens, estimated from
logged sends that carry the probability with which their slot was chosen (``propensity``).

A candidate policy gives each user one slot. For logged send j (user i, slot s_j, opened
r_j, propensity p_j) let w_j = [s_j == policy(i)] / p_j. Then, over the n logged sends:

- **IPS**: mean(w r), unbiased when every propensity is right and the policy's slot
  could have been chosen (p > 0);
- **self-normalised IPS**: sum(w r) / sum(w), a little biased, far less variable;
- **doubly robust**: mean(q(i, policy(i)) + w (r - q(i, s_j))) with a reward model q
  (the tags' ``slot_open_probs``, or open rates per slot): unbiased when the propensities
  are right, whatever q is, and close to q's answer when q is good.

Each comes with a 95 % normal interval from the spread of its per-send terms (the delta
method for the ratio), the number of sends it rests on (those whose slot matches the
policy) and the effective sample size (sum w)^2 / sum w^2, and a warning when a
propensity is tiny or the effective sample size small. The value estimated is the open
rate per send over the logged sends' users and times. (obp, the maintained library, does
not install on Python 3.11; these few lines are tested against a simulator that knows
every send's true open probability at every hour.)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd

from configs import Config, SendtimeError
from features.attribution import attributed_sends_sql
from features.events import EventLog
from serving.plan_rules import quiet_hours

__all__ = [
    "PolicyEvaluation",
    "PolicyEvalError",
    "estimate_policy_value",
    "evaluate_policy",
    "logged_sends",
    "policy_slots",
    "slot_rate_model",
]

log = logging.getLogger(__name__)
_Z95 = 1.959963984540054


class PolicyEvalError(SendtimeError, ValueError):
    """An evaluation that cannot be made (no propensities logged, an unknown policy)."""


@dataclass
class PolicyEvaluation:
    estimates: pd.DataFrame  # estimator, estimate, ci_low, ci_high, std_error
    n_sends: int  # logged sends with a propensity and a policy slot
    n_matched: int  # of which the slot is the policy's: what IPS rests on
    effective_sends: float
    min_matched_propensity: float
    logged_open_rate: float
    warnings: list[str] = field(default_factory=list)
    n_without_propensity: int = 0

    def to_text(self) -> str:
        lines = [
            f"{self.n_sends} logged sends with propensities ({self.n_without_propensity} "
            f"without were left out); {self.n_matched} match the policy's slot, effective "
            f"sample size {self.effective_sends:.0f}; logged open rate {self.logged_open_rate:.4f}"
        ]
        for r in self.estimates.itertuples():
            lines.append(
                f"  {r.estimator:<22} {r.estimate:.4f}  95% CI [{r.ci_low:.4f}, {r.ci_high:.4f}]"
                f"  rests on {r.n_sends} sends"
            )
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def _interval(terms: np.ndarray, center: float) -> tuple[float, float, float]:
    se = float(np.std(terms, ddof=1) / np.sqrt(len(terms))) if len(terms) > 1 else float("nan")
    return center - _Z95 * se, center + _Z95 * se, se


def estimate_policy_value(
    logged_slot: np.ndarray,
    opened: np.ndarray,
    propensity: np.ndarray,
    policy_slot: np.ndarray,
    q_logged: np.ndarray,
    q_policy: np.ndarray,
    *,
    min_propensity: float = 0.005,
    min_effective: float = 100.0,
) -> PolicyEvaluation:
    """IPS, self-normalised IPS and doubly robust estimates of a policy's open rate per send.

    One entry per logged send: its slot, whether it was opened, its propensity, the
    policy's slot for its user, and the reward model at the logged and the policy's slot.
    """
    r = np.asarray(opened, dtype=float)
    p = np.asarray(propensity, dtype=float)
    n = len(r)
    if n == 0:
        raise PolicyEvalError("no logged sends with a propensity for users the policy covers")
    match = np.asarray(logged_slot) == np.asarray(policy_slot)
    w = match / p
    ips_terms = w * r
    ips = float(ips_terms.mean())
    w_mean = float(w.mean())
    snips = float((w * r).sum() / w.sum()) if w.sum() > 0 else float("nan")
    snips_terms = w * (r - (snips if np.isfinite(snips) else 0.0)) / (w_mean if w_mean > 0 else 1.0)
    dr_terms = np.asarray(q_policy, float) + w * (r - np.asarray(q_logged, float))
    dr = float(dr_terms.mean())
    rows = []
    n_matched = int(match.sum())
    for name, value, terms in (
        ("IPS", ips, ips_terms),
        ("self-normalised IPS", snips, snips_terms),
        ("doubly robust", dr, dr_terms),
    ):
        lo, hi, se = _interval(terms, value)
        if name == "self-normalised IPS":
            lo, hi = value - _Z95 * se, value + _Z95 * se
        rows.append(
            {
                "estimator": name,
                "estimate": value,
                "ci_low": lo,
                "ci_high": hi,
                "std_error": se,
                "n_sends": n_matched if name != "doubly robust" else n,
            }
        )
    ess = float(w.sum() ** 2 / (w**2).sum()) if n_matched else 0.0
    min_p = float(p[match].min()) if n_matched else float("nan")
    warnings = []
    if n_matched and min_p < min_propensity:
        warnings.append(
            f"propensities as small as {min_p:.4g} (below {min_propensity}): a few sends "
            "weigh a lot; the intervals may be optimistic"
        )
    if ess < min_effective:
        warnings.append(
            f"effective sample size {ess:.0f} is below {min_effective:.0f}: the estimates "
            "rest on few sends; log more exploration (plan --explore) or wait"
        )
    return PolicyEvaluation(
        estimates=pd.DataFrame(rows),
        n_sends=n,
        n_matched=n_matched,
        effective_sends=ess,
        min_matched_propensity=min_p,
        logged_open_rate=float(r.mean()),
        warnings=warnings,
    )


def logged_sends(
    log_: EventLog, cfg: Config, since: datetime | None = None, until: datetime | None = None
) -> pd.DataFrame:
    """Every send whose open label is settled (sent at least the attribution window before
    the last event), with its slot, ``opened`` and ``propensity`` (NaN where not logged)."""
    last = log_.max_ts()
    if last is None:
        raise PolicyEvalError("the event log is empty")
    window = cfg.labels.open_attribution_hours
    settled = last - timedelta(hours=window)
    until = min(until, settled) if until else settled
    since = since or (log_.min_ts() - timedelta(seconds=1))
    sql = attributed_sends_sql(since, until, last, window, cfg.slots.kind)
    # the propensity rides on the send row; the attribution query keys sends by (user, ts)
    return log_.query_df(f"""
        WITH a AS ({sql}),
        p AS (SELECT user_id, ts, max(propensity) AS propensity FROM events
              WHERE event = 'send' AND ts > TIMESTAMP '{since.isoformat(sep=" ")}'
              GROUP BY user_id, ts)
        SELECT a.user_id, a.ts, a.slot, a.local_hour, a.opened, p.propensity
        FROM a LEFT JOIN p USING (user_id, ts)""")


def slot_rate_model(
    sends: pd.DataFrame, n_slots: int, prior_strength: float = 4.0
) -> tuple[pd.DataFrame, np.ndarray]:
    """A simple reward model: each user's open rate per slot, shrunk toward their overall
    level times the slot's logged open rate (``prior_strength`` pseudo-sends). Returns the
    users' (users x slots) frame and the population's per-slot rates (for unseen users)."""
    overall = float(sends["opened"].mean()) if len(sends) else 0.0
    by_slot = (
        sends.groupby("slot")["opened"].agg(["sum", "count"]).reindex(range(n_slots), fill_value=0)
    )
    population = ((by_slot["sum"] + 5 * overall) / (by_slot["count"] + 5)).to_numpy(dtype=float)
    per_user = sends.groupby("user_id")["opened"].agg(["sum", "count"])
    level = ((per_user["sum"] + 8 * overall) / (per_user["count"] + 8)).to_numpy(dtype=float)
    scale = level / overall if overall > 0 else np.ones(len(level))
    prior = np.clip(scale[:, None] * population[None, :], 0, 1)
    users = pd.Index(per_user.index)
    row = users.get_indexer(sends["user_id"])
    slot = sends["slot"].to_numpy(dtype=np.int64)
    opens = np.zeros((len(users), n_slots))
    count = np.zeros((len(users), n_slots))
    np.add.at(opens, (row, slot), sends["opened"].to_numpy(dtype=float))
    np.add.at(count, (row, slot), 1.0)
    rates = (opens + prior_strength * prior) / (count + prior_strength)
    return pd.DataFrame(rates, index=users), population


def _allowed_slots(cfg: Config) -> np.ndarray:
    quiet = quiet_hours(cfg)
    slots = np.arange(cfg.slots.n_slots)
    return ~quiet[slots % 24]


def policy_slots(policy: str, tags: pd.DataFrame | None, cfg: Config) -> pd.Series:
    """Each user's slot under ``policy``: ``champion`` (their best slot outside the quiet
    hours in the tags), ``global-best`` (the single such slot best on average), or a plan
    file (its ``slot`` column). Indexed by user_id."""
    if policy in ("champion", "global-best"):
        if tags is None or not len(tags):
            raise PolicyEvalError(
                f"--policy {policy}: no tags to read the slots from (run `sendtime score`)"
            )
        known = tags["slot_open_probs"].notna()
        probs = np.vstack(tags.loc[known, "slot_open_probs"].to_numpy()).astype(float)
        allowed = _allowed_slots(cfg)
        masked = np.where(allowed[None, :], probs, -np.inf)
        if policy == "champion":
            slots = masked.argmax(axis=1)
        else:
            slots = np.full(
                len(probs), int(np.where(allowed, probs.mean(axis=0), -np.inf).argmax())
            )
        return pd.Series(slots, index=tags.loc[known, "user_id"].to_numpy())
    path = Path(policy)
    if not path.exists():
        raise PolicyEvalError(
            f"--policy: {policy!r} is neither champion, global-best nor a plan file"
        )
    plan = pd.read_parquet(path, columns=["user_id", "slot"]).dropna(subset=["slot"])
    return pd.Series(plan["slot"].astype(int).to_numpy(), index=plan["user_id"].to_numpy())


def evaluate_policy(
    log_: EventLog,
    cfg: Config,
    policy: str,
    tags: pd.DataFrame | None,
    *,
    reward_model: str = "tags",
    since: datetime | None = None,
) -> PolicyEvaluation:
    """Estimate ``policy``'s open rate per send from the log's sends with propensities."""
    sends = logged_sends(log_, cfg, since=since)
    with_p = sends[sends["propensity"].notna()]
    if not len(with_p):
        raise PolicyEvalError(
            "no send in the log carries a propensity: log the plan's propensity "
            "column on the send events (plan --explore) before evaluating"
        )
    slots = policy_slots(policy, tags, cfg)
    with_p = with_p[with_p["user_id"].isin(slots.index)]
    n_slots = cfg.slots.n_slots
    target = slots.reindex(with_p["user_id"]).to_numpy(dtype=np.int64)
    logged = with_p["slot"].to_numpy(dtype=np.int64)
    if reward_model == "tags" and tags is not None and len(tags):
        q_frame = tags.set_index("user_id")["slot_open_probs"]
        rates, population = slot_rate_model(sends, n_slots)
        rows = q_frame.reindex(with_p["user_id"])
        q = (
            np.vstack(
                [
                    np.asarray(v, float) if isinstance(v, (list, np.ndarray)) else population
                    for v in rows.to_numpy()
                ]
            )
            if len(rows)
            else np.zeros((0, n_slots))
        )
    elif reward_model in ("tags", "per-slot"):
        rates, population = slot_rate_model(sends, n_slots)
        q = rates.reindex(with_p["user_id"]).to_numpy(dtype=float)
        q = np.where(np.isnan(q), population[None, :], q)
    else:
        raise PolicyEvalError(f"--reward-model: {reward_model!r}; choose tags or per-slot")
    idx = np.arange(len(with_p))
    result = estimate_policy_value(
        logged,
        with_p["opened"].to_numpy(),
        with_p["propensity"].to_numpy(),
        target,
        q[idx, logged],
        q[idx, target],
        min_propensity=cfg.plan.ope_min_propensity,
        min_effective=cfg.plan.ope_min_effective_sends,
    )
    result.n_without_propensity = int(sends["propensity"].isna().sum())
    return result
