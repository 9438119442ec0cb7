"""The refresh's drift step at scale: PSI of 20 features and the predictions of both tasks
over 1,000,000 synthetic users (24 slots), beside one pass over the same score matrix (the
refresh's best-slot argmax) in the same run.

    .venv/bin/python benchmarks/bench_drift.py [--users 1000000]
"""

from __future__ import annotations

import argparse
import time
from datetime import datetime, timezone

import numpy as np
import pandas as pd

from configs import load_config
from features.matrix import UserMatrix
from features.reference import DriftReference, Histogram
from serving.core import Scores
from serving.drift import measure_drift

ZONES = np.array(["Asia/Shanghai", "Europe/London", "America/New_York", "Asia/Kolkata", "Australia/Sydney"], object)


def synthetic(n: int, rng: np.random.Generator) -> tuple[UserMatrix, Scores]:
    cols = {f"count_{i}": rng.poisson(2 + i, n).astype(float) for i in range(8)}
    cols.update({f"rate_{i}": rng.beta(2, 10, n) for i in range(6)})
    cols.update({f"days_since_{i}": np.where(rng.random(n) < 0.2, np.nan, rng.exponential(10, n)) for i in range(3)})
    cols.update(has_history=np.ones(n), unreachable=(rng.random(n) < 0.1).astype(float),
                days_since_engagement=rng.exponential(30, n))
    scalars = pd.DataFrame(cols, index=pd.Index([f"u{i:07d}" for i in range(n)], name="user_id"))
    scalars["timezone"] = pd.Series(ZONES[rng.integers(0, len(ZONES), n)], index=scalars.index, dtype="string")
    slots = {f: rng.random((n, 24), dtype=np.float32) for f in ("circ_rate", "session_share", "pooled_rate")}
    matrix = UserMatrix(as_of=datetime(2026, 5, 1, tzinfo=timezone.utc), n_slots=24, scalars=scalars, slots=slots,
                        attributes=("timezone",))
    slot_probs = rng.beta(2, 12, (n, 24))
    scores = Scores(slot_probs=slot_probs, churn_prob=rng.beta(2, 5, n), churn_tier=np.full(n, "low", object),
                    unreachable=np.zeros(n, bool), cold_start=np.zeros(n, bool), best_slot=np.zeros(n, np.int64),
                    cutoffs={"medium": 0.3, "high": 0.6})
    return matrix, scores


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--users", type=int, default=1_000_000)
    args = parser.parse_args()
    cfg = load_config()
    rng = np.random.default_rng(0)
    matrix, scores = synthetic(args.users, rng)
    ref_rows = np.sort(rng.choice(args.users, 10_000, replace=False))
    names = [c for c in matrix.scalars.columns if c not in ("has_history", "unreachable")]
    names += ["best_slot_rate", "best_pooled_rate"]
    from features.reference import user_column

    features = {c: Histogram.fit(user_column(matrix, c, ref_rows), 10, 20) for c in names}
    references = {
        "open": ("1", DriftReference("open", "", "", 10_000, 10_000, features,
                                     Histogram.fit(scores.slot_probs[ref_rows].ravel(), 10, 20))),
        "churn": ("1", DriftReference("churn", "", "", 10_000, 10_000, features,
                                      Histogram.fit(scores.churn_prob[ref_rows], 10, 20))),
    }
    start = time.perf_counter()
    np.argmax(scores.slot_probs, axis=1)
    baseline = time.perf_counter() - start
    for sample in (cfg.drift.sample_users, args.users):
        run_cfg = cfg.with_overrides(drift={"sample_users": sample})
        report = measure_drift(matrix, scores, references, run_cfg)
        print(f"{args.users:,} users, sample {min(sample, args.users):,}: drift {report.seconds:.2f} s for "
              f"{sum(len(t.features) + 1 for t in report.tasks.values())} PSIs (max {report.metrics()['psi_max']:.4f}); "
              f"best-slot argmax over the scores {baseline:.2f} s; ratio {report.seconds / baseline:.1f}x")


if __name__ == "__main__":
    main()
