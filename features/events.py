"""The behaviour log: load events and users, validate them against the contract, expose
them to SQL in UTC and in each user's local time.

DuckDB runs every query over the Parquet/CSV files in place (no copy of the log in
Python memory), in parallel and out of core, which is what makes 100M-row logs fit
on one machine. The same code runs on a pandas partition of users (``from_frames``),
which is how the Dask path reuses it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import duckdb
import pandas as pd

from configs import EVENT_NAMES, SendtimeError
from features.validated import ValidatedFiles

__all__ = [
    "EVENT_KINDS",
    "EventLog",
    "EventLogError",
    "open_log",
    "from_frames",
    "to_utc",
    "user_partition_sql",
    # SQL helpers the importer shares
    "columns_of",
    "connect_duckdb",
    "files_sql",
    "source_files",
    "source_sql",
    "sql_quote",
    "sql_ts",
]

log = logging.getLogger(__name__)

EVENT_KINDS = EVENT_NAMES
_OPTIONAL_EVENT_COLUMNS = ("message_id", "channel", "value", "propensity")
# optional columns that hold numbers; the rest are strings
_NUMERIC_EVENT_COLUMNS = ("value", "propensity")
_RESERVED_USER_COLUMNS = ("user_id", "signup_ts", "timezone")
_SHOW_BAD_ROWS = 5


class EventLogError(SendtimeError, ValueError):
    """Input that breaks the contract; the message names the column, the count and rows."""


def to_utc(value: str | datetime | pd.Timestamp) -> datetime:
    """A naive UTC datetime from an ISO string or datetime (naive means UTC)."""
    ts = pd.Timestamp(value)
    if ts.tzinfo is not None:
        ts = ts.tz_convert("UTC").tz_localize(None)
    return ts.to_pydatetime()


@dataclass
class EventLog:
    """A validated log, as DuckDB views.

    Views: ``events`` (user_id, ts [naive UTC], event, message_id, channel, value,
    propensity [NULL when not logged]),
    ``users`` (user_id, timezone, signup_ts, attributes...), and ``events_local``
    (events plus ``local_ts``, ``local_hour``, ``local_dow`` with Monday = 0).
    """

    con: duckdb.DuckDBPyConnection
    default_timezone: str
    attribute_columns: tuple[str, ...] = ()
    numeric_attributes: tuple[str, ...] = ()
    quarantined_rows: int = 0
    sources: dict[str, str] = field(default_factory=dict)
    partition: tuple[int, int] | None = None   # (part, n_parts): only these users' rows

    def query_df(self, sql: str, params: list | dict | None = None) -> pd.DataFrame:
        return self.con.execute(sql, params or []).df()

    def max_ts(self) -> datetime | None:
        value = self.con.execute("SELECT max(ts) FROM events").fetchall()[0][0]
        return value

    def min_ts(self) -> datetime | None:
        return self.con.execute("SELECT min(ts) FROM events").fetchall()[0][0]

    def event_counts(self) -> dict[str, int]:
        rows = self.con.execute("SELECT event, count(*) FROM events GROUP BY 1").fetchall()
        return {event: int(n) for event, n in rows}

    def close(self) -> None:
        self.con.close()

    def release_memory(self) -> None:
        """Hand the buffers DuckDB keeps after its queries back to the system. DuckDB caches
        freed blocks up to its memory limit (1-1.5 GB after the feature state's scans of a
        100M-event log, held while the matrix is built and scored); lowering the limit to
        what its tables still use evicts them, and the limit is then put back."""
        in_use = sum(int(r[0]) for r in self.con.execute("SELECT memory_usage_bytes FROM duckdb_memory()").fetchall())
        limit = self.con.execute("SELECT current_setting('memory_limit')").fetchall()[0][0]
        try:
            self.con.execute(f"SET memory_limit = '{in_use // 2**20 + 64}MB'")
        except duckdb.Error:    # it could not evict to that: leave the cache as it is
            pass
        finally:
            self.con.execute(f"SET memory_limit = {sql_quote(limit)}")

    @contextmanager
    def narrowed(self, ranges: list[tuple[datetime, datetime]]) -> Iterator["EventLog"]:
        """This log with ``events`` (and every view over it) holding only the events whose ts
        lies in one of the (a, b] ``ranges``, read from the sources once and kept in memory.

        For a batch of queries that each look inside those ranges only: the incremental
        refresh reads a day of new events and a few one-day slices of a long log, and a log
        whose files are not ordered by time cannot skip anything, so each query would
        otherwise scan all of it. The views are put back on leaving."""
        merged: list[list[datetime]] = []
        for a, b in sorted(ranges):
            if merged and a <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], b)
            else:
                merged.append([a, b])
        (saved,) = self.con.execute(
            "SELECT sql FROM duckdb_views() WHERE view_name = 'events' AND temporary").fetchall()[0]
        keep = " OR ".join(f"(ts > {sql_ts(a)} AND ts <= {sql_ts(b)})" for a, b in merged) or "false"
        self.con.execute(f"CREATE OR REPLACE TEMP TABLE _narrowed_events AS SELECT * FROM events WHERE {keep}")
        self.con.execute("CREATE OR REPLACE TEMP VIEW events AS SELECT * FROM _narrowed_events")
        try:
            yield self
        finally:
            self.con.execute(saved.replace("CREATE TEMP VIEW", "CREATE OR REPLACE TEMP VIEW", 1))
            self.con.execute("DROP TABLE IF EXISTS _narrowed_events")


def source_sql(path: Path, what: str) -> str:
    """A DuckDB table function reading a Parquet/CSV file or a folder of them."""
    return files_sql(*source_files(path, what))


def files_sql(files: list[Path], kind: str) -> str:
    """A DuckDB table function reading exactly ``files`` (of ``kind``, "parquet" or "csv")."""
    listing = "[" + ", ".join(sql_quote(str(f)) for f in files) + "]"
    if kind == "parquet":
        return f"read_parquet({listing}, filename = true, union_by_name = true)"
    return f"read_csv({listing}, filename = true, union_by_name = true, all_varchar = true)"


def source_files(path: Path, what: str) -> tuple[list[Path], str]:
    """The files a Parquet/CSV file or folder stands for, and their kind ("parquet"/"csv")."""
    if not path.exists():
        raise EventLogError(f"{what}: no such file or folder: {path}")
    if path.is_dir():
        parquet = sorted(path.rglob("*.parquet"))
        csv = sorted(path.rglob("*.csv"))
        if parquet and csv:
            raise EventLogError(f"{what}: folder {path} mixes Parquet and CSV files; use one kind")
        if not parquet and not csv:
            raise EventLogError(f"{what}: folder {path} holds no .parquet or .csv files")
        files = parquet or csv
        kind = "parquet" if parquet else "csv"
    else:
        files = [path]
        suffix = path.suffix.lower()
        if suffix not in (".parquet", ".csv"):
            raise EventLogError(f"{what}: {path} is neither .parquet nor .csv")
        kind = suffix[1:]
    return files, kind


def user_partition_sql(partition: tuple[int, int], column: str = "user_id") -> str:
    """SQL keeping the users of ``partition`` = (part, n_parts): DuckDB's hash of the id as
    a string, modulo n_parts. The hash has no per-process seed, so every worker running the
    same DuckDB version assigns a user to the same part (the cluster checks the versions)."""
    part, n_parts = partition
    if not (isinstance(part, int) and isinstance(n_parts, int) and 0 <= part < n_parts):
        raise ValueError(f"partition: ({part!r}, {n_parts!r}) is not (part, n_parts) with 0 <= part < n_parts")
    return f"hash(CAST({column} AS VARCHAR)) % {n_parts} = {part}"


def sql_ts(value: datetime) -> str:
    """A time as a DuckDB timestamp literal (as given: the log's ts are naive UTC)."""
    return f"TIMESTAMP '{value.isoformat(sep=' ')}'"


def sql_quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def process_cores() -> int:
    """The cores this process may run on (the affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def connect_duckdb(threads: int | None = None, memory_limit: str | None = None) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect()
    # every naive timestamp in sendtime is UTC; DuckDB must agree when it casts
    con.execute("SET TimeZone = 'UTC'")
    if threads:
        con.execute(f"SET threads = {int(threads)}")
    if memory_limit:
        # DuckDB's default is 80 % of RAM; a cap makes large aggregations spill to disk
        # instead of crowding out the model and the feature arrays
        con.execute(f"SET memory_limit = {sql_quote(memory_limit)}")
    return con


def columns_of(con: duckdb.DuckDBPyConnection, relation: str) -> dict[str, str]:
    rows = con.execute(f"DESCRIBE SELECT * FROM {relation}").fetchall()
    return {name: str(dtype) for name, dtype, *_ in rows}


def _ts_expr(column: str, dtype: str, what: str) -> str:
    dtype = dtype.upper()
    if dtype == "TIMESTAMP WITH TIME ZONE":
        # the same instant as naive UTC; a plain cast goes through ICU's calendar and costs
        # ~7x more on every row of every query
        return f"make_timestamp(epoch_us({column}))"
    if dtype.startswith("TIMESTAMP") or dtype == "DATE":
        return f"CAST({column} AS TIMESTAMP)"
    if dtype == "VARCHAR":
        return f"CAST(TRY_CAST({column} AS TIMESTAMPTZ) AS TIMESTAMP)"
    raise EventLogError(
        f"{what}: column '{column}' has type {dtype}; expected a timestamp or an ISO 8601 string"
    )


def _raw_events(con: duckdb.DuckDBPyConnection) -> str:
    """Register ``raw_events`` with normalised columns and a ``_row`` locator."""
    cols = columns_of(con, "events_source")
    missing = [c for c in ("user_id", "ts", "event") if c not in cols]
    if missing:
        raise EventLogError(
            f"events: missing required column(s) {', '.join(map(repr, missing))}; "
            f"found {', '.join(map(repr, cols)) or 'none'}"
        )
    has_file = "filename" in cols
    locator = (
        "filename || ':' || CAST(row_number() OVER (PARTITION BY filename) AS VARCHAR)"
        if has_file
        else "CAST(row_number() OVER () AS VARCHAR)"
    )
    optional = []
    # extra columns are kept (the quarantine file carries them) and otherwise ignored
    extras = [c for c in cols if c not in ("user_id", "ts", "event", "filename", *_OPTIONAL_EVENT_COLUMNS)]
    for name in _OPTIONAL_EVENT_COLUMNS:
        cast = "DOUBLE" if name in _NUMERIC_EVENT_COLUMNS else "VARCHAR"
        if name in cols:
            optional.append(f"TRY_CAST({name} AS {cast}) AS {name}")
        else:
            optional.append(f"CAST(NULL AS {cast}) AS {name}")
    for name in _NUMERIC_EVENT_COLUMNS:
        if name in cols:
            bad = f"{name} IS NOT NULL AND TRY_CAST({name} AS DOUBLE) IS NULL"
            if name == "propensity":
                # a probability the policy chose the slot: 0 would divide every estimate
                bad = f"({bad}) OR NOT (TRY_CAST({name} AS DOUBLE) > 0 AND TRY_CAST({name} AS DOUBLE) <= 1)"
            optional.append(f"coalesce({bad}, false) AS _bad_{name}")
            # errors and the quarantine show the value as it was written, not the failed cast
            optional.append(f"CAST({name} AS VARCHAR) AS _{name}_text")
        else:
            optional.append(f"false AS _bad_{name}")
            optional.append(f"CAST(NULL AS VARCHAR) AS _{name}_text")
    optional.extend(f"{_ident(c)} AS {_ident('_extra_' + c)}" for c in extras)
    con.execute(
        f"""
        CREATE OR REPLACE TEMP VIEW raw_events_base AS
        SELECT CAST(user_id AS VARCHAR) AS user_id,
               CAST(ts AS VARCHAR) AS _ts_text,
               {_ts_expr('ts', cols['ts'], 'events')} AS ts,
               lower(trim(CAST(event AS VARCHAR))) AS event,
               CAST(event AS VARCHAR) AS _event_text,
               {', '.join(optional)}
        {', filename' if has_file else ''}
        FROM events_source
        """
    )
    con.execute("CREATE OR REPLACE TEMP VIEW raw_events AS SELECT * EXCLUDE (filename) FROM raw_events_base"
                if has_file else "CREATE OR REPLACE TEMP VIEW raw_events AS SELECT * FROM raw_events_base")
    # row numbers cost a window over the whole log: only the error path reads them
    con.execute(
        f"CREATE OR REPLACE TEMP VIEW raw_events_located AS "
        f"SELECT *, {locator} AS _row FROM raw_events_base"
    )
    return "raw_events"


_EVENT_CHECKS = {
    "user_id": ("user_id IS NULL OR trim(user_id) = ''", "have a missing or empty user id", "user_id"),
    "ts": ("ts IS NULL", "have a missing or unparseable timestamp", "_ts_text"),
    "event": (
        "event IS NULL OR event NOT IN ({kinds})",
        "have an unknown event name (allowed: {allowed})",
        "_event_text",
    ),
    "value": ("_bad_value", "have a value that is not a number", "_value_text"),
    "propensity": ("_bad_propensity", "have a propensity that is not a number in (0, 1]",
                   "_propensity_text"),
}


def _conditions() -> dict[str, str]:
    """Each checked column's SQL condition of a bad row."""
    kinds = ", ".join(sql_quote(k) for k in EVENT_KINDS)
    return {col: cond.format(kinds=kinds) for col, (cond, _, _) in _EVENT_CHECKS.items()}


def checks_digest(con: duckdb.DuckDBPyConnection) -> str:
    """What a file's clean check depends on beside the file: the checks, the SQL that reads
    and normalises each row for them (``raw_events_base``: time parsing, the propensity's
    range, names trimmed and lower-cased), and the log's union schema, which decides how
    each column is read."""
    (view,) = con.execute("SELECT sql FROM duckdb_views() WHERE view_name = 'raw_events_base'").fetchall()[0]
    return "\n".join([repr(sorted(_conditions().items())), view,
                      repr(sorted(columns_of(con, "events_source").items()))])


def _check_events(con: duckdb.DuckDBPyConnection, quarantine: Path | None, prevalidated: bool = False,
                  files: list[Path] | None = None, validated_dir: Path | None = None) -> int:
    conditions = _conditions()
    any_bad = " OR ".join(f"({c})" for c in conditions.values())
    if prevalidated:
        # the caller validated the whole log and raised or quarantined its bad rows: leave
        # them out here without a second scan to count and report them
        con.execute(f"CREATE OR REPLACE TEMP VIEW clean_events AS SELECT * FROM raw_events WHERE NOT ({any_bad})")
        return 0
    scope, known, todo = "raw_events", None, files
    if files and validated_dir is not None:
        # rows of a file found clean before (same identity, same checks) cannot be bad: count
        # only the others'; the error path below still reads every file, the clean ones add nothing
        known = ValidatedFiles(validated_dir, files, checks_digest(con))
        todo = known.unchecked()   # their identities as of now, before their rows are read
        log.debug("events: %d of %d file(s) to check (the rest checked before)", len(todo), len(files))
        if len(todo) < len(files):
            listing = ", ".join(sql_quote(str(f)) for f in todo)
            scope = f"raw_events_base WHERE filename IN ({listing})" if todo else None
    counts = con.execute(
        "SELECT " + ", ".join(f"count(*) FILTER (WHERE {c})" for c in conditions.values())
        + f" FROM {scope}"
    ).fetchall()[0] if scope else [0] * len(conditions)
    problems = []
    for (col, (_, text, shown)), n in zip(_EVENT_CHECKS.items(), counts):
        if not n:
            continue
        sample = con.execute(
            f"SELECT _row, {shown} FROM raw_events_located WHERE {conditions[col]} LIMIT {_SHOW_BAD_ROWS}"
        ).fetchall()
        rows = "; ".join(f"row {row}: {value!r}" for row, value in sample)
        problems.append(
            f"column '{col}': {n} row(s) {text.format(allowed=', '.join(EVENT_KINDS))}. "
            f"First bad rows: {rows}"
        )
    if not problems:
        con.execute("CREATE OR REPLACE TEMP VIEW clean_events AS SELECT * FROM raw_events")
        if known is not None:
            known.mark(todo)
        return 0
    n_bad = con.execute(f"SELECT count(*) FROM raw_events WHERE {any_bad}").fetchall()[0][0]
    if quarantine is None:
        raise EventLogError(
            "events: invalid rows.\n  " + "\n  ".join(problems)
            + "\nFix the input, or pass --quarantine FILE to move the bad rows aside."
        )
    quarantine.parent.mkdir(parents=True, exist_ok=True)
    reason = " || ".join(
        f"CASE WHEN {cond} THEN '{col};' ELSE '' END" for col, cond in conditions.items()
    )
    extras = [c for c in columns_of(con, "raw_events_located") if c.startswith("_extra_")]
    extra_sql = "".join(f", {_ident(c)} AS {_ident(c[len('_extra_'):])}" for c in extras)
    con.execute(
        f"COPY (SELECT user_id, _ts_text AS ts, _event_text AS event, message_id, channel,"
        f" _value_text AS value, _propensity_text AS propensity{extra_sql}, _row AS source_row,"
        f" {reason} AS bad_columns"
        f" FROM raw_events_located WHERE {any_bad})"
        f" TO {sql_quote(str(quarantine))} (FORMAT parquet)"
    )
    log.warning("events: %d invalid row(s) moved to %s:\n  %s", n_bad, quarantine, "\n  ".join(problems))
    con.execute(f"CREATE OR REPLACE TEMP VIEW clean_events AS SELECT * FROM raw_events WHERE NOT ({any_bad})")
    return int(n_bad)


def _load_users(con: duckdb.DuckDBPyConnection, default_tz: str,
                partition: tuple[int, int] | None = None) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Register the ``users`` view; returns (categorical, numeric) attribute columns."""
    if con.execute(
        "SELECT count(*) FROM duckdb_views() WHERE view_name = 'users_source'"
    ).fetchall()[0][0] == 0:
        con.execute(
            "CREATE OR REPLACE TEMP VIEW users_source AS SELECT CAST(NULL AS VARCHAR) AS user_id WHERE false"
        )
    cols = columns_of(con, "users_source")
    if "user_id" not in cols:
        raise EventLogError(f"users: missing required column 'user_id'; found {', '.join(map(repr, cols))}")
    missing_id = "user_id IS NULL OR trim(CAST(user_id AS VARCHAR)) = ''"
    n_missing = con.execute(f"SELECT count(*) FROM users_source WHERE {missing_id}").fetchall()[0][0]
    if n_missing:
        raise EventLogError(f"users: column 'user_id': {n_missing} row(s) have a missing or empty user id. "
                            f"First bad rows: {_users_rows(con, missing_id)}")
    dupes = con.execute(
        "SELECT CAST(user_id AS VARCHAR), count(*) FROM users_source GROUP BY 1 HAVING count(*) > 1 LIMIT 5"
    ).fetchall()
    if dupes:
        n = con.execute(
            "SELECT count(*) FROM (SELECT user_id FROM users_source GROUP BY 1 HAVING count(*) > 1)"
        ).fetchall()[0][0]
        raise EventLogError(
            f"users: column 'user_id': {n} id(s) appear more than once. First: "
            + ", ".join(f"{u!r} x{c}" for u, c in dupes)
        )
    zones = {}
    if "timezone" in cols:
        for (zone,) in con.execute("SELECT DISTINCT CAST(timezone AS VARCHAR) FROM users_source").fetchall():
            zones[zone] = _valid_zone(zone)
        bad = [z for z, ok in zones.items() if z is not None and not ok]
        if bad:
            n_bad = con.execute(
                "SELECT count(*) FROM users_source WHERE CAST(timezone AS VARCHAR) IN (SELECT unnest(?))",
                [bad],
            ).fetchall()[0][0]
            log.warning(
                "users: column 'timezone': %d row(s) have an unknown time zone (first: %s); "
                "using the default %s for them", n_bad, ", ".join(map(repr, bad[:5])), default_tz,
            )
        valid = [z for z, ok in zones.items() if ok]
        tz_expr = (
            f"CASE WHEN CAST(timezone AS VARCHAR) IN (SELECT unnest(?)) THEN CAST(timezone AS VARCHAR)"
            f" ELSE {sql_quote(default_tz)} END"
        )
        params = [valid]
    else:
        tz_expr, params = sql_quote(default_tz), []
    signup = (
        _ts_expr("signup_ts", cols["signup_ts"], "users") if "signup_ts" in cols else "CAST(NULL AS TIMESTAMP)"
    )
    if "signup_ts" in cols:
        # a missing signup time is allowed; one that is written but unreadable is an error
        unreadable = f"signup_ts IS NOT NULL AND trim(CAST(signup_ts AS VARCHAR)) <> '' AND ({signup}) IS NULL"
        n_bad = con.execute(f"SELECT count(*) FROM users_source WHERE {unreadable}").fetchall()[0][0]
        if n_bad:
            raise EventLogError(
                f"users: column 'signup_ts': {n_bad} row(s) have an unparseable timestamp. "
                f"First bad rows: {_users_rows(con, unreadable, 'signup_ts')}"
            )
    attrs = [c for c in cols if c not in _RESERVED_USER_COLUMNS and c != "filename"]
    numeric = tuple(a for a in attrs if _is_numeric(cols[a]))
    categorical = tuple(a for a in attrs if a not in numeric)
    attr_sql = "".join(
        f", CAST({_ident(a)} AS {'DOUBLE' if a in numeric else 'VARCHAR'}) AS {_ident(a)}" for a in attrs
    )
    con.execute(
        f"""CREATE OR REPLACE TEMP TABLE users AS
        SELECT CAST(user_id AS VARCHAR) AS user_id, {tz_expr} AS timezone, {signup} AS signup_ts{attr_sql}
        FROM users_source{' WHERE ' + user_partition_sql(partition) if partition else ''}""",
        params,
    )
    return categorical, numeric


def _users_rows(con: duckdb.DuckDBPyConnection, condition: str, column: str = "user_id") -> str:
    """The first rows of the users table matching ``condition``, numbered from 1."""
    rows = con.execute(
        f"SELECT _row, _shown FROM (SELECT row_number() OVER () AS _row, CAST({_ident(column)} AS VARCHAR)"
        f" AS _shown, * FROM users_source) WHERE {condition} ORDER BY _row LIMIT {_SHOW_BAD_ROWS}"
    ).fetchall()
    return "; ".join(f"row {r}: {v!r}" for r, v in rows)


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _is_numeric(dtype: str) -> bool:
    return dtype.upper() in {
        "TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT", "UTINYINT", "USMALLINT",
        "UINTEGER", "UBIGINT", "FLOAT", "DOUBLE", "REAL",
    } or dtype.upper().startswith("DECIMAL")


def _valid_zone(zone: str | None) -> bool:
    if not zone:
        return False
    try:
        ZoneInfo(zone)
        return True
    except (ZoneInfoNotFoundError, ValueError):
        return False


def _offset_changes(zone: str, start: datetime, end: datetime) -> tuple[int, list[tuple[int, int]]]:
    """A zone's UTC offset (seconds) at ``start`` and its changes up to ``end``: (µs, offset)."""
    tz = ZoneInfo(zone)
    offset = lambda t: int(t.astimezone(tz).utcoffset().total_seconds())  # noqa: E731
    step = timedelta(hours=6)        # offsets hold for months: a 6-hourly look finds every change
    changes, t, current = [], start, offset(start)
    while t < end:
        nxt = t + step
        if offset(nxt) != current:
            lo, hi = t, nxt
            while hi - lo > timedelta(seconds=1):
                mid = lo + (hi - lo) / 2
                lo, hi = (mid, hi) if offset(mid) == current else (lo, mid)
            current = offset(hi)
            changes.append((int(hi.timestamp() * 1_000_000), current))
        t = nxt
    return offset(start), changes


def _utc_offset_sql(con: duckdb.DuckDBPyConnection, default_tz: str) -> str:
    """Each row's UTC offset in seconds from its ``timezone`` and ``ts``, as plain integer
    SQL: the zones' offset changes over the log's time span, looked up once in Python.
    Per row this is a few comparisons instead of ICU's calendar (~3x faster)."""
    lo, hi = con.execute("SELECT min(ts), max(ts) FROM clean_events").fetchall()[0]
    zones = sorted({z for (z,) in con.execute("SELECT DISTINCT timezone FROM users").fetchall() if z} | {default_tz})
    if lo is None or lo < datetime(1970, 1, 2):
        # before 1970 integer division truncates the wrong way: let ICU do it
        return "epoch(timezone(timezone, CAST(ts AS TIMESTAMPTZ))::TIMESTAMP) - epoch(ts)"
    start = lo.replace(tzinfo=timezone.utc) - timedelta(days=1)
    end = hi.replace(tzinfo=timezone.utc) + timedelta(days=1)
    cases = []
    for zone in zones:
        first, changes = _offset_changes(zone, start, end)
        expr = ("CASE " + " ".join(f"WHEN epoch_us(ts) >= {us} THEN {off}" for us, off in reversed(changes))
                + f" ELSE {first} END") if changes else str(first)
        cases.append(f"WHEN {sql_quote(zone)} THEN {expr}")
    return "CASE timezone " + " ".join(cases) + " END"


def _mod(x: str, d: int) -> str:
    """SQL for x mod d in [0, d): DuckDB's % keeps the sign of x (a time before 1970 would get
    a negative hour)."""
    return f"((({x}) % {d} + {d}) % {d})"


def _floor_div(x: str, d: int) -> str:
    """SQL for floor(x / d) on integers (DuckDB's // truncates toward zero)."""
    return f"((({x}) - {_mod(x, d)}) // {d})"


def _finish(con: duckdb.DuckDBPyConnection, default_tz: str, materialize_max_rows: int,
            partition: tuple[int, int] | None = None) -> None:
    # a partition's views hold only its users' rows, so every query (features, labels,
    # universe) aggregates over them alone
    keep = f" WHERE {user_partition_sql(partition)}" if partition else ""
    con.execute(
        f"""CREATE OR REPLACE TEMP VIEW events AS
        SELECT user_id, ts, event, message_id, channel, value, propensity FROM clean_events{keep}"""
    )
    con.execute(
        f"""CREATE OR REPLACE TEMP VIEW events_local_view AS
        WITH e AS (
            SELECT e.*, coalesce(u.timezone, {sql_quote(default_tz)}) AS timezone
            FROM events e LEFT JOIN users u USING (user_id)
        ),
        o AS (SELECT *, CAST({_utc_offset_sql(con, default_tz)} AS BIGINT) AS _offset FROM e),
        s AS (SELECT *, {_floor_div("epoch_us(ts)", 1_000_000)} + _offset AS _local_s FROM o)
        SELECT * EXCLUDE (_local_s, _offset), make_timestamp(epoch_us(ts) + _offset * 1000000) AS local_ts,
               CAST({_mod("_local_s", 86400)} // 3600 AS BIGINT) AS local_hour,
               CAST({_mod(_floor_div("_local_s", 86400) + " + 3", 7)} AS BIGINT) AS local_dow
        FROM s"""
    )
    n_rows = con.execute("SELECT count(*) FROM events").fetchall()[0][0]
    if n_rows <= materialize_max_rows:
        # a log that fits in memory is read and converted to local time once, not per query
        con.execute("CREATE OR REPLACE TEMP TABLE events_local_table AS SELECT * FROM events_local_view")
        con.execute("CREATE OR REPLACE TEMP VIEW events_local AS SELECT * FROM events_local_table")
        con.execute("""CREATE OR REPLACE TEMP VIEW events AS
            SELECT user_id, ts, event, message_id, channel, value, propensity
            FROM events_local_table""")
    else:
        con.execute("CREATE OR REPLACE TEMP VIEW events_local AS SELECT * FROM events_local_view")


def open_log(
    events: str | Path,
    users: str | Path | None = None,
    *,
    default_timezone: str = "UTC",
    quarantine: str | Path | None = None,
    threads: int | None = None,
    materialize_max_rows: int = 40_000_000,
    memory_limit: str | None = None,
    partition: tuple[int, int] | None = None,
    prevalidated: bool = False,
    validated_dir: str | Path | None = None,
) -> EventLog:
    """Open and validate the events (and users) files or folders.

    Invalid rows raise :class:`EventLogError`, or go to ``quarantine`` (a Parquet file)
    when one is given; they are never dropped silently.

    ``partition`` = (part, n_parts) keeps the users of one part (:func:`user_partition_sql`)
    in the ``events``, ``events_local`` and ``users`` views: a cluster worker opens its part
    of a log on a shared file system. ``prevalidated``: the caller has validated this log
    (and raised or quarantined its invalid rows); they are left out without a report.
    ``validated_dir``: where markers of event files found clean are kept
    (:mod:`features.validated`); those files are not checked again while unchanged.
    """
    con = connect_duckdb(threads, memory_limit)
    if partition is not None:
        # a worker has no terminal: its progress bars would interleave in the client's output
        con.execute("SET enable_progress_bar = false")
    # one listing of the folder for the view and the validation cache: a file arriving in
    # between must be in both or in neither
    files, kind = source_files(Path(events), "events")
    con.execute(f"CREATE OR REPLACE TEMP VIEW events_source AS SELECT * FROM {files_sql(files, kind)}")
    if users is not None:
        con.execute(
            f"CREATE OR REPLACE TEMP VIEW users_source AS SELECT * FROM {source_sql(Path(users), 'users')}"
        )
    return _assemble(con, default_timezone, Path(quarantine) if quarantine else None,
                     {"events": str(events), "users": str(users) if users else ""}, materialize_max_rows,
                     partition, prevalidated, files, Path(validated_dir) if validated_dir is not None else None)


def from_frames(
    events: pd.DataFrame,
    users: pd.DataFrame | None = None,
    *,
    default_timezone: str = "UTC",
    quarantine: str | Path | None = None,
    threads: int | None = None,
) -> EventLog:
    """The same as :func:`open_log` for in-memory frames (tests, Dask partitions)."""
    con = connect_duckdb(threads)
    con.register("events_frame", events)
    con.execute("CREATE OR REPLACE TEMP VIEW events_source AS SELECT * FROM events_frame")
    if users is not None:
        con.register("users_frame", users)
        con.execute("CREATE OR REPLACE TEMP VIEW users_source AS SELECT * FROM users_frame")
    return _assemble(con, default_timezone, Path(quarantine) if quarantine else None, {}, 40_000_000)


def _assemble(
    con: duckdb.DuckDBPyConnection, default_tz: str, quarantine: Path | None, sources: dict[str, str],
    materialize_max_rows: int, partition: tuple[int, int] | None = None, prevalidated: bool = False,
    files: list[Path] | None = None, validated_dir: Path | None = None,
) -> EventLog:
    if partition is not None:
        user_partition_sql(partition)   # a bad partition fails before any scan
    _raw_events(con)
    n_bad = _check_events(con, quarantine, prevalidated, files, validated_dir)
    categorical, numeric = _load_users(con, default_tz, partition)
    _finish(con, default_tz, materialize_max_rows, partition)
    return EventLog(
        con=con,
        default_timezone=default_tz,
        attribute_columns=categorical,
        numeric_attributes=numeric,
        quarantined_rows=n_bad,
        sources=sources,
        partition=partition,
    )


def utc_now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)
