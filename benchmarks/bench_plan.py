"""How long `sendtime plan` takes for a large audience with a capacity constraint, beside
the time of reading that audience from the tag store alone, in the same run.

The tag store is synthesised with numpy (simulating and scoring a million users' log
would take far longer than the plan and measure something else): per-user open
probabilities with a rhythm peaking at a random hour, five time zones, 2 % unsubscribed.
No event log is given, so the rules that need history do not strike; quiet hours and the
capacity do. Usage:

    .venv/bin/python benchmarks/bench_plan.py --users 1000000 --capacity-per-hour 40000
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from configs import load_config
from serving.plan import plan_campaign, read_audience
from serving.tagstore import RefreshPaths

ZONES = np.array(
    ["Asia/Shanghai", "Europe/London", "America/New_York", "Asia/Kolkata", "Australia/Sydney"]
)


def synthesise_store(serving: Path, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    hours = np.arange(24)
    peak = rng.uniform(0, 24, n)
    level = rng.beta(2, 12, n)
    shape = np.exp(3 * (np.cos(2 * np.pi * (hours[None, :] - peak[:, None]) / 24) - 1))
    probs = np.clip(level[:, None] * (0.3 + 1.7 * shape), 0, 0.95).astype(np.float32)
    ids = np.char.add("u", np.char.zfill(np.arange(1, n + 1).astype(str), 8))
    paths = RefreshPaths(serving / "refreshes" / "bench")
    paths.root.mkdir(parents=True)
    lists = pa.FixedSizeListArray.from_arrays(pa.array(probs.ravel()), 24).cast(
        pa.list_(pa.float32())
    )
    pq.write_table(
        pa.table(
            {
                "user_id": pa.array(ids),
                "slot_open_probs": lists,
                "best_slot": pa.array(probs.argmax(axis=1).astype(np.int32)),
                "churn_tier": pa.array(rng.choice(["low", "medium", "high"], n, p=[0.7, 0.2, 0.1])),
                "unsubscribed": pa.array(rng.random(n) < 0.02),
            }
        ),
        paths.tags,
    )
    pq.write_table(
        pa.table(
            {
                "user_id": pa.array(ids),
                "timezone": pa.array(rng.choice(ZONES, n, p=[0.55, 0.15, 0.15, 0.08, 0.07])),
            }
        ),
        paths.features,
    )
    con = duckdb.connect(str(paths.store))
    con.execute(f"CREATE TABLE tags AS SELECT * FROM read_parquet('{paths.tags}')")
    con.close()
    os.symlink(Path("refreshes") / "bench", serving / "current")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--capacity-per-hour", type=int, default=40_000)
    parser.add_argument("--explore", type=float, default=0.1)
    args = parser.parse_args()
    cfg = load_config()
    with tempfile.TemporaryDirectory() as tmp:
        serving = Path(tmp) / "serving"
        t0 = time.perf_counter()
        synthesise_store(serving, args.users)
        print(
            f"synthesised a tag store of {args.users:,} users in {time.perf_counter() - t0:.1f} s"
        )
        t0 = time.perf_counter()
        ids, *_ = read_audience(serving, n_slots=cfg.slots.n_slots)
        read_s = time.perf_counter() - t0
        start = datetime(2026, 5, 5, tzinfo=timezone.utc)
        t0 = time.perf_counter()
        result = plan_campaign(
            cfg,
            start,
            serving_dir=serving,
            window_hours=24,
            capacity_per_hour=args.capacity_per_hour,
            explore=args.explore,
        )
        plan_s = time.perf_counter() - t0
        s = result.summary
    print(f"read the audience alone:       {read_s:6.1f} s ({len(ids):,} users)")
    print(
        f"plan (read + rules + solve):   {plan_s:6.1f} s ({s['planned']:,} planned, "
        f"{s['reasons']}, capacity {args.capacity_per_hour:,}/h, explore {args.explore})"
    )
    print(
        f"  of which solver {s['solver_seconds']:.1f} s ({s['solver']}, within "
        f"{100 * s['solver_gap']:.3f}% of the optimum), rules {s['rules_seconds']:.1f} s"
    )
    print(f"plan / read ratio:             {plan_s / read_s:6.1f}")
    print(
        f"expected opens: plan {s['expected_opens']:,.0f}; global best hour "
        f"{s['global_best_expected_opens']:,.0f}; own best hour, overflow held over "
        f"{s['own_best_expected_opens']:,.0f}"
    )


if __name__ == "__main__":
    main()
