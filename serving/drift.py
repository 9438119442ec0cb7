"""Drift of a nightly refresh: how far the day's users have moved from the population each
champion was trained on, as population stability indices (PSI), logged to MLflow.

Each champion's run carries its reference (``drift_reference.json``, written at training
time: :mod:`features.reference` says what it holds). A refresh measures, per task, on the
same population rule as the reference (open: users with history a message can reach;
churn: users engaged within the churn lookback; cold-start users get priors, not the
model, and are left out), on a seeded sample of at most ``drift.sample_users`` of them:

    psi_<task>_<feature>     each profiled feature, on the reference's bins
    psi_prediction_<task>    the calibrated predictions (open: every slot; churn: each user)
    psi_max                  the largest of them

and warns for each one above ``drift.psi_warn``. A champion trained before references were
logged has none: the report says so and the refresh goes on.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from configs import Config
from features.matrix import UserMatrix
from features.reference import REFERENCE_FILE, DriftReference, drift_population, psi, user_column
from serving.core import Scores
from serving.models import Champions
from serving.predictor import LoadedModel

__all__ = ["TaskDrift", "DriftReport", "read_reference", "measure_drift", "drift_report", "log_drift",
           "check_drift"]

log = logging.getLogger(__name__)


@dataclass
class TaskDrift:
    """One task's PSI against its champion's reference."""

    task: str
    version: str
    reference_as_of: str
    population: str
    n_users: int                       # users of the population in this refresh
    n_sampled: int
    features: dict[str, float]         # feature -> PSI
    prediction: float
    shares: dict[str, dict[str, list[float]]] = field(default_factory=dict)   # name -> reference, refresh
    absent: list[str] = field(default_factory=list)    # profiled columns this matrix lacks


@dataclass
class DriftReport:
    as_of: str
    refresh_id: str | None
    versions: dict[str, str | None]
    threshold: float
    tasks: dict[str, TaskDrift]
    unmeasured: dict[str, str]         # task -> why it has no PSI
    seconds: float = 0.0
    run_id: str | None = None
    error: str | None = None           # drift could not be measured or logged at all

    def metrics(self) -> dict[str, float]:
        out = {}
        for task, drift in self.tasks.items():
            out.update({f"psi_{task}_{_key(name)}": value for name, value in drift.features.items()})
            out[f"psi_prediction_{task}"] = drift.prediction
        if out:
            out["psi_max"] = max(out.values())
        return out

    def over_threshold(self) -> list[tuple[str, float]]:
        """(what, PSI) above the threshold, largest first: "open: sessions_30d", "churn: prediction"."""
        out = [(f"{task}: {name}", value) for task, drift in self.tasks.items()
               for name, value in [*drift.features.items(), ("prediction", drift.prediction)]
               if value > self.threshold]
        return sorted(out, key=lambda item: -item[1])

    @property
    def warning(self) -> str | None:
        over = self.over_threshold()
        if not over:
            return None
        named = ", ".join(f"{what} {value:.2f}" for what, value in over)
        return f"drift: PSI above {self.threshold:g} against the champion's training population: {named}"

    def summary(self) -> str:
        """One line for the terminal (the warning and the unmeasured tasks come apart)."""
        if self.error:
            return f"drift not measured: {self.error}"
        parts = [f"{task} v{d.version} max {max([d.prediction, *d.features.values()]):.3f} "
                 f"(prediction {d.prediction:.3f}; {d.n_sampled} of {d.n_users} users)"
                 for task, d in self.tasks.items()]
        parts += [f"{task}: {why}" for task, why in self.unmeasured.items()]
        where = f"; MLflow run {self.run_id}" if self.run_id else ""
        return f"drift (PSI): {'; '.join(parts) or 'nothing measured'}{where}"


def _key(name: str) -> str:
    """A column name as MLflow accepts it in a metric key."""
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", name)


def _client(cfg: Config):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=cfg.tracking.resolved_uri())


def read_reference(model: LoadedModel, cfg: Config) -> tuple[DriftReference | None, str]:
    """The reference on ``model``'s training run, or (None, why)."""
    client = _client(cfg)
    if REFERENCE_FILE not in {f.path for f in client.list_artifacts(model.run_id)}:
        return None, (f"{model.name} v{model.version} has no {REFERENCE_FILE} (trained before drift references "
                      "were logged; retrain to measure its drift)")
    with tempfile.TemporaryDirectory() as tmp:
        path = client.download_artifacts(model.run_id, REFERENCE_FILE, tmp)
        data = json.loads(Path(path).read_text())
    try:
        return DriftReference.from_dict(data), ""
    except (KeyError, ValueError) as exc:
        return None, f"{model.name} v{model.version}: unreadable {REFERENCE_FILE} ({exc})"


def _measure_task(task: str, version: str, reference: DriftReference, matrix: UserMatrix, predictions: np.ndarray,
                  cfg: Config) -> TaskDrift:
    d = cfg.drift
    population = drift_population(matrix, task, cfg.labels.churn_lookback_days)
    rng = np.random.default_rng(d.seed)
    sample = population
    if len(population) > d.sample_users:
        sample = np.sort(rng.choice(population, size=d.sample_users, replace=False))
    features, shares, absent = {}, {}, []
    for name, hist in reference.features.items():
        values = user_column(matrix, name, sample)
        if values is None:
            absent.append(name)
            continue
        actual = hist.shares_of(values)
        features[name] = psi(np.asarray(hist.shares), actual, d.epsilon)
        shares[name] = {"reference": list(hist.shares), "refresh": actual.round(6).tolist()}
    actual = reference.prediction.shares_of(predictions[sample].reshape(-1))
    shares["prediction"] = {"reference": list(reference.prediction.shares), "refresh": actual.round(6).tolist()}
    return TaskDrift(task=task, version=version, reference_as_of=reference.as_of, population=reference.population,
                     n_users=len(population), n_sampled=len(sample), features=features,
                     prediction=psi(np.asarray(reference.prediction.shares), actual, d.epsilon),
                     shares=shares, absent=absent)


def measure_drift(matrix: UserMatrix, scores: Scores, references: dict[str, tuple[str, DriftReference]],
                  cfg: Config, *, refresh_id: str | None = None, versions: dict[str, str | None] | None = None,
                  unmeasured: dict[str, str] | None = None) -> DriftReport:
    """PSI of each task in ``references`` (task -> (model version, reference)) over this
    refresh's ``matrix`` and ``scores`` (the scoring core's, for every user of the matrix)."""
    start = time.perf_counter()
    tasks = {}
    for task, (version, reference) in references.items():
        predictions = scores.slot_probs if task == "open" else scores.churn_prob
        if predictions is None:
            continue
        tasks[task] = _measure_task(task, version, reference, matrix, np.asarray(predictions), cfg)
    return DriftReport(as_of=matrix.as_of.isoformat(), refresh_id=refresh_id, versions=dict(versions or {}),
                       threshold=cfg.drift.psi_warn, tasks=tasks, unmeasured=dict(unmeasured or {}),
                       seconds=time.perf_counter() - start)


def drift_report(matrix: UserMatrix, scores: Scores, champions: Champions, cfg: Config,
                 refresh_id: str | None = None) -> DriftReport:
    """Each champion's PSI against its reference; a champion without one is reported in
    ``unmeasured``, and so is a task without a champion."""
    references, unmeasured = {}, {}
    for task in ("open", "churn"):
        model = getattr(champions, task)
        if model is None:
            unmeasured[task] = "no champion"
            continue
        reference, why = read_reference(model, cfg)
        if reference is None:
            unmeasured[task] = why
            log.info("drift of %s not measured: %s", task, why)
        else:
            references[task] = (model.version, reference)
    report = measure_drift(matrix, scores, references, cfg, refresh_id=refresh_id, versions=champions.versions(),
                           unmeasured=unmeasured)
    if report.warning:
        log.warning("%s", report.warning)
    return report


def _figure(report: DriftReport):
    import matplotlib

    matplotlib.use("Agg")  # no screen on batch machines
    import matplotlib.pyplot as plt

    rows = [(f"{task}: {name}", value) for task, drift in report.tasks.items()
            for name, value in [("prediction", drift.prediction), *drift.features.items()]]
    rows.sort(key=lambda item: item[1])
    fig, ax = plt.subplots(figsize=(7, 0.28 * len(rows) + 1.2))
    colors = ["tab:red" if value > report.threshold else "tab:blue" for _, value in rows]
    bars = ax.barh([label for label, _ in rows], [value for _, value in rows], color=colors)
    # one large PSI flattens the others: the numbers stay readable
    ax.bar_label(bars, labels=[f"{value:.3f}" for _, value in rows], fontsize=7, padding=2)
    ax.axvline(report.threshold, color="k", linestyle="--", linewidth=1, label=f"warn at {report.threshold:g}")
    ax.set(xlabel="population stability index", title=f"Drift against the champions' references ({report.as_of[:10]})")
    ax.legend(loc="lower right")
    fig.tight_layout()
    return fig


def log_drift(report: DriftReport, cfg: Config) -> str:
    """One run in the ``drift.experiment`` experiment: the PSI metrics, the bar plot, the
    shares per bin; tagged with the refresh id and the champion versions. Returns its id
    (also set on the report)."""
    import matplotlib.pyplot as plt
    from mlflow.entities import Metric, Param, RunTag

    uri = cfg.tracking.resolved_uri()
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    client = _client(cfg)
    name = cfg.drift.experiment
    experiment = client.get_experiment_by_name(name)
    exp_id = (experiment.experiment_id if experiment is not None
              else client.create_experiment(name, artifact_location=cfg.tracking.artifact_location(name)))
    tags = {"kind": "drift", "as_of": report.as_of, "refresh_id": report.refresh_id or "",
            **{f"{task}_model_version": str(v or "") for task, v in report.versions.items()},
            **{f"unmeasured_{task}": why[:4000] for task, why in report.unmeasured.items()}}
    if report.warning:
        tags["drift_warning"] = report.warning[:4000]
    run = client.create_run(exp_id, run_name=f"refresh-{report.refresh_id or report.as_of[:10]}", tags=tags)
    run_id = run.info.run_id
    stamp = int(time.time() * 1000)
    counts = {f"{k}_{task}": float(getattr(d, k)) for task, d in report.tasks.items() for k in ("n_users", "n_sampled")}
    metrics = {**report.metrics(), **counts, "drift_seconds": report.seconds}
    d = cfg.drift
    client.log_batch(run_id, metrics=[Metric(k, float(v), stamp, 0) for k, v in metrics.items()],
                     params=[Param(k, str(v)) for k, v in (("psi_warn", d.psi_warn), ("bins", d.bins),
                                                            ("epsilon", d.epsilon), ("sample_users", d.sample_users))],
                     tags=[RunTag(f"reference_as_of_{task}", t.reference_as_of) for task, t in report.tasks.items()])
    detail = {task: {"population": t.population, "reference_as_of": t.reference_as_of, "absent": t.absent,
                     "psi": {**t.features, "prediction": t.prediction}, "shares": t.shares}
              for task, t in report.tasks.items()}
    client.log_dict(run_id, {"as_of": report.as_of, "threshold": report.threshold, "tasks": detail,
                             "unmeasured": report.unmeasured}, "drift/drift_report.json")
    if report.tasks:
        fig = _figure(report)
        client.log_figure(run_id, fig, "plots/psi_by_feature.png")
        plt.close(fig)
    client.set_terminated(run_id)
    report.run_id = run_id
    return run_id


def check_drift(matrix: UserMatrix, scores: Scores, champions: Champions, cfg: Config,
                refresh_id: str | None = None) -> DriftReport | None:
    """The refresh's drift step: measure, log, warn. Never fails the refresh: monitoring
    that breaks (an unreachable store, say) is reported on the returned report instead.
    None when ``drift.enabled`` is off."""
    if not cfg.drift.enabled:
        return None
    try:
        report = drift_report(matrix, scores, champions, cfg, refresh_id=refresh_id)
        log_drift(report, cfg)
    except Exception as exc:  # noqa: BLE001 - drift is monitoring: the tags must still be published
        log.warning("drift not measured: %s", exc, exc_info=True)
        return DriftReport(as_of=matrix.as_of.isoformat(), refresh_id=refresh_id, versions=champions.versions(),
                           threshold=cfg.drift.psi_warn, tasks={}, unmeasured={}, error=f"{type(exc).__name__}: {exc}")
    return report
