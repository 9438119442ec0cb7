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

from configs import load_config
from features.events import open_log
from features.matrix import slot_counts
from simulator.generate import ARCHETYPES
from simulator.judge import expected_log_loss, slot_capture
from simulator.references import archetype_shapes, bayes_posterior, counts_by_day_type, structural_em


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
        "true dominant archetype (knows the truth)": capture(archetype_shapes()[dominant]),
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
