"""The ``sendtime`` command: a thin layer over the pipelines. Each subcommand reads paths,
calls pure functions, writes paths; failures exit non-zero with a one-line reason."""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import Optional

import typer

from configs import PACKAGES, Config, Library, SendtimeError, Task, load_config, resolve_as_of

app = typer.Typer(
    name="sendtime",
    help="When to send to each person, and whom to target: send-time and churn models "
         "from behaviour logs (LightGBM/XGBoost, MLflow, BentoML).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

log = logging.getLogger("sendtime")


class _State:
    config_path: Optional[Path] = None
    quiet: bool = False


STATE = _State()

EventsOpt = typer.Option(..., "--events", "-e", help="Events: a Parquet/CSV file or a folder of them (contract section 1).")
UsersOpt = typer.Option(None, "--users", "-u", help="Optional users table (timezone, signup_ts, attributes).")
AsOfOpt = typer.Option(None, "--as-of", help="Point in time (ISO 8601; naive = UTC). Default: the last event.")
QuarantineOpt = typer.Option(None, "--quarantine", help="Move invalid event rows to this Parquet file instead of failing.")
ClusterOpt = typer.Option(None, "--cluster", metavar="ADDRESS|local:N",
                          help="Run on a Dask cluster: a scheduler address (tcp://host:8786), or local:N to start N "
                               "worker processes for this command. Workers read --events/--users by path (a shared "
                               "file system); users are split into partitions that exchange only the population priors.")


def _setup_logging(verbose: bool) -> None:
    from tqdm.auto import tqdm

    class _TqdmHandler(logging.Handler):
        # writing through tqdm keeps progress bars intact
        def emit(self, record: logging.LogRecord) -> None:
            tqdm.write(self.format(record), file=sys.stderr)

    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    for name in PACKAGES:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.INFO)


def _quiet_third_parties() -> None:
    for key in ("BENTOML_DO_NOT_TRACK", "MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK"):
        os.environ.setdefault(key, "true")
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="mlflow")


@app.callback()
def main(
    config: Optional[Path] = typer.Option(None, "--config", "-c", envvar="SENDTIME_CONFIG",
                                          help="A TOML file overriding configs/default.toml (only the keys it sets)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    STATE.config_path = config
    STATE.quiet = quiet
    _setup_logging(verbose)
    _quiet_third_parties()


def current_config() -> Config:
    return load_config(STATE.config_path)


def _fail(message: str, code: int = 1) -> None:
    first, *rest = str(message).strip().splitlines() or ["failed"]
    typer.echo(f"error: {first}", err=True)
    for line in rest:
        typer.echo(f"  {line.strip()}", err=True)
    raise typer.Exit(code)


def _user_error(exc: BaseException) -> bool:
    """Errors a user can act on: every room raises them as a SendtimeError (bad input, no
    champion, a refused gate, a task the log cannot support), or as the standard ones."""
    return isinstance(exc, (SendtimeError, FileNotFoundError, ValueError))


def cli_job(func):
    """Turn the errors users can act on into a one-line reason and exit status 1."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except Exception as exc:
            if _user_error(exc):
                _fail(str(exc))
            if os.environ.get("SENDTIME_DEBUG"):
                raise
            # anything else is still one line for the batch job's log; the traceback is a
            # rerun away
            log.debug("unexpected failure", exc_info=True)
            _fail(f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else 'failed'}"
                  " (rerun with SENDTIME_DEBUG=1 for the traceback)")

    return wrapper


def parse_as_of(value: Optional[str]) -> Optional[datetime]:
    if value is None:
        return None
    from features.events import to_utc

    try:
        return to_utc(value)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"--as-of: {value!r} is not a time (use ISO 8601, e.g. 2026-05-01T00:00:00Z)") from exc


TagStoreOpt = typer.Option(
    None, "--tag-store", metavar="URL",
    help="PostgreSQL tag store to read (postgresql://user@host:5432/db). Default: SENDTIME_TAG_STORE_URL, else "
         "serving.tag_store_url, unless --serving-dir names a folder; without any, the DuckDB store of the serving folder.")


def tag_store_url(cfg: Config, flag: Optional[str], serving_dir: Optional[Path]) -> Optional[str]:
    """The PostgreSQL tag store a reading command uses, or None for the DuckDB one: the flag,
    else the configured URL, unless the command was pointed at a serving folder."""
    if flag:
        return cfg.serving.resolved_tag_store_url(flag)
    if serving_dir is not None:
        return None
    return cfg.serving.resolved_tag_store_url() or None


def open_events(events: Path, users: Optional[Path], cfg: Config, quarantine: Optional[Path] = None):
    from features.events import open_log

    f = cfg.features
    validated = (Path(f.validation_cache_dir or Path(cfg.serving.serving_dir) / "validated")
                 if f.validation_cache else None)
    return open_log(events, users, default_timezone=cfg.slots.default_timezone,
                    quarantine=quarantine, threads=cfg.models.threads,
                    materialize_max_rows=f.materialize_max_rows,
                    memory_limit=f.duckdb_memory_limit or None, validated_dir=validated)


@app.command()
@cli_job
def simulate(
    out: Path = typer.Option(..., "--out", "-o", help="Folder for events.parquet, users.parquet, truth.parquet, snapshot.txt."),
    users: Optional[int] = typer.Option(None, "--users", help="Number of users (default from config: simulate.users)."),
    days: Optional[int] = typer.Option(None, "--days", help="Days of history before the snapshot (default simulate.days)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed; the same seed gives the same data."),
    exploration: Optional[float] = typer.Option(None, "--exploration", help="Share of sends at a random hour (default simulate.exploration)."),
) -> None:
    """Generate a realistic behaviour log with known truth (true per-slot open probabilities, churn)."""
    from simulator.generate import simulate as run

    cfg = current_config()
    if exploration is not None:
        cfg = cfg.with_overrides(simulate={"exploration": exploration})
    summary = run(cfg, out, users=users, days=days, seed=seed, progress=not STATE.quiet)
    typer.echo(f"simulated {summary.n_users} users, {summary.n_events} events up to "
               f"{summary.snapshot:%Y-%m-%d %H:%M} UTC -> {out}")


@app.command()
@cli_job
def features(
    events: Path = EventsOpt,
    users: Optional[Path] = UsersOpt,
    as_of: Optional[str] = AsOfOpt,
    out: Path = typer.Option(..., "--out", "-o", help="Folder for features.parquet (one row per user)."),
    quarantine: Optional[Path] = QuarantineOpt,
    cluster: Optional[str] = ClusterOpt,
) -> None:
    """Build the point-in-time user-behaviour matrix as of a time (only events at or before it)."""
    from features.matrix import build_matrix
    from features.snapshot import FEATURES_FILE, write_snapshot

    cfg = current_config()
    if cluster:
        from features.partitioned import features_on_cluster

        matrix, priors = features_on_cluster(cluster, events, users, cfg, parse_as_of(as_of), quarantine)
        t = matrix.as_of
    else:
        lg = open_events(events, users, cfg, quarantine)
        t = resolve_as_of(parse_as_of(as_of), lg.max_ts)
        matrix, priors = build_matrix(lg, t, cfg)
    write_snapshot(out, matrix, priors, cfg, events=str(events))
    n_columns = matrix.scalars.shape[1] + len(matrix.slots) * matrix.n_slots
    typer.echo(f"{len(matrix)} users x {n_columns} features as of {t:%Y-%m-%d %H:%M} -> "
               f"{out / FEATURES_FILE} (+ manifest.json)")


@app.command()
@cli_job
def train(
    task: Task = typer.Option(..., "--task", "-t", help="open (per-slot open probability) or churn."),
    model: Library = typer.Option(..., "--model", "-m", help="lightgbm or xgboost."),
    events: Path = EventsOpt,
    users: Optional[Path] = UsersOpt,
    as_of: Optional[str] = AsOfOpt,
    params: Optional[str] = typer.Option(None, "--params", help="JSON of model parameters overriding the config, e.g. '{\"num_leaves\": 63}'."),
    best_params: bool = typer.Option(False, "--best-params", help="Use the best parameters found by `sendtime tune` for this task and model."),
    no_register: bool = typer.Option(False, "--no-register", help="Log the run but do not register a model version."),
    quarantine: Optional[Path] = QuarantineOpt,
    cluster: Optional[str] = ClusterOpt,
) -> None:
    """Train on what happened up to --as-of, measure on a time holdout, log to MLflow and register a version."""
    from training.pipeline import train_task

    cfg = current_config()
    task, model = task.value, model.value
    overrides = json.loads(params) if params else {}
    if best_params:
        from training.tuning import best_params_for

        overrides = {**best_params_for(cfg, task, model), **overrides}
    tags = {"tuned": str(bool(best_params)).lower()}
    if cluster:
        from training.distributed import train_on_cluster

        result = train_on_cluster(cluster, events, users, task, model, cfg, parse_as_of(as_of), overrides,
                                  register=not no_register, extra_tags=tags, quarantine=quarantine)
    else:
        lg = open_events(events, users, cfg, quarantine)
        result = train_task(lg, task, model, cfg, as_of=parse_as_of(as_of), overrides=overrides,
                            register=not no_register, progress=not STATE.quiet, extra_tags=tags)
    m = result.metrics
    typer.echo(f"{task}/{model}: holdout AUC {m['holdout_auc']:.4f}, log loss {m['holdout_log_loss']:.4f}, "
               f"Brier {m['holdout_brier']:.4f}, ECE {m['holdout_ece']:.4f}; run {result.run_id}"
               + (f"; registered {result.model_name} version {result.version}" if result.version else ""))
    if "holdout_baseline_recency_auc" in m:
        named = (("recency alone", "recency"), ("frequency alone", "frequency"),
                 ("whole-history frequency", "frequency_ever"), ("BG/NBD P(alive)", "btyd_p_alive"),
                 ("BG/NBD expected active days", "btyd_expected"))
        shown = ", ".join(f"by {label} {m[f'holdout_baseline_{key}_auc']:.4f}" for label, key in named
                          if f"holdout_baseline_{key}_auc" in m)
        typer.echo(f"  same holdout, no model: AUC {shown}; the model "
                   f"{m['holdout_auc'] - m['holdout_baseline_best_auc']:+.4f} over the best of them")


@app.command()
@cli_job
def promote(
    task: Task = typer.Option(..., "--task", "-t", help="open or churn."),
    version: Optional[int] = typer.Option(None, "--version", help="Version to promote (default: best holdout log loss)."),
    force: bool = typer.Option(False, "--force", help="Promote even if worse than the current champion."),
    rollback: bool = typer.Option(False, "--rollback", help="Return the champion alias to the previous champion."),
) -> None:
    """Point the `champion` alias at a version; refuses a worse one than the champion unless forced."""
    from training.registry import promote_champion, rollback_champion

    cfg = current_config()
    task = task.value
    result = rollback_champion(cfg, task) if rollback else promote_champion(cfg, task, version, force)
    typer.echo(f"{result.model_name}@{cfg.tracking.champion_alias} -> version {result.version} "
               f"(was {result.previous or 'none'}): {result.reason}")


@app.command()
@cli_job
def score(
    events: Path = EventsOpt,
    users: Optional[Path] = UsersOpt,
    as_of: Optional[str] = AsOfOpt,
    out: Path = typer.Option(..., "--out", "-o", help="Tag table to write (Parquet)."),
    quarantine: Optional[Path] = QuarantineOpt,
    make_current: bool = typer.Option(
        False, "--make-current",
        help="Serve this refresh even when its --as-of is older than the current refresh's. Without it such a "
             "backfill is published beside the current refresh (and written to --out) but not served."),
    full: bool = typer.Option(
        False, "--full",
        help="Rebuild every feature from the whole log. Without it, the current refresh's feature state is moved "
             "forward with the events since it, when the configuration is the same and the log only grew."),
    cluster: Optional[str] = typer.Option(None, "--cluster", metavar="ADDRESS|local:N",
                                          help=ClusterOpt.help + " Always a full rebuild."),
) -> None:
    """Nightly tag refresh: champion models, features as of T, tags + tag store + feature snapshot, atomically.

    One refresh at a time: a second `score` on the same serving folder fails at once."""
    from serving.models import load_champions
    from serving.refresh import refresh_tags
    from serving.tagstore import refresh_lock

    cfg = current_config()
    # the lock first, so a second run fails before loading anything
    with refresh_lock(Path(cfg.serving.serving_dir)) as lock:
        champions = load_champions(cfg)
        if cluster:
            from serving.partitioned import score_on_cluster

            result = score_on_cluster(cluster, events, users, cfg, champions, out, parse_as_of(as_of), lock,
                                      make_current=make_current, quarantine=quarantine)
        else:
            lg = open_events(events, users, cfg, quarantine)
            result = refresh_tags(lg, cfg, champions, out, parse_as_of(as_of), progress=not STATE.quiet,
                                  make_current=make_current, lock=lock, full=full)
    for task, why in result.missing.items():
        typer.echo(f"warning: no {task} champion; its tag columns are empty ({why})", err=True)
    typer.echo(f"features {result.features}")
    typer.echo(f"scored {result.n_users} users ({result.n_cold_start} cold start) with {result.versions} -> "
               f"{out}; tag store {result.refresh.store}{'' if result.became_current else ' (not current)'}")
    note = result.backfill_note()
    if note:
        typer.echo(note if result.became_current else f"warning: {note}", err=not result.became_current)
    if result.drift is not None:
        typer.echo(result.drift.summary(), err=result.drift.error is not None)
        if result.drift.warning:
            typer.echo(f"warning: {result.drift.warning}", err=True)


@app.command()
@cli_job
def evaluate(
    tags: Path = typer.Option(..., "--tags", help="Tags written by `sendtime score`."),
    truth: Path = typer.Option(..., "--truth", help="truth.parquet written by `sendtime simulate`."),
    events: Optional[Path] = typer.Option(None, "--events", help="Events for the baselines (default: events.parquet beside the truth)."),
    users: Optional[Path] = typer.Option(None, "--users", help="Users for the baselines (default: users.parquet beside the truth)."),
    as_of: Optional[str] = AsOfOpt,
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the table as JSON here."),
) -> None:
    """On simulated data: slot capture, expected log loss vs the oracle, churn AUC, beside baselines."""
    import pandas as pd

    from simulator.judge import evaluate_against_truth

    cfg = current_config()
    events = events or (truth.parent / "events.parquet")
    users = users or (truth.parent / "users.parquet" if (truth.parent / "users.parquet").exists() else None)
    lg = open_events(events, users, cfg) if events.exists() else None
    report = evaluate_against_truth(pd.read_parquet(tags), pd.read_parquet(truth), cfg, lg, parse_as_of(as_of))
    typer.echo(report.to_text())
    if json_out:
        json_out.write_text(report.table.to_json(orient="records", indent=2))


@app.command("active-hours")
@cli_job
def active_hours(
    events: Path = EventsOpt,
    users: Optional[Path] = UsersOpt,
    as_of: Optional[str] = typer.Option(None, "--as-of", help="Cut-off T (default: active_hours.check_days before the last event)."),
    top_k: Optional[int] = typer.Option(None, "--top-k", min=1, max=24, help="How many hours count as a user's active hours (default active_hours.top_k)."),
    timezone: Optional[str] = typer.Option(None, "--timezone", help="Zone of users without one in --users (default slots.default_timezone), "
                                           "e.g. Europe/London for a UK shop's log: the hours are local, and a log read in UTC "
                                           "shifts them by an hour at each daylight-saving change."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write each user's predicted hours, own most frequent past hours "
                                       "and predicted share per hour here (Parquet)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the comparison table as JSON here."),
    quarantine: Optional[Path] = QuarantineOpt,
) -> None:
    """Where no open model exists: each user's hours of any engagement (sessions, clicks, purchases, opens) as of T,
    checked on the month after T beside their own most frequent past hours and the population's top hours."""
    from training.evaluation import active_hours_report

    cfg = current_config()
    if timezone:
        cfg = cfg.with_overrides(slots={"default_timezone": timezone})
    report = active_hours_report(open_events(events, users, cfg, quarantine), cfg, parse_as_of(as_of), top_k=top_k)
    typer.echo(report.to_text())
    if out:
        report.hours.frame().to_parquet(out, index=False)
        typer.echo(f"{len(report.hours.user_ids):,} users' active hours -> {out}")
    if json_out:
        json_out.write_text(report.table.to_json(orient="records", indent=2))


@app.command()
@cli_job
def serve(
    port: Optional[int] = typer.Option(None, "--port", "-p", help="Port (default serving.port)."),
    host: Optional[str] = typer.Option(None, "--host", help="Address to bind (default serving.host, loopback)."),
    serving_dir: Optional[Path] = typer.Option(None, "--serving-dir", help="Where `score` published (default serving.serving_dir)."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Server processes (default serving.workers); each holds the snapshot's scores."),
    insecure_no_token: bool = typer.Option(False, "--insecure-no-token", help="Bind beyond loopback without a bearer token (anyone who reaches the port reads every user's scores)."),
) -> None:
    """Start the BentoML prediction service (POST /recommend, /recommend/bulk, /models; /readyz, /livez; OpenAPI at /docs).

    With SENDTIME_API_TOKEN (or serving.api_token) set, every endpoint but /livez and /readyz
    needs `Authorization: Bearer <token>`. Without one, the service binds only to loopback
    unless --insecure-no-token.
    """
    import ipaddress

    from serving.tagstore import current_refresh

    cfg = current_config()
    folder = serving_dir or Path(cfg.serving.serving_dir)
    if current_refresh(folder) is None:
        raise FileNotFoundError(f"no feature snapshot under {folder}: run `sendtime score` first")
    bind = host or cfg.serving.host
    try:
        loopback = bind == "localhost" or ipaddress.ip_address(bind).is_loopback
    except ValueError:
        loopback = False
    if not loopback and not cfg.serving.resolved_token() and not insecure_no_token:
        raise ValueError(f"--host {bind}: refusing to serve every user's scores beyond loopback without a token; "
                         "set SENDTIME_API_TOKEN (or serving.api_token), or pass --insecure-no-token")
    env = dict(os.environ, SENDTIME_SERVING_DIR=str(folder.resolve()))
    if STATE.config_path:
        env["SENDTIME_CONFIG"] = str(Path(STATE.config_path).resolve())
    argv = [sys.executable, "-m", "bentoml", "serve", "serving.service:Sendtime",
            "--host", bind, "--port", str(port or cfg.serving.port)]
    env["SENDTIME_WORKERS"] = str(workers or cfg.serving.workers)
    # large arrays always from mmap, so a live reload's old state goes back to the system
    # (glibc's sliding threshold kept ~11 % of the old state resident after each swap)
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "262144")
    os.execve(sys.executable, argv, env)


@app.command()
@cli_job
def tags(
    sql: str = typer.Argument("SELECT churn_tier, count(*) AS users, avg(churn_prob) AS mean_churn_prob FROM tags GROUP BY 1 ORDER BY 1",
                              help="Read-only SQL over the tag store (tables: tags, priors, manifest; PostgreSQL also "
                                   "user_timezones); it cannot write the store nor read or write files (COPY, read_csv, "
                                   "ATTACH, INSTALL, pg_read_file fail)."),
    serving_dir: Optional[Path] = typer.Option(None, "--serving-dir", help="Default serving.serving_dir."),
    tag_store: Optional[str] = TagStoreOpt,
) -> None:
    """Query the current tag store, e.g. audiences: SELECT user_id FROM tags WHERE churn_tier = 'high'."""
    from serving.tagstore import query_tags

    cfg = current_config()
    frame = query_tags(serving_dir or Path(cfg.serving.serving_dir), sql,
                       tag_store_url=tag_store_url(cfg, tag_store, serving_dir))
    typer.echo(frame.to_string(index=False, max_rows=50))


@app.command("import")
@cli_job
def import_(
    source: Path = typer.Option(..., "--source", "-s", help="Your table: a Parquet/CSV file or folder."),
    out: Path = typer.Option(..., "--out", "-o", help="Events file to write (Parquet, the contract's columns)."),
    user: str = typer.Option(..., "--user", help="Column holding the user id."),
    time: str = typer.Option(..., "--time", help="Column holding the event time."),
    event: Optional[str] = typer.Option(None, "--event", help="Column holding event names (send, open, click, purchase, session, unsubscribe)."),
    event_name: Optional[str] = typer.Option(None, "--event-name", help="One event name for every row, where the table has no event column."),
    value: Optional[str] = typer.Option(None, "--value", help="Column or SQL expression for the value, e.g. 'Quantity * UnitPrice'."),
    message_id: Optional[str] = typer.Option(None, "--message-id", help="Column linking opens/clicks to sends."),
    channel: Optional[str] = typer.Option(None, "--channel", help="Column holding the channel."),
    where: Optional[str] = typer.Option(None, "--where", help="SQL condition of rows to keep, e.g. \"NOT starts_with(InvoiceNo, 'C')\"."),
    group_by: Optional[str] = typer.Option(None, "--group-by", help="Collapse rows sharing this column (and user) into one event, summing values."),
    source_timezone: Optional[str] = typer.Option(None, "--source-timezone", help="Zone of naive times in the source (default UTC)."),
    quarantine: Optional[Path] = QuarantineOpt,
) -> None:
    """Turn your own table into the contract's event log through a column mapping, with validation."""
    from features.importer import ColumnMapping, import_table

    cfg = current_config()
    mapping = ColumnMapping(user=user, time=time, event=event, event_name=event_name, value=value,
                            message_id=message_id, channel=channel, where=where, group_by=group_by,
                            source_timezone=source_timezone)
    s = import_table(source, mapping, out, quarantine, cfg.slots.default_timezone)
    typer.echo(f"{s.n_source_rows} source rows, {s.n_kept_by_filter} kept by --where, "
               f"{s.n_quarantined} quarantined -> {s.n_events} events in {s.out}")


@app.command()
@cli_job
def tune(
    task: Task = typer.Option(..., "--task", "-t", help="open or churn."),
    model: Library = typer.Option(..., "--model", "-m", help="lightgbm or xgboost."),
    events: Path = EventsOpt,
    users: Optional[Path] = UsersOpt,
    as_of: Optional[str] = AsOfOpt,
    trials: Optional[int] = typer.Option(None, "--trials", "-n", help="Trials to run now (default tuning.trials); a study resumes where it stopped."),
    quarantine: Optional[Path] = QuarantineOpt,
) -> None:
    """Optuna search on the time-split validation set; trials show in MLflow; `train --best-params` uses the result."""
    from training.dataset_cache import cached_dataset
    from training.tuning import tune as run_tune

    cfg = current_config()
    task, model = task.value, model.value
    lg = open_events(events, users, cfg, quarantine)
    ds = cached_dataset(lg, task, parse_as_of(as_of), cfg, progress=not STATE.quiet)
    study = run_tune(ds, model, cfg, trials, progress=not STATE.quiet)
    typer.echo(f"study {study.study_name}: {len(study.trials)} trials, best validation log loss "
               f"{study.best_value:.5f} with {study.best_params}\n"
               f"train with them: sendtime train --task {task} --model {model} --best-params --events {events}")


@app.command()
@cli_job
def compare(
    task: Task = typer.Option(..., "--task", "-t", help="open or churn."),
    versions: Optional[str] = typer.Option(None, "--versions", help="Comma-separated versions (default: all)."),
    truth: Optional[Path] = typer.Option(None, "--truth", help="Simulator truth: adds slot capture and log loss vs the oracle."),
    events: Optional[Path] = typer.Option(None, "--events", help="Events for the truth comparison (default: beside the truth)."),
    users: Optional[Path] = UsersOpt,
) -> None:
    """Candidate versions side by side on the same holdout: log loss, AUC, Brier, ECE, speed, size."""
    import pandas as pd

    from training.compare import compare_versions

    cfg = current_config()
    truth_frame = lg = None
    if truth is not None:
        truth_frame = pd.read_parquet(truth)
        events = events or truth.parent / "events.parquet"
        users = users or (truth.parent / "users.parquet" if (truth.parent / "users.parquet").exists() else None)
        lg = open_events(events, users, cfg)
    table = compare_versions(cfg, task.value, versions.split(",") if versions else None, truth_frame, lg)
    typer.echo(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))


@app.command()
@cli_job
def demo(
    data_dir: Path = typer.Option(Path("data/demo"), "--data-dir", help="Where the simulated log and tags go."),
    users: Optional[int] = typer.Option(None, "--users", help="Simulated users (default simulate.users)."),
) -> None:
    """The whole main job on simulated data: simulate, train x4, promote, score, evaluate, serve and query."""
    from sendtime.demo import run_demo

    run_demo(current_config(), data_dir, users, STATE.config_path)


def _register_plan_commands() -> None:
    from sendtime import plan_commands

    plan_commands.register(app)


_register_plan_commands()


if __name__ == "__main__":
    app()
