"""Reference estimators of each user's best slot on simulated data: what an estimator
that knows the simulator's own generative model (which no real model knows) can recover
from the same log. ``benchmarks/quality_ceiling.py`` prints them beside the model.

- ``structural_em``: fits each user's mixture over the simulator's archetype shapes to
  their session hours and opens (a point estimate that ignores unopened sends);
- ``bayes_posterior``: the simulator's generative model inverted by importance sampling,
  using every session hour and every send's outcome, weekday and weekend apart.

Both read whatever counts they are given; the benchmark decides the history window.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from configs import Config
from features.events import EventLog
from features.matrix import slot_counts
from simulator.generate import ARCHETYPES, GENERIC_SESSION_SHAPE, RHYTHM_FLOOR, SEGMENT_OPENS, SEGMENT_SHARE, rhythms, von_mises

__all__ = ["archetype_shapes", "bayes_posterior", "counts_by_day_type", "structural_em"]


def archetype_shapes() -> np.ndarray:
    hours = np.arange(24.0)
    return np.array([5 / 7 * von_mises(hours, wd, k) + 2 / 7 * von_mises(hours, we, 0.7 * k)
                     for _, wd, we, k in ARCHETYPES])


def structural_em(sessions: np.ndarray, opened: np.ndarray, rhythm_share: float,
                  iterations: int = 60) -> np.ndarray:
    """Per-user archetype weights (MAP, Dirichlet(0.35) prior) -> rhythm per hour."""
    shapes = archetype_shapes()
    generic = GENERIC_SESSION_SHAPE / GENERIC_SESSION_SHAPE.sum()
    w = np.full((len(sessions), len(shapes)), 1.0 / len(shapes))
    for _ in range(iterations):
        mix = RHYTHM_FLOOR + w @ shapes
        p_session = rhythm_share * mix / mix.sum(axis=1, keepdims=True) + (1 - rhythm_share) * generic
        part = rhythm_share * (w[:, :, None] * shapes[None]) / mix.sum(axis=1)[:, None, None]
        from_sessions = (sessions[:, None, :] * part / p_session[:, None, :]).sum(axis=2)
        from_opens = (opened[:, None, :] * (w[:, :, None] * shapes[None]) / mix[:, None, :]).sum(axis=2)
        w = np.clip(from_sessions + from_opens + 0.35 - 1 + 1e-3, 1e-3, None)
        w /= w.sum(axis=1, keepdims=True)
    return RHYTHM_FLOOR + w @ shapes


def counts_by_day_type(log: EventLog, as_of, cfg: Config, user_ids: pd.Index) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sessions, matured sends and opened sends as (users, 2 [weekday, weekend], 24 local hours)."""
    week = cfg.model_copy(update={"slots": cfg.slots.model_copy(update={"kind": "hour_of_week"})})
    c = slot_counts(log, as_of, week, user_ids)

    def split(a: np.ndarray) -> np.ndarray:
        a = a.reshape(len(a), 7, 24)          # Monday = 0
        return np.stack([a[:, :5].sum(axis=1), a[:, 5:].sum(axis=1)], axis=1)

    return split(c.sessions), split(c.sends), split(c.opened)


def base_rate_log_prior(grid: np.ndarray, base_open_rate: float) -> np.ndarray:
    """Log prior weight of each base open rate on ``grid``: the simulator's Beta per segment."""
    from scipy.stats import beta

    means = np.clip(base_open_rate * SEGMENT_OPENS, 0.01, 0.6)
    density = sum(share * beta.pdf(grid, 4.0, 4.0 * (1 - m) / m) for share, m in zip(SEGMENT_SHARE, means))
    return np.log(density * grid + 1e-300)          # the grid is geometric: weight by its spacing


def bayes_posterior(sessions: np.ndarray, sends: np.ndarray, opened: np.ndarray, rhythm_share: float,
                    base_open_rate: float, draws: int = 4000, seed: int = 0,
                    chunk: int = 250) -> tuple[np.ndarray, np.ndarray]:
    """(posterior expected capture of each hour, posterior predictive open probability of
    each hour), both (users, 24), by importance sampling from the simulator's prior over
    (archetype weights, personal shift) and a grid over the base open rate. Fatigue and
    fading are folded into the base rate, so the predictive ignores them: a reference
    for users who still engage, not for the fading."""
    rng = np.random.default_rng(seed)
    weights = rng.dirichlet(np.full(len(ARCHETYPES), 0.35), size=draws)
    rhythm = rhythms(weights, rng.normal(0.0, 0.5, size=draws))            # (M, 2, 24), mean 1
    generic = GENERIC_SESSION_SHAPE / GENERIC_SESSION_SHAPE.sum()
    session_p = rhythm_share * rhythm / rhythm.sum(axis=2, keepdims=True) + (1 - rhythm_share) * generic
    log_session = np.log(session_p).reshape(draws, 48)
    r = rhythm.reshape(draws, 48)
    target = (5 * rhythm[:, 0] + 2 * rhythm[:, 1]) / 7                      # the truth's week mix
    ratio = target / target.max(axis=1, keepdims=True)
    grid = np.geomspace(0.005, 0.7, 30)
    log_prior = base_rate_log_prior(grid, base_open_rate)
    log_p = [np.log(np.minimum(b * r, 0.95)).T for b in grid]
    log_q = [np.log1p(-np.minimum(b * r, 0.95)).T for b in grid]
    outcome = np.minimum(grid[:, None, None] * target[None], 0.95)           # (B, M, 24)
    capture = np.zeros((len(sessions), 24))
    predictive = np.zeros((len(sessions), 24))
    for start in range(0, len(sessions), chunk):
        part = slice(start, start + chunk)
        s = sessions[part].reshape(-1, 48)
        k = opened[part].reshape(-1, 48)
        f = sends[part].reshape(-1, 48) - k
        ll = np.stack([k @ lp + f @ lq + prior for lp, lq, prior in zip(log_p, log_q, log_prior)])
        ll += (s @ log_session.T)[None]                                      # (B, u, M)
        ll -= ll.max(axis=(0, 2), keepdims=True)
        w = np.exp(ll)
        w /= w.sum(axis=(0, 2), keepdims=True)
        capture[part] = w.sum(axis=0) @ ratio
        predictive[part] = np.einsum("bum,bmh->uh", w, outcome)
    return capture, predictive
