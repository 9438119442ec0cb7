"""Training on a Dask cluster (``sendtime train --cluster``): the same run as on one machine,
with the dataset built by user partition and the trees grown by ``lightgbm.dask`` /
``xgboost.dask`` where the training rows were built.

- Dataset: the snapshots of :func:`training.datasets.dataset_plan`; the population priors of
  each snapshot from the partitions' sums (:mod:`features.partitioned`); each partition builds
  its users' rows of every snapshot. The training rows stay on the workers
  (:class:`RemoteSplit`); the validation and holdout rows come to the client in the
  one-machine order (by user, then time), so the holdout and its digest are the same rows.
- Fit (:func:`cluster_fitter`, a :data:`training.pipeline.Fitter`): the feature spec from the
  partitions' category counts, the rows encoded where they are. XGBoost stops early on the
  validation rows by itself (its metrics are reduced over the workers). LightGBM's Dask
  interface cannot (each worker would judge its own share of the validation rows and they
  would part ways), so it grows ``num_boost_round`` trees and the client applies LightGBM's
  early-stopping rule to the validation log loss of every round, then keeps the trees up to
  the best round: the model one-machine early stopping would have kept, from the cluster's trees.
- The run: :func:`training.pipeline.train_task` with that fitter, so calibration, holdout
  metrics, plots, the learning curves (every tenth round), the logged flavour and the
  registered version are those of a one-machine run; tags ``cluster`` and ``partitions`` say
  where it ran.

Tree learners on partitioned rows are not bit-identical to one machine (histogram bins and
bagging are per worker): ``METRIC_TOLERANCE`` is how far the holdout metrics may differ,
which the cluster test checks.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from boosters import Fitted, adapter
from configs import Config
from features.cluster import Partitions, cluster_client, parse_cluster, plan_partitions, submit_partitions
from features.events import EventLog
from features.matrix import PopulationPriors
from features.partitioned import LogSource, part_log, part_state, population_priors_on_cluster
from features.rows import FeatureSpec
from training.datasets import Dataset, DatasetPlan, Split, check_split, concat_splits, dataset_plan, snapshot_split
from training.pipeline import Fitter, TrainResult, train_task
from training.trainers import mlflow_reporter

__all__ = ["METRIC_TOLERANCE", "RemoteSplit", "build_dataset_on_cluster", "cluster_fitter", "train_on_cluster",
           "train_task_on_cluster"]

log = logging.getLogger(__name__)

# how far a cluster run's holdout metrics may be from the one-machine run's (absolute)
METRIC_TOLERANCE = {"holdout_auc": 0.02, "holdout_log_loss": 0.01, "holdout_brier": 0.005}
_REPORT_EVERY = 10      # rounds between learning-curve points, as the adapters report them
_EPS = 1e-15            # LightGBM's clamp of probabilities in its log loss


@dataclass
class RemoteSplit:
    """Training rows left on the workers: one future of a :class:`Split` per partition."""

    parts: list[Any]
    lengths: list[int]
    n_positive: int

    def __len__(self) -> int:
        return sum(self.lengths)


# --------------------------------------------------------------------------- worker tasks

def _part_splits(partition: tuple[int, int], source: LogSource, plan: DatasetPlan, cfg: Config,
                 priors: list[PopulationPriors]) -> list[Split]:
    lg = part_log(source, partition)
    return [snapshot_split(lg, plan.task, job, plan.as_of, cfg, priors=p, state=part_state(source, partition, job[0]))
            for job, p in zip(plan.jobs, priors)]


def _train_rows(splits: list[Split]) -> Split:
    return concat_splits(splits[:-2])


def _pick(splits: list[Split], k: int) -> Split:
    return splits[k]


def _summary(split: Split) -> tuple[int, int]:
    return len(split), int(split.label.sum())


def _category_counts(split: Split, columns: tuple[str, ...]) -> dict[str, pd.Series]:
    return {c: split.rows[c].astype("string").value_counts(dropna=True) for c in columns if c in split.rows}


def _encode(split: Split, spec: FeatureSpec) -> np.ndarray:
    return spec.encode(split.rows)


def _labels(split: Split) -> np.ndarray:
    return split.label.astype(np.float32)


def _loss_curve(x: np.ndarray, y: np.ndarray, model: str, rounds: int) -> np.ndarray:
    """Summed log loss of the rows after each of the first ``rounds`` trees."""
    import lightgbm as lgb

    booster = lgb.Booster(model_str=model)
    raw = np.zeros(len(x))
    out = np.empty(rounds)
    for i in range(rounds):
        if len(x):
            raw += booster.predict(x, raw_score=True, start_iteration=i, num_iteration=1)
        p = np.clip(1.0 / (1.0 + np.exp(-raw)), _EPS, 1 - _EPS)
        out[i] = -(y * np.log(p) + (1 - y) * np.log(1 - p)).sum()
    return out


# --------------------------------------------------------------------------- the dataset

def _merge(splits: list[Split], task: str) -> Split:
    """Partitions' rows of one snapshot in the one-machine order: by user, then (open) time."""
    whole = concat_splits(splits)
    keys = ["user_id", "ts"] if task == "open" else ["user_id"]
    order = whole.meta.sort_values(keys, kind="stable").index.to_numpy()
    return Split(rows=whole.rows.iloc[order].reset_index(drop=True), label=whole.label[order],
                 meta=whole.meta.iloc[order].reset_index(drop=True))


def build_dataset_on_cluster(client: Any, parts: Partitions, source: LogSource, whole: EventLog, task: str,
                             as_of: datetime | None, cfg: Config) -> Dataset:
    """:func:`training.datasets.build_dataset` by user partition; the training rows stay on
    the workers (``Dataset.train`` is a :class:`RemoteSplit`)."""
    plan = dataset_plan(whole, task, as_of, cfg)
    clock = time.perf_counter()
    priors = population_priors_on_cluster(client, parts, source, [job[0] for job in plan.jobs], cfg)
    splits = submit_partitions(client, parts, _part_splits, source, plan, cfg, priors)
    try:
        train = [client.submit(_train_rows, s, pure=False) for s in splits]
        valid, holdout = ([client.submit(_pick, s, k, pure=False) for s in splits] for k in (-2, -1))
        summaries = client.gather([client.submit(_summary, t, pure=False) for t in train])
        valid_split = _merge(client.gather(valid), plan.task)
        holdout_split = _merge(client.gather(holdout), plan.task)
    finally:
        for future in splits:
            future.release()
    remote = RemoteSplit(parts=train, lengths=[n for n, _ in summaries], n_positive=sum(k for _, k in summaries))
    for name, n, k in (("train", len(remote), remote.n_positive),
                       ("validation", len(valid_split), int(valid_split.label.sum())),
                       ("holdout", len(holdout_split), int(holdout_split.label.sum()))):
        check_split(plan.task, name, n, k)
    log.info("%s dataset by %d partitions in %.1f s: %d training rows on the workers, %d validation and %d "
             "holdout rows here", plan.task, parts.n_parts, time.perf_counter() - clock, len(remote),
             len(valid_split), len(holdout_split))
    return Dataset(task=plan.task, as_of=plan.as_of, train=remote, valid=valid_split, holdout=holdout_split,
                   categorical=("timezone",) + whole.attribute_columns, snapshots=plan.snapshots)


# --------------------------------------------------------------------------- the fit

def _spec(client: Any, ds: Dataset, cfg: Config) -> FeatureSpec:
    """``FeatureSpec.fit`` over the training rows on the workers: the same inputs, and each
    categorical input's most frequent levels by the partitions' summed counts (a tie at the
    cut-off goes to the level that sorts first)."""
    names = FeatureSpec.fit(ds.valid.rows.iloc[:0], (), cfg.features.max_attribute_levels).names
    counts = client.gather([client.submit(_category_counts, part, ds.categorical, pure=False)
                            for part in ds.train.parts])
    categories = {}
    for col in ds.categorical:
        found = [c[col] for c in counts if col in c]
        if not found:
            continue
        total = pd.concat(found).groupby(level=0).sum()
        top = sorted(total.index.astype(str), key=lambda v: (-total[v], v))[: cfg.features.max_attribute_levels]
        categories[col] = tuple(sorted(top))
    return FeatureSpec(names=names, categories=categories)


def _dask_rows(x_parts: list[Any], y_parts: list[Any], lengths: list[int], n_features: int):
    """Dask arrays over per-partition futures, each chunk where its future is."""
    import dask
    import dask.array as da

    keep = [i for i, n in enumerate(lengths) if n]
    x = da.concatenate([da.from_delayed(dask.delayed(x_parts[i]), shape=(lengths[i], n_features), dtype=np.float32)
                        for i in keep])
    y = da.concatenate([da.from_delayed(dask.delayed(y_parts[i]), shape=(lengths[i],), dtype=np.float32)
                        for i in keep])
    return x, y


def _scatter_rows(client: Any, x: np.ndarray, y: np.ndarray, workers: list[str]):
    """Rows held on the client, spread over the workers as Dask arrays."""
    bounds = np.linspace(0, len(x), len(workers) + 1).astype(int)
    pieces = [(x[a:b], y[a:b].astype(np.float32)) for a, b in zip(bounds[:-1], bounds[1:])]
    xs = [client.scatter(px, workers=[w], hash=False) for (px, _), w in zip(pieces, workers)]
    ys = [client.scatter(py, workers=[w], hash=False) for (_, py), w in zip(pieces, workers)]
    return _dask_rows(xs, ys, [len(px) for px, _ in pieces], x.shape[1])


def _early_stop(valid_loss: np.ndarray, patience: int) -> tuple[int, int]:
    """LightGBM's early-stopping rule on a curve: (best round, last round grown), 0-based."""
    best, best_i = np.inf, 0
    for i, value in enumerate(valid_loss):
        if value < best:
            best, best_i = value, i
        elif i - best_i >= patience:
            return best_i, i
    return best_i, len(valid_loss) - 1


def _report(reporters: list, curves: dict[str, np.ndarray], last: int) -> None:
    for i in range(0, last + 1, _REPORT_EVERY):
        for report in reporters:
            report({f"{name}_log_loss": float(values[i]) for name, values in curves.items()}, i)


def _fit_lightgbm(client: Any, x: Any, y: Any, train: RemoteSplit, x_parts: list[Any], y_parts: list[Any],
                  x_valid: np.ndarray, y_valid: np.ndarray, names: list[str], params: dict, rounds: int,
                  patience: int, reporters: list) -> tuple[Any, int]:
    import lightgbm as lgb
    from lightgbm.dask import DaskLGBMClassifier

    # the Dask interface sets each worker's threads itself (and says so about n_jobs)
    model = DaskLGBMClassifier(client=client, n_estimators=rounds,
                               **{k: v for k, v in params.items() if k != "num_threads"})
    clock = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Parameter n_jobs will be ignored")
        model.fit(x, y, feature_name=names)
    full = model.booster_
    log.debug("lightgbm.dask grew %d trees in %.1f s", full.current_iteration(), time.perf_counter() - clock)
    grown = full.current_iteration()
    text = full.model_to_string()
    valid = _loss_curve(x_valid, y_valid.astype(np.float64), text, grown) / max(len(x_valid), 1)
    best, last = _early_stop(valid, patience)
    shared = client.scatter(text, broadcast=True, hash=False)
    sums = client.gather([client.submit(_loss_curve, xp, yp, shared, last + 1, pure=False)
                          for xp, yp in zip(x_parts, y_parts)])
    _report(reporters, {"train": np.sum(sums, axis=0) / max(len(train), 1), "valid": valid}, last)
    log.debug("learning curves in %.1f s", time.perf_counter() - clock)
    return lgb.Booster(model_str=full.model_to_string(num_iteration=best + 1)), best + 1


def _fit_xgboost(client: Any, x: Any, y: Any, x_valid: np.ndarray, y_valid: np.ndarray, names: list[str],
                 params: dict, rounds: int, patience: int, reporters: list, workers: list[str]) -> tuple[Any, int]:
    import xgboost as xgb
    import xgboost.dask  # noqa: F401 - registers xgb.dask

    dtrain = xgb.dask.DaskDMatrix(client, x, y, feature_names=names)
    xv, yv = _scatter_rows(client, x_valid, y_valid, workers)
    dvalid = xgb.dask.DaskDMatrix(client, xv, yv, feature_names=names)
    out = xgb.dask.train(client, {k: v for k, v in params.items() if k != "nthread"}, dtrain,
                         num_boost_round=rounds, evals=[(dtrain, "train"), (dvalid, "valid")],
                         early_stopping_rounds=patience, verbose_eval=False)
    booster, history = out["booster"], out["history"]
    curves = {data: np.asarray(metrics["logloss"]) for data, metrics in history.items()}
    _report(reporters, curves, len(curves["valid"]) - 1)
    best = int(booster.best_iteration) + 1
    return booster[:best], best


def cluster_fitter(client: Any, parts: Partitions) -> Fitter:
    """A :data:`training.pipeline.Fitter` that grows the trees on ``client``'s cluster, from
    the training rows a :func:`build_dataset_on_cluster` dataset left there."""
    def fit(ds: Dataset, library: str, cfg: Config, overrides: dict[str, Any] | None = None,
            reporters: list | None = None) -> tuple[Fitted, FeatureSpec, np.ndarray]:
        train = ds.train
        if not isinstance(train, RemoteSplit):
            raise TypeError("a cluster fit needs a dataset from build_dataset_on_cluster")
        overrides = dict(overrides or {})
        rounds = int(overrides.pop("num_boost_round", cfg.models.num_boost_round))
        lib = adapter(library)
        params = lib.params(cfg, overrides)
        clock = time.perf_counter()
        spec = _spec(client, ds, cfg)
        names = list(spec.names)
        x_parts = [client.submit(_encode, part, spec, pure=False) for part in train.parts]
        y_parts = [client.submit(_labels, part, pure=False) for part in train.parts]
        x, y = _dask_rows(x_parts, y_parts, train.lengths, len(names))
        x_valid = spec.encode(ds.valid.rows)
        y_valid = ds.valid.label.astype(np.float32)
        log.debug("feature spec and encoded rows in %.1f s", time.perf_counter() - clock)
        report = [mlflow_reporter, *(reporters or [])]
        patience = cfg.models.early_stopping_rounds
        start = time.perf_counter()
        if lib.name == "lightgbm":
            booster, best = _fit_lightgbm(client, x, y, train, x_parts, y_parts, x_valid, y_valid, names, params,
                                          rounds, patience, report)
        else:
            booster, best = _fit_xgboost(client, x, y, x_valid, y_valid, names, params, rounds, patience, report,
                                         list(parts.workers))
        seconds = time.perf_counter() - start
        log.info("%s on %d workers: %d rows, best round %d of %d, %.1f s", library, len(parts.workers), len(train),
                 best, rounds, seconds)
        return Fitted(library=lib.name, booster=booster, best_iteration=best, train_seconds=seconds,
                      params=params), spec, x_valid

    return fit


# --------------------------------------------------------------------------- one run

def train_task_on_cluster(client: Any, parts: Partitions, source: LogSource, whole: EventLog, task: str,
                          library: str, cfg: Config, as_of: datetime | None = None,
                          overrides: dict[str, Any] | None = None, register: bool = True,
                          extra_tags: dict[str, str] | None = None, cluster: str = "") -> TrainResult:
    """:func:`training.pipeline.train_task` with the dataset and the trees on the cluster."""
    ds = build_dataset_on_cluster(client, parts, source, whole, task, as_of, cfg)
    try:
        tags = {**(extra_tags or {}), "cluster": cluster or str(client.scheduler.address),
                "partitions": str(parts.n_parts)}
        return train_task(whole, task, library, cfg, overrides=overrides, register=register, progress=False,
                          dataset=ds, extra_tags=tags, fit=cluster_fitter(client, parts))
    finally:
        for future in ds.train.parts:
            future.release()


def train_on_cluster(cluster: str, events: str | Path, users: str | Path | None, task: str, library: str,
                     cfg: Config, as_of: datetime | None = None, overrides: dict[str, Any] | None = None,
                     register: bool = True, extra_tags: dict[str, str] | None = None,
                     quarantine: str | Path | None = None) -> TrainResult:
    """``sendtime train --cluster``: validate the log here, build the dataset and grow the
    trees on the cluster, log and register the run here."""
    parse_cluster(cluster)   # a wrong --cluster fails before the log is read
    source = LogSource.of(events, users, cfg)
    whole = source.open_whole(cfg, quarantine)
    with cluster_client(cluster, cfg) as client:
        return train_task_on_cluster(client, plan_partitions(client, cfg), source, whole, task, library, cfg, as_of,
                                     overrides, register, extra_tags, cluster)
