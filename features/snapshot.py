"""A feature snapshot on disk: the user matrix as one Parquet file and one manifest that
says what it is. ``sendtime features`` and the nightly refresh both write it this way,
and the service reads it back; one schema for every snapshot:

    <folder>/features.parquet     one row per user; per-slot families as family__SSS columns
    <folder>/manifest.json        {"as_of", "n_users", "n_slots", "slot_kind", "attributes",
                                   "population", "population_priors", ...job's own keys}
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from configs import Config, write_atomic
from features.matrix import SLOT_FAMILIES, PopulationPriors, UserMatrix

__all__ = ["FEATURES_FILE", "MANIFEST_FILE", "read_manifest", "read_snapshot", "snapshot_manifest",
           "write_manifest", "write_snapshot"]

FEATURES_FILE = "features.parquet"
MANIFEST_FILE = "manifest.json"
SNAPSHOT_ROW_GROUP = 100_000    # users per Parquet row group of a snapshot


def snapshot_manifest(matrix: UserMatrix, priors: PopulationPriors, cfg: Config, **extra: object) -> dict:
    """The manifest of a snapshot: what every reader needs to rebuild the matrix, plus the
    population priors its features were derived with (and which population that was)."""
    return {
        "as_of": matrix.as_of.isoformat(),
        "n_users": len(matrix),
        "n_slots": matrix.n_slots,
        "slot_kind": cfg.slots.kind,
        "attributes": list(matrix.attributes),
        "population": priors.population,
        "population_priors": priors.to_dict(),
        **extra,
    }


def write_manifest(folder: str | Path, manifest: dict) -> Path:
    text = json.dumps(manifest, indent=2, default=str)
    return write_atomic(Path(folder) / MANIFEST_FILE, lambda tmp: tmp.write_text(text))


def read_manifest(folder: str | Path) -> dict:
    return json.loads((Path(folder) / MANIFEST_FILE).read_text())


def write_snapshot(folder: str | Path, matrix: UserMatrix, priors: PopulationPriors, cfg: Config,
                   durable: bool = True, **extra: object) -> dict:
    """Write the matrix and its manifest (each atomically); returns the manifest.
    ``durable=False``: the matrix is not synced to disk here (a refresh syncs its whole
    folder before publishing it, by when the kernel has written most of it back)."""
    folder = Path(folder)
    write_atomic(folder / FEATURES_FILE, lambda tmp: _write_rows(matrix, tmp), durable)
    manifest = snapshot_manifest(matrix, priors, cfg, **extra)
    write_manifest(folder, manifest)
    return manifest


def _write_rows(matrix: UserMatrix, path: Path, rows: int = SNAPSHOT_ROW_GROUP) -> None:
    """The matrix as Parquet, a row group at a time: Arrow holds one group's copy, not the
    whole matrix's (2-3 GB at 1M users)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    first = matrix.to_arrow(slice(0, rows))
    # dictionary pages only for text: tried on every float column they are abandoned after
    # costing most of the write (1M users x 600 columns: 3-4x the CPU, and 5x on reading back)
    text = [f.name for f in first.schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)]
    with pq.ParquetWriter(path, first.schema, use_dictionary=text) as writer:
        writer.write_table(first)
        for start in range(rows, len(matrix), rows):
            writer.write_table(matrix.to_arrow(slice(start, start + rows)).cast(first.schema))


def read_snapshot(folder: str | Path) -> tuple[UserMatrix, dict]:
    """The matrix of a snapshot folder and its manifest."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    path, n_slots = folder / FEATURES_FILE, int(manifest["n_slots"])
    names = pq.ParquetFile(path).schema_arrow.names
    families = sorted({c.split("__")[0] for c in names if "__" in c}, key=SLOT_FAMILIES.index)
    # a family at a time: a frame of every column beside the matrix took ~10 GB at 1M users
    scalars = pd.read_parquet(path, columns=[c for c in names if "__" not in c]).set_index("user_id")
    slots = {f: pd.read_parquet(path, columns=[f"{f}__{s:03d}" for s in range(n_slots)]).to_numpy(np.float32)
             for f in families}
    matrix = UserMatrix(as_of=datetime.fromisoformat(manifest["as_of"]), n_slots=n_slots, scalars=scalars,
                        slots=slots, attributes=tuple(manifest["attributes"]))
    return matrix, manifest
