"""How much of the best slot can *any* estimator find from a simulated log? An upper
reference for the model's slot capture, printed beside the model's (from its tags).

    .venv/bin/python benchmarks/quality_ceiling.py --data data/sim [--tags tags.parquet]

Estimators, weakest to strongest:

- ``session share``: the slot where the user had most app sessions;
- ``structural EM``: fits each user's mixture over the simulator's *own* archetype shapes
  (which no real model knows) to their session hours and opens, with the simulator's
  Dirichlet prior: close to the best a model can do with the same evidence;
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
from features.simulate import _GENERIC, _RHYTHM_FLOOR, ARCHETYPES, _von_mises
from sendtime.config import load_config
from training.evaluation import slot_capture


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="a folder written by `sendtime simulate`")
    parser.add_argument("--tags", type=Path, default=None, help="tags of the same users, from `sendtime score`")
    parser.add_argument("--config", type=Path, default=None)
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
    names = [a[0] for a in ARCHETYPES]
    dominant = truth["archetype"].map({n: i for i, n in enumerate(names)}).to_numpy()
    table = {
        "session share": capture(counts.sessions + 1e-3 * rng.random(counts.sessions.shape)),
        "structural EM (knows the simulator's shapes)": capture(em),
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
    print("structural EM by sessions in the history window:")
    for lo, hi in ((0, 5), (5, 15), (15, 30), (30, 60), (60, np.inf)):
        rows = keep & (total >= lo) & (total < hi)
        if rows.any():
            print(f"  {lo:>3}-{hi:<4} sessions: {rows.sum():6d} users, capture {capture(em, rows):.4f}")


if __name__ == "__main__":
    main()
