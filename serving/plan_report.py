"""Showing a plan: expected opens by hour beside the capacity and the two baselines, as
text for the terminal and as a plot and a table in MLflow."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from urllib.parse import urlparse

import pandas as pd

from configs import Config

__all__ = ["format_plan", "log_plan_to_mlflow"]

log = logging.getLogger(__name__)


def format_plan(by_hour: pd.DataFrame, summary: dict) -> str:
    """The by-hour table (hours with any send) and the totals, for the terminal."""
    shown = by_hour[(by_hour.filter(like="_sends").sum(axis=1) > 0)].copy()
    shown["hour_start"] = shown["hour_start"].dt.strftime("%Y-%m-%d %H:%M")
    table = pd.DataFrame(
        {
            "hour (UTC)": shown["hour_start"],
            "capacity": shown["capacity"].map(lambda v: "-" if pd.isna(v) else f"{v:.0f}"),
            "plan sends": shown["plan_sends"],
            "plan opens": shown["plan_expected_opens"].round(1),
            "global-best sends": shown["global_best_sends"],
            "global-best opens": shown["global_best_expected_opens"].round(1),
            "own-best sends": shown["own_best_sends"],
            "own-best opens": shown["own_best_expected_opens"].round(1),
        }
    )
    s = summary
    reasons = ", ".join(f"{k} {v}" for k, v in s["reasons"].items()) or "none"
    return (
        table.to_string(index=False) + "\n"
        f"expected opens: plan {s['expected_opens']:.1f} | everyone at the global best allowed "
        f"hour {s['global_best_expected_opens']:.1f} | each at their own best allowed hour, "
        f"overflow held over {s['own_best_expected_opens']:.1f}\n"
        f"{s['planned']} of {s['users']} users planned ({s['explored']} explored); "
        f"not sent: {reasons}\n"
        f"solver: {s['solver']}, within {100 * s['solver_gap']:.3f}% of the optimum, "
        f"{s['solver_seconds']:.1f} s"
    )


def _artifact_location(cfg: Config, experiment: str) -> str:
    uri = cfg.tracking.resolved_uri()
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite" and uri != cfg.tracking.tracking_uri:
        # a store named by MLFLOW_TRACKING_URI keeps its artifacts beside it
        root = Path(uri[len("sqlite:///") :]).parent / "artifacts"
    else:
        root = Path(cfg.tracking.artifact_root)
    return (root.resolve() / experiment).as_uri()


def log_plan_to_mlflow(
    by_hour: pd.DataFrame, summary: dict, cfg: Config, params: dict
) -> str | None:
    """A run in the ``<experiment>-plans`` experiment with the parameters, the totals, the
    by-hour table and the plot; returns its id (None when MLflow is not reachable)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import mlflow

    uri = cfg.tracking.resolved_uri()
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    name = f"{cfg.tracking.experiment}-plans"
    experiment = mlflow.get_experiment_by_name(name)
    exp_id = (
        experiment.experiment_id
        if experiment
        else mlflow.create_experiment(name, artifact_location=_artifact_location(cfg, name))
    )
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 7), sharex=True)
    x = by_hour["hour_start"].dt.strftime("%d %H:%M")
    for key, label in (
        ("plan", "plan"),
        ("global_best", "everyone at the global best hour"),
        ("own_best", "own best hour, overflow held over"),
    ):
        top.plot(x, by_hour[f"{key}_sends"], marker="o", label=label)
        bottom.plot(x, by_hour[f"{key}_expected_opens"], marker="o", label=label)
    if by_hour["capacity"].notna().any():
        top.plot(x, by_hour["capacity"], color="black", linestyle="--", label="capacity")
    top.set_ylabel("sends")
    bottom.set_ylabel("expected opens")
    bottom.set_xlabel("hour of the window (UTC)")
    top.legend(fontsize=8)
    top.set_title(
        f"plan: {summary['expected_opens']:.0f} expected opens; global best "
        f"{summary['global_best_expected_opens']:.0f}; "
        f"own best {summary['own_best_expected_opens']:.0f}"
    )
    plt.setp(bottom.get_xticklabels(), rotation=60, fontsize=7)
    fig.tight_layout()
    with (
        mlflow.start_run(experiment_id=exp_id, run_name="plan") as run,
        tempfile.TemporaryDirectory() as tmp,
    ):
        mlflow.set_tag("kind", "plan")
        mlflow.log_params({k: v for k, v in params.items() if v is not None})
        mlflow.log_metrics(
            {
                k: float(summary[k])
                for k in (
                    "users",
                    "planned",
                    "explored",
                    "expected_opens",
                    "global_best_expected_opens",
                    "own_best_expected_opens",
                    "solver_gap",
                    "plan_seconds",
                )
            }
        )
        path = Path(tmp) / "plan_by_hour.png"
        fig.savefig(path, dpi=110)
        mlflow.log_artifact(str(path))
        table = Path(tmp) / "plan_by_hour.csv"
        by_hour.to_csv(table, index=False)
        mlflow.log_artifact(str(table))
        run_id = run.info.run_id
    plt.close(fig)
    return run_id
