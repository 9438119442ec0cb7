"""``sendtime plan`` and ``sendtime evaluate-policy``: campaigns under the rules, and what a
timing policy would have earned. Registered on the main app by :func:`register`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

__all__ = ["register"]


def _ids(value: Optional[str]) -> Optional[list[str]]:
    """--ids: a file with one id a line, or ids separated by commas."""
    if value is None:
        return None
    path = Path(value)
    if path.is_file():
        text = path.read_text()
        return [line.strip() for line in text.splitlines() if line.strip()]
    return [part.strip() for part in value.split(",") if part.strip()]


def _window_start(value: str):
    from features.events import to_utc

    try:
        return to_utc(value)
    except (ValueError, TypeError) as exc:
        raise ValueError(
            f"--window-start: {value!r} is not a time (use ISO 8601, e.g. 2026-05-05T00:00:00Z)"
        ) from exc


def register(app: typer.Typer) -> None:
    """Add the ``plan`` and ``evaluate-policy`` commands to ``app`` (the sendtime CLI)."""
    from sendtime import cli

    @app.command("plan")
    @cli.cli_job
    def plan(
        window_start: str = typer.Option(
            ..., "--window-start", help="Start of the campaign window (ISO 8601; naive = UTC)."
        ),
        out: Path = typer.Option(
            ...,
            "--out",
            "-o",
            help=(
                "Plan to write (Parquet): user_id, send_at, slot, expected_open_prob, "
                "propensity, reason."
            ),
        ),
        window_hours: Optional[int] = typer.Option(
            None,
            "--window-hours",
            help="Length of the window in hours (default plan.default_window_hours).",
        ),
        audience: Optional[str] = typer.Option(
            None,
            "--audience",
            help=(
                "SQL condition over the tag store's tags table, e.g. \"churn_tier = 'high'\" "
                "(default: every user)."
            ),
        ),
        ids: Optional[str] = typer.Option(
            None,
            "--ids",
            help="Audience as user ids: a file with one id a line, or ids separated by commas.",
        ),
        events: Optional[Path] = typer.Option(
            None,
            "--events",
            "-e",
            help="Event log whose sends and opens count toward caps, silences and quotas.",
        ),
        users: Optional[Path] = typer.Option(
            None, "--users", "-u", help="Users table (signup_ts for the new-user rule, time zones)."
        ),
        channel: Optional[str] = typer.Option(
            None,
            "--channel",
            help=(
                "Channel of the campaign (default plan.default_channel); quotas apply on "
                "plan.quota_channels."
            ),
        ),
        capacity_per_hour: Optional[int] = typer.Option(
            None,
            "--capacity-per-hour",
            help=(
                "Most sends in any hour of the window (0: no limit; default "
                "plan.capacity_per_hour)."
            ),
        ),
        explore: Optional[float] = typer.Option(
            None,
            "--explore",
            help=(
                "Share of users sent at a uniformly random allowed hour, with logged "
                "propensities (default plan.explore)."
            ),
        ),
        min_open_prob: Optional[float] = typer.Option(
            None,
            "--min-open-prob",
            help="Skip users whose best allowed open probability is below this (reason low_value).",
        ),
        serving_dir: Optional[Path] = typer.Option(
            None,
            "--serving-dir",
            help="Where `score` published the tags (default serving.serving_dir).",
        ),
        tag_store: Optional[str] = cli.TagStoreOpt,
        seed: int = typer.Option(
            0, "--seed", help="Seed of the exploration draws and the baselines' queue order."
        ),
        mlflow_log: Optional[bool] = typer.Option(
            None,
            "--mlflow/--no-mlflow",
            help="Log the by-hour table and plot to MLflow (default plan.log_to_mlflow).",
        ),
        quarantine: Optional[Path] = cli.QuarantineOpt,
    ) -> None:
        """Plan a campaign: one send time per audience user inside the window, under quiet
        hours, frequency caps, silences, quotas and the hourly capacity, with the most
        expected opens; the by-hour table beside two baselines is printed."""
        from configs import write_atomic
        from serving.plan import plan_campaign
        from serving.plan_report import format_plan, log_plan_to_mlflow

        cfg = cli.current_config()
        start = _window_start(window_start)
        lg = cli.open_events(events, users, cfg, quarantine) if events is not None else None
        if users is not None and events is None:
            raise ValueError("--users needs --events (the users table comes with the log)")
        result = plan_campaign(
            cfg,
            start,
            serving_dir=serving_dir,
            audience=audience,
            user_ids=_ids(ids),
            log_=lg,
            tag_store_url=cli.tag_store_url(cfg, tag_store, serving_dir),
            window_hours=window_hours,
            channel=channel,
            capacity_per_hour=capacity_per_hour,
            explore=explore,
            min_open_prob=min_open_prob,
            seed=seed,
        )
        write_atomic(out, lambda tmp: result.rows.to_parquet(tmp, index=False))
        typer.echo(format_plan(result.by_hour, result.summary))
        typer.echo(
            f"plan of {result.summary['users']} users -> {out} "
            f"(audience read in {result.summary['audience_seconds']:.1f} s, "
            f"planned in {result.summary['plan_seconds']:.1f} s)"
        )
        if cfg.plan.log_to_mlflow if mlflow_log is None else mlflow_log:
            run_id = log_plan_to_mlflow(
                result.by_hour,
                result.summary,
                cfg,
                {
                    "window_start": start.isoformat(),
                    "window_hours": result.summary["window_hours"],
                    "audience": audience,
                    "channel": result.summary["channel"],
                    "capacity_per_hour": result.summary["capacity_per_hour"],
                    "explore": result.summary["explore"],
                    "out": str(out),
                },
            )
            typer.echo(f"by-hour plot logged to MLflow run {run_id}")

    @app.command("evaluate-policy")
    @cli.cli_job
    def evaluate_policy(
        events: Path = cli.EventsOpt,
        policy: str = typer.Option(
            ...,
            "--policy",
            help=(
                "champion (each user's best allowed slot in the current tags), global-best (one "
                "slot for all), or a PLAN.parquet file."
            ),
        ),
        users: Optional[Path] = cli.UsersOpt,
        serving_dir: Optional[Path] = typer.Option(
            None,
            "--serving-dir",
            help=(
                "Tag store for champion/global-best and the reward model (default "
                "serving.serving_dir)."
            ),
        ),
        reward_model: str = typer.Option(
            "tags",
            "--reward-model",
            help=(
                "Doubly robust reward model: tags (the tags' slot_open_probs) or per-slot (open "
                "rates per slot from the log)."
            ),
        ),
        since: Optional[str] = typer.Option(
            None, "--since", help="Only sends after this time (ISO 8601)."
        ),
        quarantine: Optional[Path] = cli.QuarantineOpt,
    ) -> None:
        """Off-policy estimate of a timing policy's open rate per send from logged sends with
        propensities: IPS, self-normalised IPS and doubly robust, with 95 % intervals."""
        import pandas as pd

        from serving.policy_eval import evaluate_policy as run
        from serving.tagstore import current_refresh

        cfg = cli.current_config()
        lg = cli.open_events(events, users, cfg, quarantine)
        paths = current_refresh(Path(serving_dir or cfg.serving.serving_dir))
        tags = (
            pd.read_parquet(paths.tags, columns=["user_id", "slot_open_probs"])
            if paths is not None and paths.tags.exists()
            else None
        )
        result = run(
            lg,
            cfg,
            policy,
            tags,
            reward_model=reward_model,
            since=cli.parse_as_of(since) if since else None,
        )
        typer.echo(f"policy {policy}:")
        typer.echo(result.to_text())
