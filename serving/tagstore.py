"""Where the nightly refresh lands and the service reads: one folder per refresh,
swapped in atomically.

    serving_dir/
      current -> refreshes/<id>          (a symlink, replaced with one rename)
      refreshes/<id>/tags.parquet        the tag table of the contract
                    tags.duckdb          the same, queryable (tables tags, priors, manifest)
                    features.parquet     the user matrix the service scores from
                    priors.parquet       cold-start priors by time zone and attributes
                    manifest.json

A refresh is built under a temporary name and only becomes ``current`` when complete, so
a crash or a bad input part-way leaves the previous refresh serving. DuckDB holds the
queryable copy: a single file, columnar, SQL with list columns, and the same engine the
feature pipeline uses; readers open it read-only while the next refresh is written beside it.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import duckdb
import pandas as pd

from configs import fsync_dir
from features.snapshot import FEATURES_FILE, MANIFEST_FILE, read_manifest

__all__ = ["RefreshPaths", "current_refresh", "publish_refresh", "new_refresh_dir", "query_tags"]


@dataclass(frozen=True)
class RefreshPaths:
    root: Path

    @property
    def tags(self) -> Path:
        return self.root / "tags.parquet"

    @property
    def store(self) -> Path:
        return self.root / "tags.duckdb"

    @property
    def features(self) -> Path:
        return self.root / FEATURES_FILE

    @property
    def priors(self) -> Path:
        return self.root / "priors.parquet"

    @property
    def manifest(self) -> Path:
        return self.root / MANIFEST_FILE

    def read_manifest(self) -> dict:
        return read_manifest(self.root)


def new_refresh_dir(serving_dir: Path) -> tuple[RefreshPaths, str]:
    """A fresh temporary folder for a refresh being built, and its final id."""
    refresh_id = datetime.utcnow().strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    tmp = serving_dir / "refreshes" / f".building-{refresh_id}"
    tmp.mkdir(parents=True)
    return RefreshPaths(tmp), refresh_id


def write_store(paths: RefreshPaths, priors: pd.DataFrame, manifest: dict) -> None:
    """The queryable copy of a refresh being built: its tags (from ``paths.tags``), the
    cold-start priors and the manifest, in one DuckDB file."""
    con = duckdb.connect(str(paths.store))
    try:
        con.execute(f"CREATE TABLE tags AS SELECT * FROM read_parquet('{paths.tags}')")
        con.register("priors_frame", priors)
        con.execute("CREATE TABLE priors AS SELECT * FROM priors_frame")
        con.execute("CREATE TABLE manifest AS SELECT ? AS key, ? AS value",
                    ["manifest", json.dumps(manifest, default=str)])
        con.execute("CREATE UNIQUE INDEX tags_user ON tags (user_id)")
    finally:
        con.close()


def publish_refresh(serving_dir: Path, building: RefreshPaths, refresh_id: str, keep: int) -> RefreshPaths:
    """Make a completed refresh current with atomic renames; prune old ones."""
    final = serving_dir / "refreshes" / refresh_id
    _sync_tree(building.root)   # the files reach the disk before any name points at them
    building.root.rename(final)
    fsync_dir(final.parent)
    link = serving_dir / "current"
    tmp_link = serving_dir / f".current-{uuid.uuid4().hex[:6]}"
    os.symlink(Path("refreshes") / refresh_id, tmp_link)
    os.replace(tmp_link, link)  # the one step readers can observe
    fsync_dir(serving_dir)
    _prune(serving_dir / "refreshes", keep, protect=final)
    return RefreshPaths(final)


def _sync_tree(folder: Path) -> None:
    for path in folder.iterdir():
        if path.is_file():
            with open(path, "rb+") as handle:
                os.fsync(handle.fileno())
    fsync_dir(folder)


def _prune(folder: Path, keep: int, protect: Path) -> None:
    done = sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")),
                  key=lambda p: p.name)
    for old in done[:-keep]:
        if old != protect:
            shutil.rmtree(old, ignore_errors=True)
    # builds that crashed part-way leave .building-* folders; they were never current
    for stale in folder.glob(".building-*"):
        if stale.stat().st_mtime < protect.stat().st_mtime:
            shutil.rmtree(stale, ignore_errors=True)


def current_refresh(serving_dir: Path) -> RefreshPaths | None:
    link = Path(serving_dir) / "current"
    if not link.exists():
        return None
    return RefreshPaths(link.resolve())


def query_tags(serving_dir: Path, sql: str) -> pd.DataFrame:
    """Run read-only SQL against the current tag store (tables: tags, priors, manifest)."""
    paths = current_refresh(serving_dir)
    if paths is None:
        raise FileNotFoundError(f"no tags under {serving_dir}: run `sendtime score` first")
    con = duckdb.connect(str(paths.store), read_only=True)
    try:
        return con.execute(sql).df()
    finally:
        con.close()
