"""Event files already found valid, so a log that grows by a file a day is checked a file a
day: the nightly refresh reopens the whole log, and checking every row of a 100M-event log
costs about 4-5 s each time for files that have not changed.

A file counts as checked when a marker for its identity exists: its absolute path, size,
modification and status-change times (ns) and inode, and a digest of the checks (their SQL,
the union schema of the log's columns, DuckDB's version). Rewriting, replacing, touching or
copying a file changes its identity, and it is checked again; a changed check or schema
checks every file again. Only clean files get a marker: a file with invalid rows is checked
(and reported, or quarantined) every time.
"""

from __future__ import annotations

import hashlib
import logging
import os
import uuid
from collections.abc import Iterable
from pathlib import Path

import duckdb

__all__ = ["ValidatedFiles"]

log = logging.getLogger(__name__)


class ValidatedFiles:
    """The markers under ``folder`` for a log's source ``files``, for one ``checks`` digest."""

    def __init__(self, folder: str | Path, files: Iterable[Path], checks: str) -> None:
        self.folder = Path(folder)
        self.files = [Path(f) for f in files]
        self._digest = hashlib.sha256(f"{checks}\n{duckdb.__version__}".encode()).hexdigest()
        self._seen: dict[Path, Path] = {}

    def _marker(self, path: Path) -> Path:
        st = path.stat()
        identity = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}|{st.st_ino}|{self._digest}"
        return self.folder / (hashlib.sha256(identity.encode()).hexdigest() + ".ok")

    def unchecked(self) -> list[Path]:
        """The files without a marker, in the given order. Their identities are taken now,
        before the caller reads them: :meth:`mark` marks those, not what the files became."""
        self._seen = {f: self._marker(f) for f in self.files}
        return [f for f, marker in self._seen.items() if not marker.exists()]

    def mark(self, files: Iterable[Path]) -> None:
        """Record ``files`` as clean, as they were when :meth:`unchecked` looked; a file
        changed since (rewritten or replaced while it was read) is left to the next check.
        A marker that cannot be written only costs a check next time."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            for f in files:
                marker = self._seen.get(f)
                if marker is None or not f.exists() or self._marker(f) != marker:
                    continue
                tmp = marker.with_name(f".{marker.name}.{uuid.uuid4().hex[:6]}")
                tmp.write_text(f"{Path(f).resolve()}\n")
                os.replace(tmp, marker)
        except OSError as exc:
            log.warning("could not record the checked event files under %s: %s", self.folder, exc)
