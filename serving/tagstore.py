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

One refresh at a time: a refresh holds ``serving_dir/.refresh.lock`` (an exclusive
``flock``, released by the kernel when its process ends) from the first feature to the
symlink swap, and a second one fails at once naming the holder. Only the lock holder
prunes, so no run deletes another's build. A refresh whose as-of time is older than the
current one's (a backfill) is published beside it but does not become current unless asked.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import duckdb
import pandas as pd

from configs import SendtimeError, fsync_dir
from features.snapshot import FEATURES_FILE, MANIFEST_FILE, read_manifest

__all__ = ["LOCK_FILE", "Publication", "RefreshBusyError", "RefreshLock", "RefreshPaths", "TagQueryError",
           "current_refresh", "new_refresh_dir", "publish_refresh", "query_tags", "refresh_lock"]

log = logging.getLogger(__name__)

LOCK_FILE = ".refresh.lock"


class RefreshBusyError(SendtimeError, RuntimeError):
    """Another refresh holds the serving folder's lock."""


class TagQueryError(SendtimeError, ValueError):
    """A ``sendtime tags`` query DuckDB refused (bad SQL, or an attempt to touch files)."""


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

    @property
    def refresh_id(self) -> str:
        return self.root.name


# ---------------------------------------------------------------- one refresh at a time

@dataclass
class RefreshLock:
    """The held lock of a serving folder (see :func:`refresh_lock`)."""
    serving_dir: Path
    path: Path
    fd: int | None

    @property
    def held(self) -> bool:
        return self.fd is not None

    def require(self, serving_dir: str | Path) -> None:
        """Fail unless this is the held lock of ``serving_dir``."""
        if not self.held or Path(self.serving_dir).resolve() != Path(serving_dir).resolve():
            raise RefreshBusyError(f"refreshing {serving_dir} needs its refresh lock ({Path(serving_dir) / LOCK_FILE})")


def _describe_holder(fd: int) -> str:
    try:
        holder = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        holder = {}
    if not holder.get("pid"):
        return "a process that has not yet written its id"
    return f"pid {holder['pid']} on {holder.get('host', '?')}, started {holder.get('started', '?')}"


@contextmanager
def refresh_lock(serving_dir: str | Path) -> Iterator[RefreshLock]:
    """Hold ``serving_dir/.refresh.lock`` exclusively, or fail at once with
    :class:`RefreshBusyError` naming the holder (its pid, host and start time, which the
    holder writes into the file). ``flock`` is tied to the open file, so the lock goes
    with its process however that ends; the file itself stays, empty when free."""
    serving_dir = Path(serving_dir)
    if not serving_dir.is_dir():
        serving_dir.mkdir(parents=True, exist_ok=True)
        fsync_dir(serving_dir.parent)
    path = serving_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RefreshBusyError(
                f"another refresh of {serving_dir} is running ({_describe_holder(fd)}): {path} is locked; "
                "wait for it to finish (the lock is released when that process ends)") from None
        started = datetime.now(timezone.utc).isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": started}).encode(), 0)
        lock = RefreshLock(serving_dir, path, fd)
        try:
            yield lock
        finally:
            os.ftruncate(fd, 0)
            lock.fd = None
    finally:
        os.close(fd)   # closing the last descriptor releases the flock


def new_refresh_dir(serving_dir: Path) -> tuple[RefreshPaths, str]:
    """A fresh temporary folder for a refresh being built, and its final id."""
    refresh_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
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


@dataclass(frozen=True)
class Publication:
    """Where a refresh landed and whether it became current. A backfill (an as-of time
    older than the current refresh's) is published beside the current one, which stays."""
    paths: RefreshPaths
    became_current: bool
    current: RefreshPaths           # the refresh serving after this publication
    as_of: str | None
    current_as_of: str | None       # the serving refresh's as-of time before this publication

    @property
    def backfill(self) -> bool:
        return _older(self.as_of, self.current_as_of)


def _older(as_of: str | None, than: str | None) -> bool:
    if not as_of or not than:
        return False
    return datetime.fromisoformat(as_of) < datetime.fromisoformat(than)


def _current_as_of(serving_dir: Path) -> tuple[RefreshPaths | None, str | None]:
    paths = current_refresh(serving_dir)
    if paths is None:
        return None, None
    try:
        return paths, paths.read_manifest().get("as_of")
    except (OSError, ValueError) as exc:
        log.warning("the current refresh %s has no readable manifest (%s); the new one replaces it", paths.root, exc)
        return paths, None


def publish_refresh(serving_dir: Path, building: RefreshPaths, refresh_id: str, keep: int, *,
                    lock: RefreshLock, make_current: bool = False) -> Publication:
    """Publish a completed refresh with atomic renames and make it current, unless its
    as-of time is older than the current refresh's and ``make_current`` is not set (a
    backfill: it is published, not served). Prunes old refreshes and crashed builds,
    which only the holder of the refresh lock may do."""
    serving_dir = Path(serving_dir)
    lock.require(serving_dir)
    as_of = read_manifest(building.root).get("as_of")
    before, before_as_of = _current_as_of(serving_dir)
    final = serving_dir / "refreshes" / refresh_id
    _sync_tree(building.root)   # the files reach the disk before any name points at them
    building.root.rename(final)
    fsync_dir(final.parent)
    swap = make_current or before is None or not _older(as_of, before_as_of)
    if swap:
        link = serving_dir / "current"
        tmp_link = serving_dir / f".current-{uuid.uuid4().hex[:6]}"
        os.symlink(Path("refreshes") / refresh_id, tmp_link)
        os.replace(tmp_link, link)  # the one step readers can observe
        fsync_dir(serving_dir)
    published = RefreshPaths(final)
    current = published if swap else before
    _prune(serving_dir, keep, protect={final, current.root})
    return Publication(paths=published, became_current=swap, current=current, as_of=as_of,
                       current_as_of=before_as_of)


def _sync_tree(folder: Path) -> None:
    for path in folder.iterdir():
        if path.is_dir():
            _sync_tree(path)
        elif path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fsync_dir(folder)


def _prune(serving_dir: Path, keep: int, protect: set[Path]) -> None:
    """Called under the refresh lock only: no other build is running, so every
    ``.building-*`` folder is a crashed one (the caller's own has been renamed by now)."""
    folder = serving_dir / "refreshes"
    protect = {p.resolve() for p in protect}
    done = sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")),
                  key=lambda p: p.name)
    for old in done[:-keep]:
        if old.resolve() not in protect:
            shutil.rmtree(old, ignore_errors=True)
    for stale in folder.glob(".building-*"):
        if stale.resolve() not in protect:
            shutil.rmtree(stale, ignore_errors=True)
    for stale_link in serving_dir.glob(".current-*"):   # a crash between symlink and swap
        if stale_link.is_symlink():
            stale_link.unlink(missing_ok=True)


def current_refresh(serving_dir: Path) -> RefreshPaths | None:
    link = Path(serving_dir) / "current"
    if not link.exists():
        return None
    return RefreshPaths(link.resolve())


def query_tags(serving_dir: Path, sql: str, *, tag_store_url: str | None = None) -> pd.DataFrame:
    """Run read-only SQL against the current tag store (tables: tags, priors, manifest).

    The store is opened read-only with external access off and the configuration locked,
    so a query cannot write the store nor read or write any other file (``COPY ... TO``,
    ``read_csv``, ``ATTACH``, ``INSTALL``/``LOAD`` all fail); DuckDB's refusal comes back
    as one line in a :class:`TagQueryError`. With ``tag_store_url`` the PostgreSQL tag
    store answers instead, with the same tables and guarantees (:mod:`serving.pg_tagstore`)."""
    if tag_store_url:
        from serving.pg_tagstore import query_tags_pg

        return query_tags_pg(tag_store_url, sql)
    paths = current_refresh(serving_dir)
    if paths is None:
        raise FileNotFoundError(f"no tags under {serving_dir}: run `sendtime score` first")
    con = duckdb.connect(str(paths.store), read_only=True,
                         config={"enable_external_access": False, "lock_configuration": True})
    try:
        return con.execute(sql).df()   # read in full before the connection closes
    except duckdb.Error as exc:
        hint = (" (`sendtime tags` runs read-only SQL over the tag store: it cannot write it, nor read or "
                "write any other file)") if isinstance(exc, duckdb.PermissionException) else ""
        raise TagQueryError(f"tags query failed: {_one_line(str(exc))}{hint}") from exc
    finally:
        con.close()


def _one_line(message: str) -> str:
    """DuckDB's message without the echoed query and caret (``LINE 1: ...``)."""
    lines = []
    for line in message.splitlines():
        if line.startswith("LINE "):
            break
        if line.strip():
            lines.append(line.strip())
    return " ".join(lines) or message.strip()
