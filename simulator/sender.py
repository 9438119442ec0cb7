"""A simulated sender that obeys the campaign rules and logs propensities.

The house sender of :mod:`simulator.generate` sends at a few hours of its own zone and
explores without saying so. This one works per user and local day: it allows only the
local hours the ``[plan]`` rules allow (quiet hours, sends per local day, the new-user
cap, the silence after consecutive unopened sends, the degraded weekly cap, the monthly
and daily quota of the quota channels), sends at a house hour (mapped to the user's local
hour) with probability 1 - ``exploration`` and at a uniformly random allowed hour
otherwise, and logs on each ``send`` the probability with which it chose that hour:

    propensity(s) = (1 - eps) * [s in H] / |H| + eps / k      (H: allowed house hours)
    propensity(s) = 1 / k                                   when no house hour is allowed

with k the number of allowed hours. It also records, for every send, the true open
probability of the same message at each local hour of that day (``send_truth.parquet``),
so that an off-policy estimate can be checked against what a timing policy would truly
have earned on exactly the logged sends.
"""

from __future__ import annotations

import numpy as np

from configs import Config

__all__ = ["RuleState", "allowed_hours", "choose_hours", "quiet_mask"]


def quiet_mask(cfg: Config) -> np.ndarray:
    """(24,) True for the local hours inside the quiet window: the same rule as the plan's."""
    return np.asarray(cfg.plan.quiet_hours(), dtype=bool)


class RuleState:
    """What the rules need to know about each simulated user, updated after every send."""

    def __init__(self, n: int, cfg: Config) -> None:
        plan = cfg.plan
        self.cfg = cfg
        self.streak = np.zeros(n, dtype=np.int64)  # consecutive unopened sends
        self.recent = np.full((n, max(plan.degraded_max_sends, 1)), -np.inf)  # newest first
        self.sends_today = np.zeros(n, dtype=np.int64)
        self.new_sends = np.zeros(n, dtype=np.int64)
        self.quota_month = np.zeros(n, dtype=np.int64)
        self.quota_day = np.zeros(n, dtype=np.int64)
        self.month = -1

    def new_day(self, month: int) -> None:
        self.sends_today[:] = 0
        self.quota_day[:] = 0
        if month != self.month:
            self.quota_month[:] = 0
            self.month = month

    def record(
        self,
        users: np.ndarray,
        t: np.ndarray,
        opened: np.ndarray,
        quota: np.ndarray,
        signup: np.ndarray,
    ) -> None:
        plan = self.cfg.plan
        self.streak[users] = np.where(opened, 0, self.streak[users] + 1)
        self.recent[users, 1:] = self.recent[users, :-1]
        self.recent[users, 0] = t
        self.sends_today[users] += 1
        self.new_sends[users] += t < signup[users] + plan.new_user_days
        self.quota_month[users] += quota
        self.quota_day[users] += quota


def allowed_hours(
    state: RuleState,
    users: np.ndarray,
    slot_start: np.ndarray,
    signup: np.ndarray,
    quota: np.ndarray,
    cfg: Config,
) -> np.ndarray:
    """(len(users), 24) True where a send starting at ``slot_start`` (days) keeps every rule."""
    plan = cfg.plan
    ok = ~quiet_mask(cfg)[None, :] & (slot_start >= 0)
    last = state.recent[users, :1]
    ok &= slot_start > last  # a user's sends stay in time order
    streak = state.streak[users][:, None]
    ok &= ~((streak >= plan.silence_after_unopened) & (slot_start < last + plan.silence_hours / 24))
    oldest_kept = state.recent[users, -1:]  # the degraded_max_sends-th latest send
    ok &= ~(
        (streak >= plan.degrade_after_unopened) & (slot_start - oldest_kept < plan.degraded_days)
    )
    new = slot_start < signup[users][:, None] + plan.new_user_days
    today = state.sends_today[users][:, None]
    after_cap = min(plan.max_sends_per_local_day, plan.after_new_user_max_per_local_day)
    ok &= np.where(
        new,
        (state.new_sends[users][:, None] < plan.new_user_max_sends)
        & (today < plan.max_sends_per_local_day),
        today < after_cap,
    )
    if plan.quota_per_month:
        ok &= ~(quota & (state.quota_month[users] >= plan.quota_per_month))[:, None]
    if plan.quota_per_day:
        ok &= ~(quota & (state.quota_day[users] >= plan.quota_per_day))[:, None]
    return ok


def choose_hours(
    rng: np.random.Generator, allowed: np.ndarray, house: np.ndarray, eps: float
) -> tuple[np.ndarray, np.ndarray]:
    """Each row's local hour and the probability the policy gave it (rows need one allowed hour).

    ``house``: (rows, 24) True at the house hours in the user's local time.
    """
    house = house & allowed
    k = allowed.sum(axis=1)
    n_house = house.sum(axis=1)
    # uniform among the True cells of a row: the argmax of independent uniforms
    explore_pick = np.where(allowed, rng.random(allowed.shape), -1.0).argmax(axis=1)
    house_pick = np.where(house, rng.random(allowed.shape), -1.0).argmax(axis=1)
    explore = (rng.random(len(k)) < eps) | (n_house == 0)
    hour = np.where(explore, explore_pick, house_pick)
    in_house = house[np.arange(len(k)), hour]
    propensity = np.where(
        n_house > 0, (1 - eps) * in_house / np.maximum(n_house, 1) + eps / k, 1.0 / k
    )
    return hour, propensity
