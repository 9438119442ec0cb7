"""The nightly refresh at scale, beside a hand-written DuckDB aggregate run in the same command.

    .venv/bin/python benchmarks/bench_refresh.py --users 1000000 --days 100
    .venv/bin/python benchmarks/bench_refresh.py --data /path/to/sim     # a `sendtime simulate` folder

What it does, each step a child process (its own wall time and peak RSS):

1. simulate ``--users`` users for ``--days`` + 1 days (unless ``--data``) and split the log
   into ``part-1.parquet`` (up to the last day) and ``part-2.parquet`` (the last day): the
   nightly arrival of one more day;
2. train and promote champions of both tasks on a small log (``--train-users``, 120 days: churn needs three label horizons) in a
   throw-away MLflow store (the refresh's cost does not depend on the training data);
3. the baseline: a hand-written DuckDB aggregate over part-1, per-user event counts by
   local hour (the users table joined for the time zone) -- the cheapest honest pass over
   the same file;
4. ``sendtime features`` on part-1; ``sendtime score --full`` on part-1 (a full refresh);
   then part-2 arrives and ``sendtime score`` moves the feature state forward (the
   incremental refresh of one more day);
5. prints seconds, peak memory and the ratios to the aggregate, and where each refresh's time
   went (its logged steps); ``--json`` writes them.

A second hand-written query, also over part-1, is the floor of the features target: the
same aggregate and the opens matched to their sends by message id (the least of the
contract's open attribution: no opens without ids, no windows, no recency) in one
statement. The features cannot cost less than what they must at least compute.

Targets (issue #11): full refresh <= 90 s and <= 8x the aggregate; incremental <= 20 s;
peak < 6 GB; features <= 1.3x the aggregate.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SENDTIME = [sys.executable, "-m", "sendtime.cli"]

# a hand-written query timed in its own process: argv events, users, the SQL ({events}, {users} filled in)
TIMED_QUERY = """
import sys, time, duckdb
events, users, sql = sys.argv[1:4]
con = duckdb.connect()
con.execute("SET threads = 2")
start = time.perf_counter()
n = con.execute(sql.format(events=events, users=users)).fetchall()[0]
print(time.perf_counter() - start, n)
"""

AGGREGATE = """
    SELECT count(*), sum(n) FROM (
      SELECT e.user_id, e.event, hour(timezone(u.timezone, CAST(e.ts AS TIMESTAMPTZ))) AS local_hour, count(*) AS n
      FROM read_parquet('{events}') e JOIN read_parquet('{users}') u USING (user_id)
      GROUP BY ALL)"""

FLOOR = """
    WITH e AS MATERIALIZED (SELECT user_id, ts, event, message_id FROM read_parquet('{events}')),
    a AS (SELECT e.user_id, e.event, hour(timezone(u.timezone, CAST(e.ts AS TIMESTAMPTZ))) AS local_hour, count(*) AS n
          FROM e JOIN read_parquet('{users}') u USING (user_id) GROUP BY ALL),
    s AS (SELECT user_id, ts, message_id FROM e WHERE event = 'send'),
    o AS (SELECT user_id, ts, message_id FROM e WHERE event = 'open'),
    t AS (SELECT count(*) AS sends, count(o.ts) AS opened FROM s LEFT JOIN o ON s.user_id = o.user_id
          AND s.message_id = o.message_id AND o.ts >= s.ts AND o.ts <= s.ts + INTERVAL 24 HOUR)
    SELECT (SELECT count(*) FROM a), (SELECT sum(n) FROM a), (SELECT sends FROM t), (SELECT opened FROM t)"""

# "INFO serving.refresh: model scores: 16.6 s (25.5 s of CPU)", "... features of N users ... in 55.7 s"
_STEP = re.compile(r"INFO serving\.refresh: (.+?): ([0-9.]+) s \(")
_FEATURES = re.compile(r"INFO serving\.incremental: features of .* in ([0-9.]+) s$")


def run(args: list[str], env: dict, label: str) -> dict:
    """A child process's wall time and peak RSS (GNU time), its output's last lines, and the
    steps a refresh logged."""
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "%M", *args], cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"{label} failed (rc {proc.returncode})")
    peak_kb = int(proc.stderr.strip().splitlines()[-1])
    steps = {}
    for line in proc.stderr.splitlines():
        if m := _FEATURES.search(line):
            steps["features"] = float(m.group(1))
        elif m := _STEP.search(line):
            steps[m.group(1)] = float(m.group(2))
    return {"step": label, "seconds": seconds, "peak_gb": peak_kb / 1e6, "out": proc.stdout.strip().splitlines()[-3:],
            "steps": steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--days", type=int, default=100, help="days before the incremental one")
    parser.add_argument("--data", type=Path, help="an existing `sendtime simulate` folder (its last day is split off)")
    parser.add_argument("--train-users", type=int, default=20_000)
    parser.add_argument("--work", type=Path, help="keep the work folder here (default: a temporary one)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--setup-only", action="store_true",
                        help="prepare the work folder (log split, champions) and stop; rerun with --work to time")
    a = parser.parse_args()
    work = a.work or Path(tempfile.mkdtemp(prefix="sendtime-bench-refresh-"))
    work.mkdir(parents=True, exist_ok=True)
    overlay = work / "sendtime.toml"
    overlay.write_text("\n".join([
        "[tracking]", f'tracking_uri = "sqlite:///{work}/mlruns/mlflow.db"', f'artifact_root = "{work}/mlruns/artifacts"', "",
        "[tuning]", f'storage = "sqlite:///{work}/mlruns/optuna.db"', "",
        "[serving]", f'serving_dir = "{work}/serving"', ""]))
    env = {**os.environ, "BENTOML_DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    cli = [*SENDTIME, "-q", "-c", str(overlay)]
    steps = []

    data = a.data
    if data is None:
        data = work / "sim"
        if not (data / "events.parquet").exists():
            steps.append(run([*cli, "simulate", "--out", str(data), "--users", str(a.users), "--days", str(a.days + 1)],
                             env, "simulate"))
    log_dir = work / "events"
    split = work / "split.json"
    if not split.exists():
        import duckdb

        shutil.rmtree(log_dir, ignore_errors=True)
        log_dir.mkdir()
        con = duckdb.connect()
        last = con.execute(f"SELECT max(ts) FROM read_parquet('{data / 'events.parquet'}')").fetchall()[0][0]
        cut = con.execute("SELECT CAST(? AS TIMESTAMPTZ) - INTERVAL 1 DAY", [last]).fetchall()[0][0]
        for name, cond in (("part-1", "ts <= ?"), ("part-2", "ts > ?")):
            con.execute(f"COPY (SELECT * FROM read_parquet('{data / 'events.parquet'}') WHERE {cond}) "
                        f"TO '{work / (name + '.parquet')}' (FORMAT parquet)", [cut])
        split.write_text(json.dumps({"cut": str(cut), "last": str(last)}))
    cut = json.loads(split.read_text())
    part1, part2 = work / "part-1.parquet", work / "part-2.parquet"
    for old in log_dir.glob("*.parquet"):
        old.unlink()
    shutil.copy(part1, log_dir / "part-1.parquet")
    users = data / "users.parquet"

    # champions, trained on a small log of the same simulator
    train = work / "train"
    if not (work / "mlruns").exists():
        steps.append(run([*cli, "simulate", "--out", str(train), "--users", str(a.train_users), "--days", "120"],
                         env, "simulate training log"))
        for task in ("open", "churn"):
            steps.append(run([*cli, "train", "--task", task, "--model", "lightgbm", "--events",
                              str(train / "events.parquet"), "--users", str(train / "users.parquet")],
                             env, f"train {task}"))
            steps.append(run([*cli, "promote", "--task", task], env, f"promote {task}"))
    shutil.rmtree(work / "serving", ignore_errors=True)
    if a.setup_only:
        print(f"work folder ready: {work}")
        return

    aggregate = run([sys.executable, "-c", TIMED_QUERY, str(part1), str(users), AGGREGATE], env,
                    "hand-written DuckDB aggregate")
    floor = run([sys.executable, "-c", TIMED_QUERY, str(part1), str(users), FLOOR], env,
                "hand-written aggregate + attribution")
    features = run([*cli, "features", "--events", str(log_dir), "--users", str(users), "--out", str(work / "features")],
                   env, "sendtime features (full log)")
    # not quiet: the refresh logs its steps
    loud = [c for c in cli if c != "-q"]
    full = run([*loud, "score", "--full", "--events", str(log_dir), "--users", str(users), "--out",
                str(work / "tags-full.parquet")], env, "sendtime score --full")
    shutil.copy(part2, log_dir / "part-2.parquet")
    incremental = run([*loud, "score", "--events", str(log_dir), "--users", str(users), "--out",
                       str(work / "tags-next.parquet")], env, "sendtime score (one more day)")
    steps += [aggregate, floor, features, full, incremental]
    base = aggregate["seconds"]
    print(f"\nlog: {data} split at {cut['cut']} (last event {cut['last']}); work folder {work}")
    print(f"{'step':<40} {'seconds':>9} {'x aggregate':>12} {'peak GB':>8}")
    for s in steps:
        print(f"{s['step']:<40} {s['seconds']:>9.1f} {s['seconds'] / base:>12.2f} {s['peak_gb']:>8.2f}")
    for line in incremental["out"]:
        print("  " + line)
    print(f"\n{'refresh step (logged, s)':<40} {'--full':>9} {'one more day':>13}")
    for name in dict.fromkeys([*full["steps"], *incremental["steps"]]):
        cells = [f"{r['steps'][name]:.1f}" if name in r["steps"] else "-" for r in (full, incremental)]
        print(f"{name:<40} {cells[0]:>9} {cells[1]:>13}")
    print("  (the feature snapshot is written while the churn reasons and the tag table are made; the rest of "
          "each total is the process's start: imports, reading the log's schema, loading the champions)")
    print(f"features floor: the hand-written aggregate + attribution is {floor['seconds'] / base:.2f}x the aggregate")
    verdict = {
        "full refresh <= 90 s": full["seconds"] <= 90,
        "full refresh <= 8x aggregate": full["seconds"] <= 8 * base,
        "incremental refresh <= 20 s": incremental["seconds"] <= 20,
        "peak < 6 GB": max(full["peak_gb"], incremental["peak_gb"], features["peak_gb"]) < 6,
        "features <= 1.3x aggregate": features["seconds"] <= 1.3 * base,
    }
    for k, ok in verdict.items():
        print(f"  {'met' if ok else 'NOT met'}: {k}")
    if a.json:
        a.json.write_text(json.dumps({"steps": steps, "verdict": verdict, "time": time.time()}, indent=2, default=str))


if __name__ == "__main__":
    main()
