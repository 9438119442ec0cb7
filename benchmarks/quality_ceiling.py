"""How much of the best slot can *any* estimator find from a simulated log? An upper
reference for the model's slot capture and log loss, printed beside the model's (from its tags).

    .venv/bin/python benchmarks/quality_ceiling.py --data data/sim [--tags tags.parquet]

Estimators, weakest to strongest:

- ``session share``: the slot where the user had most app sessions;
- ``structural EM``: fits each user's mixture over the simulator's *own* archetype shapes
  (which no real model knows) to their session hours and opens, with the simulator's
  Dirichlet prior (a point estimate that ignores unopened sends);
- ``Bayes posterior``: the simulator's own generative model, inverted: thousands of draws
  of (archetype weights, personal shift) from the simulator's prior, each weighed by the
  likelihood of the user's session hours (weekday and weekend apart, with the generic
  share) and of every send's outcome at its local hour (base open rate integrated over a
  grid); the slot with the highest posterior expected capture. No model can know the
  generative model, so this is an upper reference for any estimator of the same log;
- ``true dominant archetype``: knows each user's main archetype from the truth (no
  estimator can); shows what the best slot is worth when the evidence is perfect.

It also splits the EM's capture by how many sessions a user had, which shows that the
evidence per user, not the model, bounds capture on thin logs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from features.events import open_log
from features.matrix import slot_counts
from features.simulate import (_GENERIC, _RHYTHM_FLOOR, _SEGMENT_OPENS, _SEGMENT_SHARE, ARCHETYPES,
                               _rhythms, _von_mises)
from sendtime.config import load_config
from training.evaluation import expected_log_loss, slot_capture


def _archetype_shapes() -> np.ndarray:
    hours = np.arange(24.0)
    return np.array([5 / 7 * _von_mises(hours, wd, k) + 2 / 7 * _von_mises(hours, we, 0.7 * k)
                     for _, wd, we, k in ARCHETYPES])


def structural_em(sessions: np.ndarray, opened: np.ndarray, rhythm_share: float,
                  iterations: int = 60) -> np.ndarray:
    """Per-user archetype weights (MAP, Dirichlet(0.35) prior) -> rhythm per hour."""
    shapes = _archetype_shapes()
    generic = _GENERIC / _GENERIC.sum()
    w = np.full((len(sessions), len(shapes)), 1.0 / len(shapes))
    for _ in range(iterations):
        mix = _RHYTHM_FLOOR + w @ shapes
        p_session = rhythm_share * mix / mix.sum(axis=1, keepdims=True) + (1 - rhythm_share) * generic
        part = rhythm_share * (w[:, :, None] * shapes[None]) / mix.sum(axis=1)[:, None, None]
        from_sessions = (sessions[:, None, :] * part / p_session[:, None, :]).sum(axis=2)
        from_opens = (opened[:, None, :] * (w[:, :, None] * shapes[None]) / mix[:, None, :]).sum(axis=2)
        w = np.clip(from_sessions + from_opens + 0.35 - 1 + 1e-3, 1e-3, None)
        w /= w.sum(axis=1, keepdims=True)
    return _RHYTHM_FLOOR + w @ shapes


def counts_by_day_type(log, as_of, cfg, user_ids: pd.Index) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sessions, matured sends and opened sends as (users, 2 [weekday, weekend], 24 local hours)."""
    week = cfg.model_copy(update={"slots": cfg.slots.model_copy(update={"kind": "hour_of_week"})})
    c = slot_counts(log, as_of, week, user_ids)

    def split(a: np.ndarray) -> np.ndarray:
        a = a.reshape(len(a), 7, 24)          # Monday = 0
        return np.stack([a[:, :5].sum(axis=1), a[:, 5:].sum(axis=1)], axis=1)

    return split(c.sessions), split(c.sends), split(c.opened)


def _base_prior(grid: np.ndarray, base_open_rate: float) -> np.ndarray:
    """Log prior weight of each base open rate on ``grid``: the simulator's Beta per segment."""
    from scipy.stats import beta

    means = np.clip(base_open_rate * _SEGMENT_OPENS, 0.01, 0.6)
    density = sum(share * beta.pdf(grid, 4.0, 4.0 * (1 - m) / m) for share, m in zip(_SEGMENT_SHARE, means))
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
    rhythm = _rhythms(weights, rng.normal(0.0, 0.5, size=draws))            # (M, 2, 24), mean 1
    generic = _GENERIC / _GENERIC.sum()
    session_p = rhythm_share * rhythm / rhythm.sum(axis=2, keepdims=True) + (1 - rhythm_share) * generic
    log_session = np.log(session_p).reshape(draws, 48)
    r = rhythm.reshape(draws, 48)
    target = (5 * rhythm[:, 0] + 2 * rhythm[:, 1]) / 7                      # the truth's week mix
    ratio = target / target.max(axis=1, keepdims=True)
    grid = np.geomspace(0.005, 0.7, 30)
    log_prior = _base_prior(grid, base_open_rate)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="a folder written by `sendtime simulate`")
    parser.add_argument("--tags", type=Path, default=None, help="tags of the same users, from `sendtime score`")
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument("--draws", type=int, default=4000, help="prior draws of the Bayes posterior")
    args = parser.parse_args()
    cfg = load_config(args.config)
    log = open_log(args.data / "events.parquet", args.data / "users.parquet")
    truth = pd.read_parquet(args.data / "truth.parquet")
    counts = slot_counts(log, log.max_ts(), cfg, pd.Index(truth["user_id"]))
    true_p = np.vstack(truth["true_open_probs"].to_numpy())
    keep = true_p.max(axis=1) > 0.01   # subscribed users who still engage

    def capture(score: np.ndarray, rows: np.ndarray = keep) -> float:
        return slot_capture(true_p[rows], score[rows].argmax(axis=1))

    rng = np.random.default_rng(0)
    em = structural_em(counts.sessions, counts.opened, cfg.simulate.session_rhythm_share)
    by_day = counts_by_day_type(log, log.max_ts(), cfg, pd.Index(truth["user_id"]))
    bayes, bayes_p = bayes_posterior(*by_day, cfg.simulate.session_rhythm_share, cfg.simulate.base_open_rate,
                                     draws=args.draws)
    names = [a[0] for a in ARCHETYPES]
    dominant = truth["archetype"].map({n: i for i, n in enumerate(names)}).to_numpy()
    table = {
        "session share": capture(counts.sessions + 1e-3 * rng.random(counts.sessions.shape)),
        "structural EM (knows the simulator's shapes)": capture(em),
        "Bayes posterior (knows the generative model)": capture(bayes),
        "true dominant archetype (knows the truth)": capture(_archetype_shapes()[dominant]),
    }
    if args.tags is not None:
        tags = pd.read_parquet(args.tags).set_index("user_id").reindex(truth["user_id"])
        model = np.vstack(tags["slot_open_probs"].to_numpy())
        table["sendtime model (tags)"] = capture(model)
    print(f"slot capture on {keep.sum()} engaged users of {args.data}")
    for name, value in table.items():
        print(f"  {name:48s} {value:.4f}")
    total = counts.sessions.sum(axis=1)
    print("by sessions in the history window:        EM     Bayes" + ("  model" if args.tags else ""))
    for lo, hi in ((0, 5), (5, 15), (15, 30), (30, 60), (60, np.inf)):
        rows = keep & (total >= lo) & (total < hi)
        if rows.any():
            line = (f"  {lo:>3}-{hi:<4} sessions: {rows.sum():6d} users  {capture(em, rows):.4f}"
                    f"  {capture(bayes, rows):.4f}")
            if args.tags is not None:
                line += f"  {capture(model, rows):.4f}"
            print(line)
    oracle = expected_log_loss(true_p[keep], true_p[keep])
    print(f"expected log loss vs the oracle's on the same engaged users (oracle {oracle:.4f}):")
    print(f"  {'Bayes posterior predictive':48s} {expected_log_loss(true_p[keep], bayes_p[keep]) / oracle - 1:+.1%}")
    if args.tags is not None:
        print(f"  {'sendtime model (tags)':48s} {expected_log_loss(true_p[keep], model[keep]) / oracle - 1:+.1%}")


if __name__ == "__main__":
    main()
