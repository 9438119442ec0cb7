"""A soak at 80 % of the measured maximum rate, with a live reload in the middle, and a
burst of 200 concurrent 1,000-id requests (loopback only, bounded in time).

    .venv/bin/python benchmarks/soak.py [--config C] [--minutes 10]

It starts `sendtime serve` on the current refresh, measures the maximum rate with wrk
(1 user a request, 16 connections), then holds 80 % of it for --minutes while, half way,
`sendtime score` publishes a new refresh that the service swaps in. It reports the
requests, the non-2xx answers and socket errors, the workers' resident memory after the
warm-up and at the end, whether the reload happened, and the burst's status codes; it
exits non-zero when any 5xx, failed request or missing reload is seen.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pandas as pd
import psutil

from configs import load_config
from sendtime.demo import free_port, start_server, stop_server, wait_ready
from serving.tagstore import current_refresh

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_load import LUA, run_wrk  # noqa: E402

PACED = LUA.replace("request = function()", """local pause = tonumber(os.getenv("BENCH_DELAY_MS") or "0")
delay = function() return pause end
request = function()""")


def workers_rss(server: subprocess.Popen) -> int:
    procs = psutil.Process(server.pid).children(recursive=True)
    return sum(p.memory_info().rss for p in procs if "worker.service" in " ".join(p.cmdline()))


def burst(port: int, ids: list[str], token: str, n: int = 200, per: int = 1000) -> Counter:
    headers = {"Authorization": f"Bearer {token}"} if token else {}

    async def one(client: httpx.AsyncClient, k: int) -> int:
        body = {"user_ids": [ids[(k * per + i) % len(ids)] for i in range(per)]}
        try:
            r = await client.post(f"http://127.0.0.1:{port}/recommend", json=body, headers=headers)
            return r.status_code
        except httpx.HTTPError as exc:
            return -1 if not isinstance(exc, httpx.TimeoutException) else -2

    async def run() -> list[int]:
        limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
        async with httpx.AsyncClient(limits=limits, timeout=120) as client:
            return await asyncio.gather(*(one(client, k) for k in range(n)))

    return Counter(asyncio.run(run()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=16)
    args = parser.parse_args()
    cfg = load_config(args.config)
    refresh = current_refresh(Path(cfg.serving.serving_dir))
    if refresh is None:
        sys.exit(f"no refresh under {cfg.serving.serving_dir}: run `make demo` first")
    manifest = refresh.read_manifest()
    events = manifest.get("events")
    users = Path(events).with_name("users.parquet") if events else None
    work = Path(tempfile.mkdtemp(prefix="sendtime-soak-"))
    ids = pd.read_parquet(refresh.tags, columns=["user_id"])["user_id"].astype(str).tolist()
    ids_file, lua = work / "ids.txt", work / "paced.lua"
    ids_file.write_text("\n".join(ids) + "\n")
    lua.write_text(PACED)
    token = cfg.serving.resolved_token()
    port = free_port()
    server = start_server(port, config=args.config)
    report: dict = {"users_in_snapshot": len(ids), "refresh_before": manifest.get("refresh_id")}
    try:
        wait_ready(port, server, timeout=180)
        run_wrk(port, 1, 3, args.connections, ids_file, lua, token)
        peak = run_wrk(port, 1, 10, args.connections, ids_file, lua, token)   # pause 0: as fast as it goes
        target = 0.8 * peak["req_s"]
        report.update(max_req_s=round(peak["req_s"], 1), target_req_s=round(target, 1))
        seconds = int(args.minutes * 60)
        # wrk paces by a pause between a connection's requests: calibrate it once on 10 s
        delay_ms = max(1, int(args.connections / target * 1000))
        probe = run_wrk(port, 1, 10, args.connections, ids_file, lua, token, delay_ms=delay_ms)
        cycle_ms = args.connections / probe["req_s"] * 1000           # pause + answer, per request
        delay_ms = max(1, round(delay_ms - (cycle_ms - args.connections / target * 1000)))
        report["pause_ms"] = delay_ms
        env = dict(os.environ, BENCH_IDS=str(ids_file), BENCH_PER_REQUEST="1", BENCH_TOKEN=token,
                   BENCH_DELAY_MS=str(delay_ms))
        load = subprocess.Popen(["wrk", "-t2", f"-c{args.connections}", f"-d{seconds}s", "--latency", "-s", str(lua),
                                 f"http://127.0.0.1:{port}"], stdout=subprocess.PIPE, text=True, env=env)
        time.sleep(min(60, seconds / 4))
        report["rss_after_warmup_mb"] = round(workers_rss(server) / 2**20, 1)

        def reload_midway() -> None:
            time.sleep(max(0, seconds / 2 - min(60, seconds / 4)))
            argv = [sys.executable, "-m", "sendtime.cli", "-q"] + (["--config", str(args.config)] if args.config else [])
            argv += ["score", "--events", events, "--out", str(work / "tags.parquet")]
            if users and users.exists():
                argv += ["--users", str(users)]
            report["reload_score_exit"] = subprocess.run(argv, capture_output=True, text=True).returncode

        trigger = threading.Thread(target=reload_midway)
        trigger.start()
        timeline: list[tuple[int, float]] = []
        began = time.monotonic()

        def sample() -> None:
            while load.poll() is None:
                timeline.append((round(time.monotonic() - began), round(workers_rss(server) / 2**20, 1)))
                time.sleep(10)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        out, _ = load.communicate()
        trigger.join()
        report["rss_timeline_mb"] = timeline
        report["rss_at_end_mb"] = round(workers_rss(server) / 2**20, 1)
        line = next(x for x in out.splitlines() if x.startswith("RESULT"))
        n, bad_status, socket_errors, micros, p50, p99, _ = line.split()[1:]
        report.update(requests=int(n), achieved_req_s=round(int(n) / (int(micros) / 1e6), 1), non_2xx=int(bad_status),
                      socket_errors=int(socket_errors), p50_ms=float(p50), p99_ms=float(p99))
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        seen = {httpx.get(f"http://127.0.0.1:{port}/models", headers=headers, timeout=10).json()["refresh_id"]
                for _ in range(8)}
        report["refresh_after"] = sorted(seen)
        report["burst_200x1000_ids"] = dict(burst(port, ids, token))
    finally:
        stop_server(server)
    growth = report["rss_at_end_mb"] / report["rss_after_warmup_mb"] - 1
    report["rss_growth"] = f"{growth:+.1%}"
    print(json.dumps(report, indent=2))
    failed = (report["non_2xx"] or report["socket_errors"] or report["refresh_before"] in report["refresh_after"]
              or any(code >= 500 or code < 0 for code in report["burst_200x1000_ids"]))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
