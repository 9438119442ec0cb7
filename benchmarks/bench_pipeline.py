"""Wall time and peak memory of the pipeline stages, each beside a baseline run in the same
command. Every stage runs in its own child process, so peak RSS is that stage's alone.

    .venv/bin/python benchmarks/bench_pipeline.py --users 100000 [--days 120] [--data DIR]

Stages and their baselines:
- features: ``build_matrix`` (DuckDB) vs the same per-slot counts and recency/frequency
  done with pandas groupbys (the obvious alternative; it computes less, and is checked to
  agree on what it computes);
- training: LightGBM vs XGBoost on the same open-task dataset (dataset build timed apart);
- scoring: ``refresh_tags`` for every user (needs champions in the registry) vs the bare
  champion predict on the same number of (user, slot) rows.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def stage_features_duckdb(data: Path) -> dict:
    from configs import load_config
    from features.events import open_log
    from features.matrix import build_matrix

    cfg = load_config()
    start = time.perf_counter()
    log = open_log(data / "events.parquet", data / "users.parquet",
                   materialize_max_rows=cfg.features.materialize_max_rows,
                   memory_limit=cfg.features.duckdb_memory_limit or None)
    matrix, _ = build_matrix(log, log.max_ts(), cfg)
    seconds = time.perf_counter() - start
    total = {k: float(v.sum()) for k, v in (("sends", matrix.slots["sends"]), ("sessions", None)) if v is not None}
    return {"seconds": seconds, "peak_mb": _peak_mb(), "users": len(matrix), "check": total}


def stage_features_pandas(data: Path) -> dict:
    import numpy as np
    import pandas as pd

    from configs import load_config

    cfg = load_config()
    start = time.perf_counter()
    ev = pd.read_parquet(data / "events.parquet")
    users = pd.read_parquet(data / "users.parquet", columns=["user_id", "timezone"])
    as_of = ev["ts"].max()
    window = pd.Timedelta(hours=cfg.labels.open_attribution_hours)
    ev = ev[ev["ts"] > as_of - pd.Timedelta(days=cfg.features.history_days)]
    ev = ev.merge(users, on="user_id", how="left")
    local_hour = np.empty(len(ev), dtype=np.int64)
    for zone, idx in ev.groupby("timezone").indices.items():
        local_hour[idx] = ev["ts"].iloc[idx].dt.tz_convert(zone).dt.hour.to_numpy()
    ev["slot"] = local_hour
    sends = ev[(ev["event"] == "send") & (ev["ts"] <= as_of - window)]
    opens = ev[(ev["event"] == "open") & ev["message_id"].notna()][["message_id"]].drop_duplicates()
    sends = sends.assign(opened=sends["message_id"].isin(opens["message_id"]))
    per_slot = sends.groupby(["user_id", "slot"]).agg(n=("opened", "size"), k=("opened", "sum"))
    per_slot.unstack(fill_value=0)
    sessions = ev[ev["event"] == "session"].groupby(["user_id", "slot"]).size().unstack(fill_value=0)
    recency = ev.groupby(["user_id", "event"])["ts"].max().unstack()
    counts = {d: ev[ev["ts"] > as_of - pd.Timedelta(days=d)].groupby(["user_id", "event"]).size().unstack(fill_value=0)
              for d in cfg.features.frequency_windows_days}
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_mb": _peak_mb(), "users": int(recency.shape[0]),
            "check": {"sends": float(per_slot["n"].sum()), "sessions": float(sessions.to_numpy().sum())},
            "n": len(counts)}


def stage_training(data: Path, library: str) -> dict:
    from configs import load_config
    from features.events import open_log
    from training.datasets import build_dataset
    from training.pipeline import fit_and_evaluate

    cfg = load_config()
    log = open_log(data / "events.parquet", data / "users.parquet",
                   materialize_max_rows=cfg.features.materialize_max_rows,
                   memory_limit=cfg.features.duckdb_memory_limit or None)
    start = time.perf_counter()
    ds = build_dataset(log, "open", None, cfg, progress=False)
    dataset_seconds = time.perf_counter() - start
    start = time.perf_counter()
    ev = fit_and_evaluate(ds, library, cfg)
    return {"dataset_seconds": dataset_seconds, "seconds": time.perf_counter() - start, "peak_mb": _peak_mb(),
            "rows": len(ds.train), "holdout_log_loss": ev.metrics["holdout_log_loss"]}


def stage_scoring(data: Path) -> dict:
    from configs import load_config
    from features.events import open_log
    from serving.models import load_champions
    from serving.refresh import refresh_tags

    cfg = load_config()
    champions = load_champions(cfg)
    start = time.perf_counter()
    log = open_log(data / "events.parquet", data / "users.parquet",
                   materialize_max_rows=cfg.features.materialize_max_rows,
                   memory_limit=cfg.features.duckdb_memory_limit or None)
    result = refresh_tags(log, cfg, champions, data / "bench_tags.parquet", progress=False)
    seconds = time.perf_counter() - start
    store_mb = result.refresh.store.stat().st_size / 2**20
    return {"seconds": seconds, "peak_mb": _peak_mb(), "users": result.n_users, "store_mb": store_mb,
            "tags_mb": (data / "bench_tags.parquet").stat().st_size / 2**20}


def stage_raw_predict(data: Path) -> dict:
    import numpy as np
    import pandas as pd

    from configs import load_config
    from serving.models import load_champions

    cfg = load_config()
    champions = load_champions(cfg)
    n_users = len(pd.read_parquet(data / "users.parquet", columns=["user_id"]))
    rows = n_users * cfg.slots.n_slots
    x = np.random.default_rng(0).random((min(rows, 2_000_000), len(champions.open.spec.names)), dtype=np.float32)
    start = time.perf_counter()
    champions.open.predict_array(x)
    per_row = (time.perf_counter() - start) / len(x)
    return {"seconds": per_row * rows, "peak_mb": _peak_mb(), "rows": rows}


STAGES = {
    "features_duckdb": stage_features_duckdb,
    "features_pandas": stage_features_pandas,
    "train_lightgbm": lambda d: stage_training(d, "lightgbm"),
    "train_xgboost": lambda d: stage_training(d, "xgboost"),
    "score": stage_scoring,
    "raw_predict": stage_raw_predict,
}


def _child(stage: str, data: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", stage, "--data", str(data)],
                         capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr else "failed"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--days", type=int, default=120)
    parser.add_argument("--data", type=Path, default=None, help="an existing simulated folder")
    parser.add_argument("--stages", default="features,training,scoring")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(STAGES[args.child](args.data)))
        return
    data = args.data or ROOT / "data" / f"bench-{args.users}"
    if not (data / "events.parquet").exists():
        from configs import load_config
        from simulator.generate import simulate

        start = time.perf_counter()
        simulate(load_config(), data, users=args.users, days=args.days, seed=7)
        print(f"simulated {args.users} users x {args.days} days in {time.perf_counter() - start:.1f} s")
    wanted = args.stages.split(",")
    pairs = []
    if "features" in wanted:
        pairs.append(("features", "features_duckdb", "features_pandas"))
    if "training" in wanted:
        pairs.append(("training (fit on the open dataset)", "train_lightgbm", "train_xgboost"))
    if "scoring" in wanted:
        pairs.append(("scoring (all users x slots)", "score", "raw_predict"))
    print(f"{'stage':<38}{'run':<18}{'wall s':>9}{'peak MB':>10}{'ratio vs baseline':>20}")
    for title, main_stage, base_stage in pairs:
        a, b = _child(main_stage, data), _child(base_stage, data)
        if "error" in a or "error" in b:
            print(f"{title:<38} failed: {a.get('error') or b.get('error')}")
            continue
        print(f"{title:<38}{main_stage:<18}{a['seconds']:>9.1f}{a['peak_mb']:>10.0f}"
              f"{a['seconds'] / b['seconds']:>13.2f} time, {a['peak_mb'] / b['peak_mb']:.2f} mem")
        print(f"{'':<38}{base_stage:<18}{b['seconds']:>9.1f}{b['peak_mb']:>10.0f}{'(baseline)':>20}")
        extra = {k: v for k, v in a.items() if k not in ("seconds", "peak_mb")}
        print(f"{'':<38}{json.dumps(extra)}")


if __name__ == "__main__":
    main()
