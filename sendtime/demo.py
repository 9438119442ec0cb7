"""The main job end to end on the embedded default: simulate, train both tasks with both
libraries, promote, score tags, evaluate, start the service, ask it, stop it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pandas as pd
import typer

from configs import Config, Library, Task

__all__ = ["run_demo", "free_port", "wait_ready", "start_server"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int, env: dict | None = None, config: Path | None = None) -> subprocess.Popen:
    argv = [sys.executable, "-m", "sendtime.cli"]
    if config:
        argv += ["--config", str(config)]
    argv += ["serve", "--port", str(port)]
    return subprocess.Popen(argv, env={**os.environ, **(env or {})}, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def wait_ready(port: int, proc: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
            raise RuntimeError(f"the service exited with status {proc.returncode}:\n{out[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"the service did not become ready on port {port} within {timeout:.0f} s")


def _step(title: str) -> None:
    typer.secho(f"\n== {title}", bold=True)


def _run(args: list[str], config: Path | None) -> None:
    argv = [sys.executable, "-m", "sendtime.cli"] + (["--config", str(config)] if config else []) + args
    typer.echo("$ sendtime " + " ".join(args))
    subprocess.run(argv, check=True)


def run_demo(cfg: Config, data_dir: Path, users: int | None, config: Path | None) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    ev, us, truth = (str(data_dir / f) for f in ("events.parquet", "users.parquet", "truth.parquet"))
    tags = str(data_dir / "tags.parquet")
    _step("1. simulate a behaviour log with known truth")
    _run(["simulate", "--out", str(data_dir)] + (["--users", str(users)] if users else []), config)
    _step("2. train open-time and churn models with LightGBM and XGBoost (MLflow runs + registry)")
    for task in Task:
        for model in Library:
            _run(["train", "--task", task, "--model", model, "--events", ev, "--users", us], config)
    _step("3. promote the best version of each task to @champion")
    for task in Task:
        _run(["promote", "--task", task], config)
    _step("4. nightly tag refresh with the champions")
    _run(["score", "--events", ev, "--users", us, "--out", tags], config)
    _run(["tags"], config)
    _step("5. evaluate against the simulator's truth, beside the baselines")
    _run(["evaluate", "--tags", tags, "--truth", truth], config)
    _step("6. start the prediction service and ask it")
    frame = pd.read_parquet(tags, columns=["user_id", "cold_start", "unsubscribed"])
    warm = frame.loc[~frame["cold_start"] & ~frame["unsubscribed"], "user_id"].head(2).tolist()
    cold = frame.loc[frame["cold_start"], "user_id"].head(1).tolist() or ["never-seen-user"]
    port = free_port()
    proc = start_server(port, config=config)
    try:
        wait_ready(port, proc)
        body = {"user_ids": warm + cold, "window_start": pd.Timestamp.now(tz="UTC").floor("h").isoformat(),
                "window_hours": 24}
        typer.echo(f"$ curl -X POST http://127.0.0.1:{port}/recommend -H 'content-type: application/json' "
                   f"-d '{json.dumps(body)}'")
        answer = httpx.post(f"http://127.0.0.1:{port}/recommend", json=body, timeout=30)
        answer.raise_for_status()
        for r in answer.json()["results"]:
            probs = r.pop("slot_open_probs")
            r["slot_open_probs"] = f"[{len(probs)} slots, max {max(probs):.3f}]" if probs else None
            typer.echo(json.dumps(r))
        bad = httpx.post(f"http://127.0.0.1:{port}/recommend", json={"user_ids": "u1"}, timeout=30)
        typer.echo(f"a malformed request gets {bad.status_code}: {bad.text[:200]}")
    finally:
        stop_server(proc)
    typer.secho("\ndone: runs, plots and registered models are in the MLflow UI: "
                "mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db", bold=True)
