"""Latency of POST /recommend on a real server over loopback, for 1 and for 100 users,
beside BentoML's own /livez in the same run (the framework's floor on this machine).

    .venv/bin/python benchmarks/bench_recommend.py [--config FILE] [--requests 300]

Needs a scored serving folder and champions (run `make demo` or `sendtime score` first).
Requests go to 127.0.0.1 only, are bounded in count, and the server is stopped at the end.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import httpx
import numpy as np
import pandas as pd

from configs import load_config
from sendtime.demo import free_port, start_server, stop_server, wait_ready
from serving.tagstore import current_refresh


def _timed(client: httpx.Client, method: str, url: str, n: int, **kwargs) -> np.ndarray:
    out = []
    for _ in range(n):
        start = time.perf_counter()
        r = client.request(method, url, **kwargs)
        out.append(time.perf_counter() - start)
        r.raise_for_status()
    return np.array(out) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument("--requests", type=int, default=300)
    args = parser.parse_args()
    cfg = load_config(args.config)
    refresh = current_refresh(Path(cfg.serving.serving_dir))
    if refresh is None:
        raise SystemExit("no scored serving folder: run `make demo` or `sendtime score` first")
    users = pd.read_parquet(refresh.tags, columns=["user_id", "cold_start"])
    warm = users.loc[~users["cold_start"], "user_id"].to_numpy()
    rng = np.random.default_rng(0)
    port = free_port()
    proc = start_server(port, config=args.config)
    try:
        wait_ready(port, proc, timeout=120)
        base = f"http://127.0.0.1:{port}"
        with httpx.Client(timeout=30) as client:
            _timed(client, "POST", f"{base}/recommend", 20, json={"user_ids": list(warm[:100])})  # warm-up
            live = _timed(client, "GET", f"{base}/livez", args.requests)
            rows = {}
            for n_users in (1, 100):
                lat = []
                for _ in range(args.requests):
                    ids = list(rng.choice(warm, n_users, replace=False))
                    lat.append(_timed(client, "POST", f"{base}/recommend", 1, json={"user_ids": ids})[0])
                rows[n_users] = np.array(lat)
        print(f"{len(users)} users in the snapshot; {args.requests} sequential requests each, loopback")
        print(f"{'endpoint':<26}{'median ms':>10}{'p99 ms':>10}{'x /livez median':>18}")
        floor = statistics.median(live)
        print(f"{'GET /livez (baseline)':<26}{floor:>10.2f}{np.percentile(live, 99):>10.2f}{1.0:>18.1f}")
        for n_users, lat in rows.items():
            med = float(np.median(lat))
            print(f"{f'POST /recommend {n_users} user(s)':<26}{med:>10.2f}{np.percentile(lat, 99):>10.2f}"
                  f"{med / floor:>18.1f}")
    finally:
        stop_server(proc)


if __name__ == "__main__":
    main()
