"""PostgreSQL as a tag store, beside the embedded DuckDB one: a scheduler on another host
queries the current refresh's tags with SQL, the same tables as ``tags.duckdb``.

    the URL's schema (its search_path; usually public)
      tags             one row per user, the contract's tag table (tags.parquet)
      priors           cold-start priors (priors.parquet)
      manifest         key 'manifest', value: the refresh's manifest.json
      user_timezones   user_id, timezone (of the feature snapshot; what ``plan`` needs)
    role sendtime_reader   NOLOGIN, SELECT on those four and nothing else

Publishing (:func:`publish_to_postgres`) is one transaction: the four tables are loaded
under new names (binary ``COPY``, encoded column by column with Arrow), indexed, analysed,
then renamed over the served ones, so a reader sees the old complete set or the new one,
never a mix; a failure anywhere rolls all of it back and the old tables keep serving.
The replaced tables are dropped just after. A backfill that did not become current in the
serving folder is not published. Publishers take a transaction-scoped advisory lock, so two
hosts publishing to one database take turns.

Reading (:func:`query_tags_pg`) runs one query inside a read-only transaction under
``SET ROLE sendtime_reader``, and, because a session user with more rights could undo that
role inside a single statement (``set_config('role', ...)``, a ``DO`` block, or SQL in a
string run by ``ts_stat``), through a ``SECURITY DEFINER`` function owned by the reader
role: inside it PostgreSQL refuses any change of role. Statements that return no rows
(``DO``, ``COPY``, DDL) are refused before they run. So a query can neither write nor read
a server file, whatever rights the URL's user has.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from configs import SendtimeError
from serving.tagstore import Publication, RefreshPaths, TagQueryError

__all__ = ["READER_ROLE", "TABLES", "PgPublication", "TagStoreError", "audience_query", "decode_float_arrays",
           "pg_column_type", "publish_to_postgres", "query_tags_pg", "read_rows_pg", "redact_url", "served_refresh_id"]

log = logging.getLogger(__name__)

READER_ROLE = "sendtime_reader"
TABLES = ("tags", "priors", "manifest", "user_timezones")

# rows encoded and sent per COPY chunk: big enough for Arrow's kernels to pay, small enough
# that a chunk's buffers stay a few tens of MB
_BATCH_ROWS = 65_536
# a reader that locks the served tables in another order than the swap can deadlock with
# it; PostgreSQL then cancels one side: the swap retries (a savepoint keeps the load)
_SWAP_ATTEMPTS = 5

_NULL_FIELD = b"\xff\xff\xff\xff"     # a NULL in binary COPY: length -1
_PG_EPOCH_US = 946_684_800_000_000    # 2000-01-01 in microseconds since 1970


class TagStoreError(SendtimeError, RuntimeError):
    """The PostgreSQL tag store could not be reached, published or read."""


def redact_url(url: str) -> str:
    """The URL without its password, for messages and logs."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        netloc = parts.netloc.rsplit("@", 1)
        user = netloc[0].split(":", 1)[0]
        return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[1]}"))
    except ValueError:
        return "the configured PostgreSQL URL"


def _connect(url: str):
    import psycopg

    try:
        return psycopg.connect(url)
    except psycopg.Error as exc:
        raise TagStoreError(f"PostgreSQL tag store {redact_url(url)} unreachable: {_first_line(exc)}") from exc


def _first_line(exc: BaseException) -> str:
    """The server's message on one line, with its detail (which names the bad row) if any,
    without the echoed query and caret."""
    diag = getattr(exc, "diag", None)
    primary = getattr(diag, "message_primary", None) if diag is not None else None
    detail = getattr(diag, "message_detail", None) if diag is not None else None
    text = (primary or str(exc)).strip().splitlines()[:1] + (detail or "").strip().splitlines()[:1]
    return ": ".join(line.strip() for line in text if line.strip()) or type(exc).__name__


# ---------------------------------------------------------------- Arrow -> binary COPY

# arrow type -> (PostgreSQL type, big-endian numpy code, type oid, array type oid)
_SCALARS = {
    pa.bool_(): ("boolean", "u1", 16, 1000),
    pa.int16(): ("smallint", ">i2", 21, 1005),
    pa.int32(): ("integer", ">i4", 23, 1007),
    pa.int64(): ("bigint", ">i8", 20, 1016),
    pa.float32(): ("real", ">f4", 700, 1021),
    pa.float64(): ("double precision", ">f8", 701, 1022),
}
_WIDER = {pa.int8(): pa.int16(), pa.uint8(): pa.int16(), pa.uint16(): pa.int32(), pa.uint32(): pa.int64()}
# byte order, as DuckDB compares strings: ORDER BY gives the same rows in the same order, and
# the user_id indexes serve the audience's ordered join
_TEXT = ('text COLLATE "C"', None, 25, 1009)
_TIMESTAMPTZ = ("timestamp with time zone", ">i8", 1184, 1185)
_TIMESTAMP = ("timestamp without time zone", ">i8", 1114, 1115)


def _plain(t: pa.DataType) -> pa.DataType:
    if pa.types.is_dictionary(t):
        t = t.value_type
    return _WIDER.get(t, t)


def _scalar_kind(t: pa.DataType, column: str) -> tuple[str, str | None, int, int]:
    t = _plain(t)
    if t in _SCALARS:
        return _SCALARS[t]
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t):
        return _TEXT
    if pa.types.is_timestamp(t):
        return _TIMESTAMPTZ if t.tz else _TIMESTAMP
    raise TagStoreError(f"column {column!r}: type {t} has no PostgreSQL column type in the tag store")


def pg_column_type(t: pa.DataType, column: str) -> str:
    """The PostgreSQL type of an Arrow column (lists become one-dimensional arrays)."""
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        name = _scalar_kind(t.value_type, column)[0]
        return name.replace(" COLLATE", "[] COLLATE") if " COLLATE" in name else name + "[]"
    return _scalar_kind(t, column)[0]


def _binary(records: np.ndarray) -> pa.Array:
    """Each record's bytes as one element of a binary array (no copy of the records)."""
    width = records.dtype.itemsize
    fixed = pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), len(records), [None, pa.py_buffer(records)])
    return fixed.cast(pa.binary())


def _with_nulls(fields: pa.Array, valid: pa.Array | None) -> pa.Array:
    if valid is None:
        return fields
    return pc.if_else(valid, fields, pa.scalar(_NULL_FIELD, pa.binary()))


def _numbers(arr: pa.Array, code: str) -> np.ndarray:
    """The values of a fixed-width column as big-endian numbers (NULLs as 0, masked later)."""
    t = arr.type
    if pa.types.is_timestamp(t):
        micros = arr.cast(pa.timestamp("us", tz=t.tz)).cast(pa.int64())
        return (micros.fill_null(0).to_numpy(zero_copy_only=False) - _PG_EPOCH_US).astype(code)
    if t == pa.bool_():
        return arr.fill_null(False).to_numpy(zero_copy_only=False).astype(code)
    return arr.fill_null(0).to_numpy(zero_copy_only=False).astype(code)


def _encode(arr: pa.Array, column: str) -> pa.Array:
    """One binary COPY field per row: a 4-byte length, then the value (or -1 for NULL)."""
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    if arr.type in _WIDER:
        arr = arr.cast(_WIDER[arr.type])
    valid = arr.is_valid() if arr.null_count else None
    if pa.types.is_null(arr.type):
        return pa.array([_NULL_FIELD] * len(arr), pa.binary())
    if pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
        return _with_nulls(_encode_list(arr, column), valid)
    _, code, _, _ = _scalar_kind(arr.type, column)
    if code is None:   # text
        data = arr.cast(pa.binary())
        lengths = pc.binary_length(data).fill_null(0).to_numpy(zero_copy_only=False).astype(">i4")
        fields = pc.binary_join_element_wise(_binary(lengths), data, b"")
        return pc.fill_null(fields, pa.scalar(_NULL_FIELD, pa.binary())) if valid is not None else fields
    values = _numbers(arr, code)
    records = np.empty(len(arr), dtype=[("len", ">i4"), ("value", values.dtype)])
    records["len"] = values.dtype.itemsize
    records["value"] = values
    return _with_nulls(_binary(records), valid)


def _encode_list(arr: pa.Array, column: str) -> pa.Array:
    """A one-dimensional PostgreSQL array per row: its header, then each element as a field."""
    _, code, elem_oid, _ = _scalar_kind(arr.type.value_type, column)
    n = len(arr)
    lengths = pc.list_value_length(arr).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    flat = pc.list_flatten(arr)
    ends = np.concatenate([[0], np.cumsum(lengths)])
    if code is not None and not flat.null_count:
        # the common case (slot probabilities): elements of one width, so each row's body is
        # a slice of one numpy buffer
        values = _numbers(flat, code)
        elements = np.empty(len(flat), dtype=[("len", ">i4"), ("value", values.dtype)])
        elements["len"] = values.dtype.itemsize
        elements["value"] = values
        offsets = (ends * elements.dtype.itemsize).astype(np.int32)
        bodies = pa.BinaryArray.from_buffers(pa.binary(), n, [None, pa.py_buffer(offsets), pa.py_buffer(elements)])
        has_null = np.zeros(n, dtype=np.int32)
    else:
        fields = _encode(flat, column)
        bodies = pc.binary_join(pa.ListArray.from_arrays(pa.array(ends.astype(np.int32)), fields), b"")
        missing = np.concatenate([[0], np.cumsum(~flat.is_valid().to_numpy(zero_copy_only=False))])
        has_null = (missing[ends[1:]] - missing[ends[:-1]] > 0).astype(np.int32)
    body_bytes = pc.binary_length(bodies).to_numpy(zero_copy_only=False)
    header = np.empty(n, dtype=[("len", ">i4"), ("ndim", ">i4"), ("has_null", ">i4"), ("oid", ">i4"),
                                ("dim", ">i4"), ("lower", ">i4")])
    header["len"] = 20 + body_bytes
    header["ndim"] = 1
    header["has_null"] = has_null
    header["oid"] = elem_oid
    header["dim"] = lengths
    header["lower"] = 1
    out = pc.binary_join_element_wise(_binary(header), bodies, b"")
    if (lengths == 0).any():   # an empty array is a header with no dimensions
        empty = np.zeros(n, dtype=[("len", ">i4"), ("ndim", ">i4"), ("has_null", ">i4"), ("oid", ">i4")])
        empty["len"] = 12
        empty["oid"] = elem_oid
        out = pc.if_else(pa.array(lengths > 0), out, _binary(empty))
    return out


def _copy_rows(batch: pa.RecordBatch) -> memoryview:
    """A record batch as the tuples of a binary COPY stream."""
    count = np.full(batch.num_rows, batch.num_columns, dtype=">i2")
    fields = [_encode(col, name) for col, name in zip(batch.columns, batch.schema.names)]
    rows = pc.binary_join_element_wise(_binary(count), *fields, b"")
    offsets_buf, data_buf = rows.buffers()[1:3]
    offsets = np.frombuffer(offsets_buf, dtype=np.int32)
    start, end = int(offsets[rows.offset]), int(offsets[rows.offset + len(rows)])
    return memoryview(data_buf)[start:end]


def _copy_batches(cur, table: str, schema: pa.Schema, batches: Iterable[pa.RecordBatch]) -> int:
    from psycopg import sql

    columns = sql.SQL(", ").join(sql.Identifier(name) for name in schema.names)
    n = 0
    # FREEZE: the table was created in this transaction, so its rows need no later rewrite
    # of their visibility flags (readers and autovacuum would otherwise do it)
    with cur.copy(sql.SQL("COPY {} ({}) FROM STDIN (FORMAT binary, FREEZE)").format(
            sql.Identifier(table), columns)) as copy:
        copy.write(b"PGCOPY\n\xff\r\n\x00" + b"\x00" * 8)
        for batch in batches:
            if batch.num_rows:
                copy.write(_copy_rows(batch))
                n += batch.num_rows
        copy.write(b"\xff\xff")
    return n


# ---------------------------------------------------------------- publishing

@dataclass(frozen=True)
class PgPublication:
    """What :func:`publish_to_postgres` did: ``published`` False with the reason when it
    left the served tables as they were on purpose (a backfill that is not current)."""
    url: str            # redacted
    refresh_id: str
    published: bool
    n_tags: int
    seconds: float
    reason: str = ""

    def describe(self) -> str:
        if not self.published:
            return f"PostgreSQL tag store {self.url} not updated: {self.reason}"
        return (f"PostgreSQL tag store {self.url}: refresh {self.refresh_id}, {self.n_tags} tags, "
                f"published in {self.seconds:.1f} s")


@dataclass(frozen=True)
class _Source:
    table: str
    schema: pa.Schema
    batches: Iterator[pa.RecordBatch] | list[pa.RecordBatch]
    index_user_id: bool


def _sources(paths: RefreshPaths) -> list[_Source]:
    """The four tables of a refresh, read lazily from its files."""
    if not paths.tags.is_file():
        raise TagStoreError(f"refresh {paths.root} has no {paths.tags.name}: nothing to publish")
    try:
        tags_file = pq.ParquetFile(paths.tags)
        tags_schema = tags_file.schema_arrow
        priors = (pq.read_table(paths.priors) if paths.priors.is_file()
                  else pa.table({"level": pa.array([], pa.string())}))
        manifest = json.dumps(paths.read_manifest(), default=str)
        zones = (pq.read_table(paths.features, columns=["user_id", "timezone"]) if paths.features.is_file()
                 else pa.table({"user_id": pa.array([], pa.string()), "timezone": pa.array([], pa.string())}))
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise TagStoreError(f"refresh {paths.root} cannot be read for the tag store: {_first_line(exc)}") from exc
    if "user_id" not in tags_schema.names:
        raise TagStoreError(f"{paths.tags}: no user_id column (columns: {', '.join(tags_schema.names)})")
    zones = zones.cast(pa.schema([("user_id", pa.string()), ("timezone", pa.string())]))
    meta = pa.table({"key": ["manifest"], "value": [manifest]})
    return [
        _Source("tags", tags_schema, tags_file.iter_batches(batch_size=_BATCH_ROWS), True),
        _Source("priors", priors.schema, priors.to_batches(), False),
        _Source("manifest", meta.schema, meta.to_batches(), False),
        _Source("user_timezones", zones.schema, zones.to_batches(max_chunksize=_BATCH_ROWS), True),
    ]


def _ensure_reader_role(cur) -> None:
    """The SELECT-only role readers run under, with USAGE on the schema; the publisher
    becomes a member so that readers using the publisher's own URL can ``SET ROLE`` to it."""
    import psycopg
    from psycopg import sql

    role = sql.Identifier(READER_ROLE)
    cur.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", [READER_ROLE])
    if cur.fetchone() is None:
        cur.execute("SAVEPOINT reader_role")
        try:
            cur.execute(sql.SQL("CREATE ROLE {} NOLOGIN NOINHERIT").format(role))
        except psycopg.Error as exc:
            cur.execute("ROLLBACK TO SAVEPOINT reader_role")
            if not isinstance(exc, psycopg.errors.DuplicateObject):   # else another database's publisher won
                raise TagStoreError(
                    f"cannot create the role {READER_ROLE} that tag readers run under ({_first_line(exc)}): give "
                    f"the tag store's user CREATEROLE, or have an administrator run CREATE ROLE {READER_ROLE} "
                    "NOLOGIN and grant it to that user") from exc
        cur.execute("RELEASE SAVEPOINT reader_role")
    # PostgreSQL 16 gives a role's creator ADMIN on it but not SET: SET ROLE needs the latter
    cur.execute("SELECT rolsuper, pg_has_role(current_user, %s, "
                "CASE WHEN current_setting('server_version_num')::int >= 160000 THEN 'SET' ELSE 'MEMBER' END), "
                "has_schema_privilege(%s, current_schema(), 'USAGE') FROM pg_roles WHERE rolname = current_user",
                [READER_ROLE, READER_ROLE])
    superuser, can_set, usage = cur.fetchone()
    if not superuser and not can_set:
        try:
            cur.execute(sql.SQL("GRANT {} TO CURRENT_USER").format(role))
        except psycopg.Error as exc:
            raise TagStoreError(
                f"the tag store's user cannot take the role {READER_ROLE} that readers run under "
                f"({_first_line(exc)}): have an administrator run GRANT {READER_ROLE} TO <that user>") from exc
    if not usage:
        cur.execute(sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(
            sql.Identifier(_current_schema(cur)), role))


def _current_schema(cur) -> str:
    cur.execute("SELECT current_schema()")
    return cur.fetchone()[0]


def _existing(cur, names: Sequence[str]) -> list[str]:
    cur.execute("SELECT tablename FROM pg_tables WHERE schemaname = current_schema() AND tablename = ANY(%s)",
                [list(names)])
    found = {row[0] for row in cur.fetchall()}
    return [name for name in names if name in found]


def _stale(cur) -> list[str]:
    """Replaced tables a crash left behind between the swap and their drop."""
    pattern = "^(" + "|".join(TABLES) + ")__old_[0-9a-f]+$"
    cur.execute("SELECT tablename FROM pg_tables WHERE schemaname = current_schema() AND tablename ~ %s",
                [pattern])
    return [row[0] for row in cur.fetchall()]


def _drop(conn, tables: Sequence[str]) -> None:
    from psycopg import sql

    if not tables:
        return
    try:
        with conn.transaction():
            conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(
                sql.SQL(", ").join(sql.Identifier(t) for t in tables)))
    except Exception as exc:   # the new tables serve already; the old ones only take room
        log.warning("replaced tag tables %s not dropped (%s); the next publish retries", ", ".join(tables),
                    _first_line(exc))


def _swap(cur, token: str) -> list[str]:
    """Rename the new tables over the served ones; returns the replaced tables' names."""
    import psycopg
    from psycopg import sql

    for attempt in range(1, _SWAP_ATTEMPTS + 1):
        cur.execute("SAVEPOINT swap")
        try:
            served = _existing(cur, TABLES)
            if served:   # one lock statement, in a fixed order, so readers wait once
                cur.execute(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(
                    sql.SQL(", ").join(sql.Identifier(t) for t in served)))
            for table in served:
                cur.execute(sql.SQL("ALTER TABLE {} RENAME TO {}").format(
                    sql.Identifier(table), sql.Identifier(f"{table}__old_{token}")))
            for table in TABLES:
                cur.execute(sql.SQL("ALTER TABLE {} RENAME TO {}").format(
                    sql.Identifier(f"{table}__new_{token}"), sql.Identifier(table)))
            cur.execute("RELEASE SAVEPOINT swap")
            return [f"{table}__old_{token}" for table in served]
        except (psycopg.errors.DeadlockDetected, psycopg.errors.LockNotAvailable) as exc:
            cur.execute("ROLLBACK TO SAVEPOINT swap")
            if attempt == _SWAP_ATTEMPTS:
                raise TagStoreError(f"the tag tables stayed locked by readers through {attempt} attempts: "
                                    f"{_first_line(exc)}") from exc
            log.info("tag table swap deadlocked with a reader (%s); retrying", _first_line(exc))
    raise AssertionError("unreachable")


def publish_to_postgres(url: str, paths: RefreshPaths, publication: Publication | None = None) -> PgPublication:
    """Publish a completed refresh (its tags, priors, manifest and users' time zones) to
    the PostgreSQL tag store at ``url``, atomically (module doc).

    ``publication``: what :func:`serving.tagstore.publish_refresh` did with it; a refresh
    that did not become current (a backfill) is not published. Raises
    :class:`TagStoreError` with the served tables untouched when anything fails."""
    import psycopg
    from psycopg import sql

    shown = redact_url(url)
    refresh_id = paths.refresh_id
    if publication is not None and not publication.became_current:
        reason = (f"refresh {refresh_id} (as of {publication.as_of}) is a backfill that did not become current; "
                  f"the tag store keeps serving the current one")
        log.info("PostgreSQL tag store %s not updated: %s", shown, reason)
        return PgPublication(shown, refresh_id, False, 0, 0.0, reason)
    t0 = time.perf_counter()
    sources = _sources(paths)
    token = uuid.uuid4().hex[:10]
    conn = _connect(url)
    try:
        try:
            with conn.transaction(), conn.cursor() as cur:
                cur.execute("SELECT current_schema()")
                if cur.fetchone()[0] is None:
                    raise TagStoreError(f"PostgreSQL tag store {shown}: no schema of the search_path exists")
                cur.execute("SELECT pg_advisory_xact_lock(hashtext('sendtime tag store ' || current_schema()))")
                stale = _stale(cur)
                _ensure_reader_role(cur)
                n_tags = 0
                for source in sources:
                    new = f"{source.table}__new_{token}"
                    columns = sql.SQL(", ").join(
                        sql.SQL("{} {}").format(sql.Identifier(f.name), sql.SQL(pg_column_type(f.type, f.name)))
                        for f in source.schema)
                    cur.execute(sql.SQL("CREATE TABLE {} ({})").format(sql.Identifier(new), columns))
                    n = _copy_batches(cur, new, source.schema, source.batches)
                    if source.table == "tags":
                        n_tags = n
                    if source.index_user_id:
                        unique = sql.SQL("UNIQUE ") if source.table == "tags" else sql.SQL("")
                        cur.execute(sql.SQL("CREATE {}INDEX {} ON {} (user_id)").format(
                            unique, sql.Identifier(f"{source.table}_user_{token}"), sql.Identifier(new)))
                    cur.execute(sql.SQL("ANALYZE {}").format(sql.Identifier(new)))
                    cur.execute(sql.SQL("GRANT SELECT ON {} TO {}").format(
                        sql.Identifier(new), sql.Identifier(READER_ROLE)))
                replaced = _swap(cur, token)
        except (psycopg.Error, pa.ArrowException, OSError) as exc:   # a bad file fails mid-COPY
            raise TagStoreError(f"publishing refresh {refresh_id} to the PostgreSQL tag store {shown} failed, "
                                f"the tables served before stay: {_first_line(exc)}") from exc
        _drop(conn, replaced + stale)
    finally:
        conn.close()
    seconds = time.perf_counter() - t0
    log.info("PostgreSQL tag store %s: refresh %s published (%d tags) in %.1f s", shown, refresh_id, n_tags, seconds)
    return PgPublication(shown, refresh_id, True, n_tags, seconds)


# ---------------------------------------------------------------- reading

# created per reading transaction, under the reader role, so the reader role owns it: inside
# a SECURITY DEFINER function PostgreSQL refuses to change the role or session user
_RUNNER = ("CREATE FUNCTION pg_temp.sendtime_run(query text, ids text[]) RETURNS SETOF record "
           "LANGUAGE plpgsql SECURITY DEFINER AS $f$ BEGIN RETURN QUERY EXECUTE query USING ids; END $f$")
_READ_ONLY_HINT = (" (`sendtime tags` runs read-only SQL over the tag store: it cannot write it, nor read or "
                   "write any other file)")


@contextmanager
def _reading(url: str) -> Iterator:
    """A connection inside a read-only transaction under the reader role, with the runner."""
    import psycopg
    from psycopg import sql
    from psycopg.types.numeric import FloatLoader

    conn = _connect(url)
    # numeric (avg of integers, sums) as float, like DuckDB's doubles in a DataFrame
    conn.adapters.register_loader("numeric", FloatLoader)
    try:
        try:
            # the schema the URL's user publishes to, kept under the reader role (whose "$user"
            # entry of the search_path would name another schema)
            schema = conn.execute("SELECT current_schema()").fetchone()[0]
            if schema is None:
                raise TagStoreError(f"no tags in the PostgreSQL tag store {redact_url(url)}: no schema of the "
                                    "search_path exists; run `sendtime score` with the tag store configured first")
            conn.execute(sql.SQL("SET LOCAL search_path = {}").format(sql.Identifier(schema)))
            conn.execute("SET LOCAL TimeZone = 'UTC'")
            conn.execute(sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(READER_ROLE)))
            conn.execute(_RUNNER)
            conn.execute("SET TRANSACTION READ ONLY")
            # tags first, as the swap locks it first: a reader waits for a swap holding nothing,
            # and holds the served set (every table of one publish) until it is done
            conn.execute("LOCK TABLE tags IN ACCESS SHARE MODE")
        except psycopg.Error as exc:
            if isinstance(exc, (psycopg.errors.UndefinedTable, psycopg.errors.InvalidParameterValue)):
                raise TagStoreError(f"no tags in the PostgreSQL tag store {redact_url(url)}: run `sendtime score` "
                                    f"with the tag store configured first ({_first_line(exc)})") from exc
            raise TagStoreError(f"PostgreSQL tag store {redact_url(url)}: cannot open a read-only transaction "
                                f"as {READER_ROLE}: {_first_line(exc)}") from exc
        yield conn
    finally:
        conn.rollback()
        conn.close()


def _run(conn, query: str, ids: Sequence[str] | None, binary: bool = False) -> tuple[list[str], list[tuple]]:
    """One query through the runner: its column names and rows (``binary``: in PostgreSQL's
    binary format, which brings bytea as it is rather than as hex text)."""
    import psycopg
    from psycopg import pq

    pg = conn.pgconn
    text_array_oid = 1009
    prepared = pg.prepare(b"", query.encode(), [text_array_oid])
    if prepared.status != pq.ExecStatus.COMMAND_OK:
        raise psycopg.errors.error_from_result(prepared, encoding=conn.info.encoding)
    described = pg.describe_prepared(b"")
    if described.status != pq.ExecStatus.COMMAND_OK:
        raise psycopg.errors.error_from_result(described, encoding=conn.info.encoding)
    if not described.nfields:
        raise TagQueryError("tags query failed: only a query that returns rows can run (SELECT, WITH, VALUES, "
                            "TABLE); the tag store is read-only" + _READ_ONLY_HINT)
    names = [described.fname(i).decode() for i in range(described.nfields)]
    oids = [described.ftype(i) for i in range(described.nfields)]
    mods = [described.fmod(i) for i in range(described.nfields)]
    types = [row[0] for row in conn.execute(
        "SELECT format_type(t, m) FROM unnest(%s::oid[], %s::int[]) WITH ORDINALITY AS x(t, m, i) ORDER BY i",
        [oids, mods]).fetchall()]
    definition = ", ".join(f'"c{i}" {t}' for i, t in enumerate(types))
    with conn.cursor(binary=binary) as cur:
        rows = cur.execute(f"SELECT * FROM pg_temp.sendtime_run(%s, %s) AS t({definition})",
                           [query, list(ids) if ids is not None else None]).fetchall()
    return names, rows


def read_rows_pg(url: str, queries: Sequence[tuple[str, Sequence[str] | None]], *,
                 binary: bool = False) -> list[tuple[list[str], list[tuple]]]:
    """Run read-only queries (each may use ``$1``, a text[] of ids) in one transaction, so
    all of them read the same published set (a swap waits for the transaction to end).
    Database errors come back as :class:`TagQueryError` (one line)."""
    import psycopg

    with _reading(url) as conn:
        try:
            return [_run(conn, query, ids, binary) for query, ids in queries]
        except psycopg.Error as exc:
            hint = _READ_ONLY_HINT if isinstance(exc, (psycopg.errors.InsufficientPrivilege,
                                                        psycopg.errors.ReadOnlySqlTransaction)) else ""
            raise TagQueryError(f"tags query failed: {_first_line(exc)}{hint}") from exc


def query_tags_pg(url: str, sql: str) -> pd.DataFrame:
    """``sendtime tags`` on the PostgreSQL tag store: the same tables (tags, priors,
    manifest, user_timezones) and the same guarantees as :func:`serving.tagstore.query_tags`
    (read-only, no server files), refusals as one-line :class:`TagQueryError`."""
    [(names, rows)] = read_rows_pg(url, [(sql, None)])
    return pd.DataFrame.from_records(rows, columns=range(len(names))).set_axis(names, axis=1)


def served_refresh_id(url: str) -> str | None:
    """The refresh the PostgreSQL tag store serves (None before the first publish)."""
    try:
        [(_, rows)] = read_rows_pg(url, [("SELECT value FROM manifest WHERE key = 'manifest'", None)])
    except (TagQueryError, TagStoreError):
        return None
    return json.loads(rows[0][0]).get("refresh_id") if rows else None


def audience_query(condition: str, with_ids: bool) -> str:
    """The audience of ``plan`` (see :func:`serving.plan.read_audience`): PostgreSQL's
    spelling of the DuckDB query, probabilities as their binary array (decoded by numpy)."""
    ids = " AND user_id = ANY($1)" if with_ids else ""
    return f"""WITH t AS (SELECT * FROM tags WHERE ({condition}){ids})
               SELECT t.user_id, array_send(t.slot_open_probs) AS slot_open_probs, t.unsubscribed, f.timezone
               FROM t LEFT JOIN user_timezones f ON f.user_id = t.user_id
               ORDER BY t.user_id COLLATE "C\""""


def decode_float_arrays(values: Sequence[bytes | None], width: int | None) -> np.ndarray:
    """PostgreSQL's binary one-dimensional real[]/float8[] arrays (``array_send``) as an
    (n, width) float64 matrix; NULL arrays, and NULL elements, as NaN."""
    n = len(values)
    sizes = np.fromiter((len(v) if v is not None else -1 for v in values), dtype=np.int64, count=n)
    present = np.flatnonzero(sizes >= 0)
    if not len(present):
        return np.full((n, width or 24), np.nan)
    first = bytes(values[present[0]])
    ndim, _, oid = np.frombuffer(first[:12], dtype=">i4")
    code = ">f4" if oid == 700 else ">f8"
    size = np.dtype(code).itemsize
    if ndim == 1 and (sizes[present] == sizes[present[0]]).all():
        dim = int(np.frombuffer(first[12:16], dtype=">i4")[0])
        layout = np.dtype([("head", ">i4", 5), ("cells", [("len", ">i4"), ("value", code)], (dim,))])
        if layout.itemsize == sizes[present[0]]:
            joined = b"".join(values) if len(present) == n else b"".join(values[i] for i in present)
            cells = np.frombuffer(joined, dtype=layout)["cells"]
            got = np.where(cells["len"] < 0, np.nan, cells["value"].astype(np.float64))
            out = np.full((n, width or dim), np.nan)
            out[present, : min(dim, width or dim)] = got[:, : width or dim]
            return out
    rows = [_decode_one(bytes(v), code, size) if v is not None else None for v in values]
    width = width or max((len(r) for r in rows if r is not None), default=24)
    out = np.full((n, width), np.nan)
    for i, r in enumerate(rows):
        if r is not None:
            out[i, : min(width, len(r))] = r[:width]
    return out


def _decode_one(data: bytes, code: str, size: int) -> np.ndarray:
    ndim = int(np.frombuffer(data[:4], dtype=">i4")[0])
    if ndim == 0:
        return np.zeros(0)
    dim = int(np.frombuffer(data[12:16], dtype=">i4")[0])
    out = np.full(dim, np.nan)
    pos = 20
    for k in range(dim):
        length = int(np.frombuffer(data[pos:pos + 4], dtype=">i4")[0])
        pos += 4
        if length >= 0:
            out[k] = np.frombuffer(data[pos:pos + size], dtype=code)[0]
            pos += length
    return out

