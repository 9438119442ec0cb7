"""One way to write an artifact: to a temporary name beside the target, flushed to disk,
then renamed over it, so a reader sees the old file or the new one, never half of one.
And one place that decides the as-of time of a job."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

__all__ = ["atomic_path", "fsync_dir", "resolve_as_of", "write_atomic"]


def fsync_dir(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


@contextmanager
def atomic_path(target: str | Path, durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success it replaces ``target``.

    The caller may make it a file or a folder. On any failure it is removed and ``target``
    is left as it was (a folder replaces only a missing or empty ``target``).
    ``durable=False``: no fsync before the rename, for files inside a folder that is
    synced as a whole before anything points at it (a refresh being built).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    try:
        yield tmp
        if durable and tmp.is_file():
            _fsync_file(tmp)
        os.replace(tmp, target)
        if durable:
            fsync_dir(target.parent)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def write_atomic(target: str | Path, write: Callable[[Path], object], durable: bool = True) -> Path:
    """``write(tmp_path)`` then move it over ``target``; returns ``target``."""
    with atomic_path(target, durable) as tmp:
        write(tmp)
    return Path(target)


def resolve_as_of(as_of: datetime | None, last_event: Callable[[], datetime]) -> datetime:
    """The point in time of a job: the asked one, else the log's last event (the contract's
    default everywhere: features, train, score, evaluate)."""
    return as_of if as_of is not None else last_event()
