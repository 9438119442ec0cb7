"""Training sets kept between commands.

``train --model lightgbm`` then ``--model xgboost`` on the same log (or ``tune`` then ``train
--best-params``) read the same snapshots, and building them is most of a training command's
time: the second reads the first's back.

An entry's key is everything the dataset depends on: the task and as-of time, the log (its
event files with their sizes and modification times and its event count up to as-of, or a
hash of its events when read from frames; its users hashed), the whole configuration, and the
source of the code that builds it. Any of them changed gives another key, and the dataset is
built again. The ``datasets.cache_entries`` most recently used entries are kept, next to the
holdouts (``training.tracking.datasets_dir``); 0 turns the cache off.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd

from configs import Config, resolve_as_of
from configs.artifacts import fsync_dir
from features.events import EventLog
from features.state import log_fingerprints
from training.datasets import Dataset, Split, build_dataset
from training.tracking import datasets_dir

__all__ = ["cached_dataset", "dataset_key"]

log = logging.getLogger(__name__)

_ROOT = Path(__file__).resolve().parents[1]
# the code a dataset comes out of: every module these import from reads into the rows
_CODE = ("configs", "features", "training/datasets.py", "training/labels.py")
_SPLITS = ("train", "valid", "holdout")


@functools.cache   # the source does not change under a running process: read it once
def _code_digest() -> str:
    h = hashlib.sha256()
    for name in _CODE:
        path = _ROOT / name
        for file in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            h.update(str(file.relative_to(_ROOT)).encode())
            h.update(file.read_bytes())
    return h.hexdigest()


def dataset_key(log_: EventLog, task: str, as_of: datetime | None, cfg: Config) -> str:
    """The key of the dataset ``build_dataset(log_, task, as_of, cfg)`` would build."""
    as_of = resolve_as_of(as_of, log_.max_ts)
    parts = {"task": task, "as_of": as_of.isoformat(), "log": log_fingerprints(log_, [as_of])[0],
             "config": cfg.model_dump(mode="json"), "code": _code_digest()}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _write(folder: Path, ds: Dataset) -> None:
    for name in _SPLITS:
        split: Split = getattr(ds, name)
        split.rows.to_parquet(folder / f"{name}.rows.parquet")
        split.meta.to_parquet(folder / f"{name}.meta.parquet")
        np.save(folder / f"{name}.label.npy", split.label)
    (folder / "dataset.json").write_text(json.dumps({
        "task": ds.task, "as_of": ds.as_of.isoformat(), "categorical": list(ds.categorical),
        "snapshots": ds.snapshots}))


def _read(folder: Path) -> Dataset:
    meta = json.loads((folder / "dataset.json").read_text())
    splits = {name: Split(rows=pd.read_parquet(folder / f"{name}.rows.parquet"),
                          label=np.load(folder / f"{name}.label.npy"),
                          meta=pd.read_parquet(folder / f"{name}.meta.parquet")) for name in _SPLITS}
    return Dataset(task=meta["task"], as_of=datetime.fromisoformat(meta["as_of"]), categorical=tuple(meta["categorical"]),
                   snapshots=meta["snapshots"], **splits)


def _evict(cache: Path, keep: int) -> None:
    """Only the ``keep`` most recently used entries stay (and no half-written one of a job
    that died over an hour ago)."""
    entries = sorted((p for p in cache.iterdir() if (p / "dataset.json").exists()),
                     key=lambda p: p.stat().st_mtime, reverse=True)
    stale = [p for p in cache.glob(".*.tmp-*") if p.stat().st_mtime < time.time() - 3600]
    for old in entries[keep:] + stale:
        shutil.rmtree(old, ignore_errors=True)


def _store(entry: Path, ds: Dataset) -> None:
    """Written beside the entry, then renamed to it: a reader sees a whole entry or none."""
    tmp = entry.with_name(f".{entry.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    tmp.mkdir(parents=True)
    try:
        _write(tmp, ds)
        os.rename(tmp, entry)
        fsync_dir(entry.parent)
    except OSError:
        if not (entry / "dataset.json").exists():   # another job stored the same key first: fine
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def cached_dataset(log_: EventLog, task: str, as_of: datetime | None, cfg: Config,
                   progress: bool = True) -> Dataset:
    """:func:`training.datasets.build_dataset`, read back when an earlier command built the
    same one."""
    keep = cfg.datasets.cache_entries
    if keep == 0:
        return build_dataset(log_, task, as_of, cfg, progress=progress)
    cache = datasets_dir(cfg) / "cache"
    key = dataset_key(log_, task, as_of, cfg)
    entry = cache / key
    if (entry / "dataset.json").exists():
        try:
            ds = _read(entry)
        except (OSError, ValueError, KeyError) as exc:   # a damaged entry is built again
            log.warning("the cached %s dataset %s could not be read (%s); building it again", task, entry, exc)
        else:
            os.utime(entry)
            log.info("%s dataset read from the cache (%s): the same log, as-of time, configuration and code", task, entry)
            return ds
    ds = build_dataset(log_, task, as_of, cfg, progress=progress)
    cache.mkdir(parents=True, exist_ok=True)
    _store(entry, ds)
    _evict(cache, keep)
    return ds
