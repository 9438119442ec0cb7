"""/recommend under load, beside the floor: a bare FastAPI + uvicorn app answering the same
users' nightly tag rows from a dict, measured in the same run with the same load tool.

    make bench-tools                     # installs wrk (Debian package) if missing
    .venv/bin/python benchmarks/bench_load.py [--config C] [--duration 15] [--connections 16]

It starts `sendtime serve` on the current refresh (after `make demo`, the demo's) and the
bare app, drives each with wrk (1 user a request, then 100), and prints requests/s and the
latency percentiles of each, with the service's ratio to the bare app.
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

import httpx
import pandas as pd

from configs import load_config
from sendtime.demo import free_port, start_server, stop_server, wait_ready
from serving.tagstore import current_refresh

ROOT = Path(__file__).resolve().parents[1]

LUA = r"""
local ids = {}
for line in io.lines(os.getenv("BENCH_IDS")) do ids[#ids + 1] = line end
local per = tonumber(os.getenv("BENCH_PER_REQUEST"))
local token = os.getenv("BENCH_TOKEN") or ""
math.randomseed(os.time())
request = function()
  local pick = {}
  for i = 1, per do pick[i] = '"' .. ids[math.random(#ids)] .. '"' end
  local body = '{"user_ids":[' .. table.concat(pick, ",") .. '],"window_start":"2026-05-05T00:00:00Z","window_hours":24}'
  local headers = {["Content-Type"] = "application/json"}
  if token ~= "" then headers["Authorization"] = "Bearer " .. token end
  return wrk.format("POST", "/recommend", headers, body)
end
done = function(summary, latency, requests)
  io.write(string.format("RESULT %d %d %d %d %.1f %.1f %.1f\n", summary.requests,
    summary.errors.status, summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    summary.duration, latency:percentile(50) / 1000, latency:percentile(99) / 1000, latency.mean / 1000))
end
"""


def run_wrk(port: int, per_request: int, seconds: int, connections: int, ids_file: Path, lua: Path,
            token: str = "", delay_ms: int = 0) -> dict:
    env = dict(os.environ, BENCH_IDS=str(ids_file), BENCH_PER_REQUEST=str(per_request), BENCH_TOKEN=token,
               BENCH_DELAY_MS=str(delay_ms))
    out = subprocess.run(["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", str(lua),
                          f"http://127.0.0.1:{port}"], capture_output=True, text=True, env=env, check=True).stdout
    line = next(x for x in out.splitlines() if x.startswith("RESULT"))
    n, bad_status, socket_errors, micros, p50, p99, mean = line.split()[1:]
    return {"req_s": int(n) / (int(micros) / 1e6), "p50_ms": float(p50), "p99_ms": float(p99),
            "mean_ms": float(mean), "non_2xx": int(bad_status), "socket_errors": int(socket_errors)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument("--duration", type=int, default=15, help="seconds of load per measurement")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--per-request", default="1,100", help="users per request, comma-separated")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed: run `make bench-tools` (Debian package wrk)")
    cfg = load_config(args.config)
    refresh = current_refresh(Path(cfg.serving.serving_dir))
    if refresh is None:
        sys.exit(f"no refresh under {cfg.serving.serving_dir}: run `make demo` (or `sendtime score`) first")
    work = Path(tempfile.mkdtemp(prefix="sendtime-load-"))
    tags = pd.read_parquet(refresh.tags, columns=["user_id"])
    ids_file, lua = work / "ids.txt", work / "load.lua"
    ids_file.write_text("\n".join(tags["user_id"].astype(str)) + "\n")
    lua.write_text(LUA)
    token = cfg.serving.resolved_token()
    rows = []
    bare_port, svc_port = free_port(), free_port()
    bare = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "bare_lookup_app.py"), str(refresh.tags),
                             str(bare_port)], start_new_session=True)
    svc = start_server(svc_port, config=args.config)
    try:
        wait_ready(svc_port, svc, timeout=180)
        for _ in range(100):
            try:
                if httpx.get(f"http://127.0.0.1:{bare_port}/livez", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        for per in [int(x) for x in args.per_request.split(",")]:
            for name, port in (("bare FastAPI tag look-up", bare_port), ("sendtime /recommend", svc_port)):
                run_wrk(port, per, 2, args.connections, ids_file, lua, token)      # warm up
                r = run_wrk(port, per, args.duration, args.connections, ids_file, lua, token)
                rows.append({"users/request": per, "server": name, **r})
                print(json.dumps(rows[-1]), flush=True)
    finally:
        stop_server(svc)
        os.killpg(bare.pid, 15)
        bare.wait()
    table = pd.DataFrame(rows)
    print(f"\n{len(tags)} users in the snapshot; {args.connections} connections, {args.duration} s each (wrk)")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.1f}"))
    for per, group in table.groupby("users/request"):
        base, svc_row = group.iloc[0], group.iloc[1]
        print(f"{per} user(s)/request: service/bare throughput {svc_row.req_s / base.req_s:.2f}x, "
              f"p99 {svc_row.p99_ms / base.p99_ms:.2f}x the bare app's")
    if re.search("nan", table.to_string()):
        sys.exit(1)


if __name__ == "__main__":
    main()
