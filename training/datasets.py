"""Training sets built from the log by time: weekly snapshots, each with the matrix as of
the snapshot and the labels of what followed it.

The split is by time, never by shuffling rows:

    ... train snapshots ... | validation snapshot | holdout snapshot | as_of
    early stopping and calibration use validation; the holdout is only measured.

No label reaches into the next set: training labels are settled before the validation
snapshot, validation labels before the holdout snapshot, holdout labels by ``as_of``.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from configs import Config, SendtimeError, Task, resolve_as_of
from features.events import EventLog
from features.matrix import PopulationPriors, build_matrix
from features.rows import CHURN_SLOT_FAMILIES, churn_rows, open_rows
from features.state import FeatureState
from training.labels import churn_labels, open_labels

__all__ = ["Dataset", "DatasetPlan", "Split", "build_dataset", "check_split", "concat_splits", "dataset_plan",
           "history_mismatch", "open_snapshots", "churn_snapshots", "snapshot_split", "TaskNotTrainable"]

log = logging.getLogger(__name__)

class TaskNotTrainable(SendtimeError, RuntimeError):
    """The log cannot support this task (no sends, no opens, too short ...)."""


@dataclass
class Split:
    rows: pd.DataFrame          # model inputs before encoding
    label: np.ndarray
    meta: pd.DataFrame          # user_id, snapshot, and for open: slot, local_hour, local_dow

    def __len__(self) -> int:
        return len(self.label)


@dataclass
class Dataset:
    task: str
    as_of: datetime
    train: Split
    valid: Split
    holdout: Split
    categorical: tuple[str, ...]
    snapshots: dict[str, list[str]] = field(default_factory=dict)

    def holdout_digest(self) -> str:
        """Identifies the holdout, so versions are compared on the same rows."""
        h = hashlib.sha256()
        h.update(self.task.encode())
        h.update(pd.util.hash_pandas_object(self.holdout.meta, index=False).to_numpy().tobytes())
        h.update(self.holdout.label.tobytes())
        return h.hexdigest()[:16]

    def training_digest(self) -> str:
        """Identifies the data a model is fitted and tuned on: the training and validation
        rows' snapshots, row and positive counts, and the feature columns. The same log,
        as-of time and config give the same digest; another log or as-of time, another."""
        h = hashlib.sha256()
        h.update(self.task.encode())
        for name, split in (("train", self.train), ("valid", self.valid)):
            snapshots = sorted(pd.Timestamp(t).isoformat() for t in pd.unique(split.meta["snapshot"]))
            h.update(f"|{name}|{snapshots}|{len(split)}|{int(split.label.sum())}|{list(split.rows.columns)}".encode())
        return h.hexdigest()[:16]


# a churn snapshot needs this much of the log behind it to describe anyone
MIN_HISTORY_DAYS = 14
# the column that says how long each user has been known (days since the first engagement)
HISTORY_COLUMN = "days_since_first_engagement"


def _day(value: datetime) -> datetime:
    return value.replace(hour=0, minute=0, second=0, microsecond=0)


def open_snapshots(as_of: datetime, first_event: datetime, cfg: Config) -> tuple[list[datetime], datetime, datetime]:
    """(train snapshots oldest first, validation snapshot, holdout snapshot)."""
    d = cfg.datasets
    window = timedelta(hours=cfg.labels.open_attribution_hours)
    holdout = _day(as_of - window - timedelta(days=d.open_rows_days))
    step = timedelta(days=d.open_snapshot_every_days)
    valid = holdout - step
    train = [valid - step * k for k in range(d.open_train_snapshots, 0, -1)]
    # a snapshot needs some history behind it to describe users
    train = [t for t in train if t >= first_event + timedelta(days=7)]
    if not train or valid < first_event + timedelta(days=7):
        raise TaskNotTrainable(
            f"the log ({first_event:%Y-%m-%d} to {as_of:%Y-%m-%d}) is too short for the open task: "
            f"it needs about {(d.open_train_snapshots + 2) * d.open_snapshot_every_days + 8} days"
        )
    return train, valid, holdout


def churn_snapshots(as_of: datetime, first_event: datetime, cfg: Config) -> tuple[list[datetime], datetime, datetime]:
    """(train snapshots oldest first, validation snapshot, holdout snapshot): each snapshot's
    label horizon ends before the next set's begins, the holdout's at the as-of time."""
    d = cfg.datasets
    horizon = timedelta(days=cfg.labels.churn_horizon_days)
    holdout = _day(as_of - horizon)
    valid = holdout - horizon          # its labels end where the holdout begins
    step = timedelta(days=d.churn_snapshot_every_days)
    # Training labels end where validation begins, as the open task's rows do. A churn label
    # is "no engagement in (T, T + horizon]": cut at the validation start, a later snapshot's
    # label would be a shorter horizon's (more users "churn"), another quantity than the one
    # validated and served. So the training snapshots are spaced to end before it: the
    # latest one horizon before validation, the others a step apart before that.
    last = valid - horizon
    earliest = first_event + timedelta(days=MIN_HISTORY_DAYS)
    # 0: every step back to the earliest snapshot with enough history behind it
    count = d.churn_train_snapshots or max(0, (last - earliest) // step + 1)
    train = [last - step * k for k in range(count - 1, -1, -1)]
    train = [t for t in train if t >= earliest]
    if not train:
        raise TaskNotTrainable(
            f"the log ({first_event:%Y-%m-%d} to {as_of:%Y-%m-%d}) is too short for the churn task: "
            f"it needs about {3 * cfg.labels.churn_horizon_days + MIN_HISTORY_DAYS + 2} days (three label "
            f"horizons of labels.churn_horizon_days = {cfg.labels.churn_horizon_days}: training, validation "
            f"and holdout, after {MIN_HISTORY_DAYS} whole days of history)"
        )
    return train, valid, holdout


def _open_split(log: EventLog, snapshot: datetime, until: datetime, known_at: datetime,
                cfg: Config, priors: PopulationPriors | None = None, state: FeatureState | None = None) -> Split:
    labels = open_labels(log, snapshot, until, known_at, cfg)
    users = pd.Index(labels["user_id"].unique())
    matrix, _ = build_matrix(log, snapshot, cfg, priors=priors, user_ids=users, state=state)
    pos = matrix.user_ids.get_indexer(labels["user_id"])
    rows = open_rows(matrix, pos, labels["slot"].to_numpy())
    meta = labels[["user_id", "ts", "slot", "local_hour", "local_dow"]].copy()
    meta["snapshot"] = snapshot
    return Split(rows=rows, label=labels["opened"].to_numpy(np.int8), meta=meta.reset_index(drop=True))


def _churn_split(log: EventLog, snapshot: datetime, cfg: Config, priors: PopulationPriors | None = None,
                 state: FeatureState | None = None) -> Split:
    labels = churn_labels(log, snapshot, cfg)
    matrix, _ = build_matrix(log, snapshot, cfg, priors=priors, user_ids=pd.Index(labels["user_id"]), state=state,
                             slot_families=CHURN_SLOT_FAMILIES)
    pos = matrix.user_ids.get_indexer(labels["user_id"])
    rows = churn_rows(matrix.subset(pos))
    meta = labels[["user_id"]].copy()
    meta["snapshot"] = snapshot
    return Split(rows=rows, label=labels["churned"].to_numpy(np.int8), meta=meta.reset_index(drop=True))


def snapshot_split(log: EventLog, task: str, job: tuple[datetime, datetime | None], known_at: datetime,
                   cfg: Config, priors: PopulationPriors | None = None, state: FeatureState | None = None) -> Split:
    """The rows of one snapshot of a :class:`DatasetPlan` (``job`` = (snapshot, rows until)).
    ``priors``: the population priors at the snapshot, when computed elsewhere (a cluster
    partition of the users cannot compute them alone); ``state``: the log's feature state at
    the snapshot, when at hand."""
    snapshot, until = job
    if task == "open":
        return _open_split(log, snapshot, until, known_at, cfg, priors, state)
    return _churn_split(log, snapshot, cfg, priors, state)


def concat_splits(splits: list[Split]) -> Split:
    return Split(
        rows=pd.concat([s.rows for s in splits], ignore_index=True),
        label=np.concatenate([s.label for s in splits]),
        meta=pd.concat([s.meta for s in splits], ignore_index=True),
    )


def _check_events(log: EventLog, task: str, cfg: Config) -> None:
    counts = log.event_counts()
    need = {"open": ("send", "open"), "churn": ()}[task]
    missing = [e for e in need if not counts.get(e)]
    engagement = cfg.labels.engagement_events
    if task == "churn" and not any(counts.get(e) for e in engagement):
        missing = [f"an engagement event ({', '.join(engagement)})"]
    if missing:
        have = ", ".join(f"{k}={v}" for k, v in sorted(counts.items())) or "no events"
        raise TaskNotTrainable(
            f"the {task} task needs {' and '.join(missing)} events; this log has {have}"
        )


@dataclass(frozen=True)
class DatasetPlan:
    """Which snapshots a dataset is built from: ``jobs`` = (snapshot, rows until), the
    training snapshots oldest first, then validation, then holdout."""

    task: str
    as_of: datetime
    jobs: list[tuple[datetime, datetime | None]]
    snapshots: dict[str, list[str]]


def dataset_plan(log: EventLog, task: str, as_of: datetime | None, cfg: Config) -> DatasetPlan:
    """The snapshots of ``task`` up to ``as_of`` (default: the log's last event)."""
    try:
        task = Task(task).value
    except ValueError:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(t.value for t in Task)}") from None
    _check_events(log, task, cfg)
    first = log.min_ts()
    as_of = resolve_as_of(as_of, log.max_ts)
    window = timedelta(hours=cfg.labels.open_attribution_hours)
    if task == "open":
        train_t, valid_t, hold_t = open_snapshots(as_of, first, cfg)
        rows_span = timedelta(days=cfg.datasets.open_rows_days)
        jobs: list[tuple[datetime, datetime | None]] = [(t, min(t + rows_span, valid_t - window)) for t in train_t]
        jobs.append((valid_t, min(valid_t + rows_span, hold_t - window)))
        jobs.append((hold_t, hold_t + rows_span))
    else:
        train_t, valid_t, hold_t = churn_snapshots(as_of, first, cfg)
        jobs = [(t, None) for t in train_t + [valid_t, hold_t]]
    snapshots = {"train": [t.isoformat() for t in train_t], "valid": [valid_t.isoformat()],
                 "holdout": [hold_t.isoformat()]}
    return DatasetPlan(task=task, as_of=as_of, jobs=jobs, snapshots=snapshots)


def history_mismatch(train: Split, holdout: Split) -> str | None:
    """Why the holdout may not measure what training learned, when it may not: the training
    rows' median customer history (days since the first engagement) under half the holdout's.
    On a log barely three label horizons long, the training snapshots sit near the log's
    start, so their customers are young and their whole-history counts short (Online Retail,
    90-day horizon: a median of 39 days against 185), and the model meets at the holdout
    histories much longer than it was trained on. None when the histories are comparable or
    the rows do not say."""
    if HISTORY_COLUMN not in train.rows.columns or HISTORY_COLUMN not in holdout.rows.columns:
        return None
    trained = float(np.nanmedian(train.rows[HISTORY_COLUMN].to_numpy(dtype=float, na_value=np.nan)))
    measured = float(np.nanmedian(holdout.rows[HISTORY_COLUMN].to_numpy(dtype=float, na_value=np.nan)))
    if not (np.isfinite(trained) and np.isfinite(measured)) or trained >= 0.5 * measured:
        return None
    return (f"the churn training snapshots' customers have a median history of {trained:.0f} days against "
            f"{measured:.0f} at the holdout snapshot: the model is measured on much longer histories than "
            "it learned from. A log longer than three label horizons (labels.churn_horizon_days), or a "
            "shorter horizon, gives training snapshots with longer histories")


def check_split(task: str, name: str, n_rows: int, n_positive: int) -> None:
    """A set without rows or with a single label value cannot train or measure a model."""
    if n_rows == 0 or n_positive in (0, n_rows):
        raise TaskNotTrainable(
            f"the {task} {name} set has {n_rows} rows and a single label value; "
            "the log is too small or too uniform for this task"
        )


def build_dataset(log: EventLog, task: str, as_of: datetime | None, cfg: Config,
                  progress: bool = True) -> Dataset:
    """Train/validation/holdout for ``task`` from what happened up to ``as_of``."""
    plan = dataset_plan(log, task, as_of, cfg)
    bar = tqdm(plan.jobs, desc=f"{plan.task} snapshots", unit="snapshot", disable=not progress)
    splits = [snapshot_split(log, plan.task, job, plan.as_of, cfg) for job in bar]
    train, valid, holdout = concat_splits(splits[:-2]), splits[-2], splits[-1]
    for name, split in (("train", train), ("validation", valid), ("holdout", holdout)):
        check_split(plan.task, name, len(split), int(split.label.sum()))
    if plan.task == "churn" and (reason := history_mismatch(train, holdout)):
        logging.getLogger(__name__).warning(reason)   # "log" here is the event log
    categorical = ("timezone",) + log.attribute_columns
    return Dataset(task=plan.task, as_of=plan.as_of, train=train, valid=valid, holdout=holdout,
                   categorical=categorical, snapshots=plan.snapshots)
