"""Turn a user's own table into the contract's event log through a column mapping.

The mapping says which columns hold the user, the time and the event (or a constant event
name where the table has none), and optionally a value expression, a message id, rows to
keep, and a grouping key that collapses line items (one purchase per invoice). The output
goes through the same validation as every log: bad rows fail loudly or go to quarantine.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import duckdb

from configs import write_atomic
from features.events import EventLogError, columns_of, connect_duckdb, open_log, source_sql, sql_quote

__all__ = ["ColumnMapping", "import_table", "ImportSummary"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ColumnMapping:
    user: str
    time: str
    event: str | None = None          # column with event names
    event_name: str | None = None     # or one constant name for every row
    value: str | None = None          # column or SQL expression, e.g. "Quantity * UnitPrice"
    message_id: str | None = None
    channel: str | None = None
    where: str | None = None          # SQL condition for rows to keep, e.g. "Quantity > 0"
    group_by: str | None = None       # collapse rows sharing (user, this) into one event
    source_timezone: str | None = None  # naive times in the source are in this zone

    def check(self, columns: dict[str, str]) -> None:
        if (self.event is None) == (self.event_name is None):
            raise EventLogError("mapping: give exactly one of an event column (--event) or a constant --event-name")
        for field, col in (("user", self.user), ("time", self.time), ("event", self.event),
                           ("message_id", self.message_id), ("channel", self.channel),
                           ("group_by", self.group_by)):
            if col is not None and col not in columns:
                raise EventLogError(
                    f"mapping: {field} column {col!r} is not in the source; its columns are "
                    + ", ".join(map(repr, columns)))


@dataclass
class ImportSummary:
    out: Path
    n_source_rows: int
    n_kept_by_filter: int
    n_events: int
    n_quarantined: int


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _user_expr(column: str, dtype: str) -> str:
    c = _ident(column)
    if dtype.upper() in ("DOUBLE", "FLOAT", "REAL"):
        # ids stored as floats (17850.0) read as the integers they are
        return f"CASE WHEN {c} = floor({c}) THEN CAST(CAST({c} AS BIGINT) AS VARCHAR) ELSE CAST({c} AS VARCHAR) END"
    return f"CAST({c} AS VARCHAR)"


def _time_expr(column: str, dtype: str, zone: str | None) -> str:
    c = _ident(column)
    if dtype.upper() == "TIMESTAMP WITH TIME ZONE":
        return f"CAST({c} AS TIMESTAMPTZ)"
    if dtype.upper().startswith(("TIMESTAMP", "DATE")):
        naive = f"CAST({c} AS TIMESTAMP)"
        return f"timezone({sql_quote(zone)}, {naive})" if zone else f"CAST({naive} AS TIMESTAMPTZ)"
    # text: an explicit offset ("...+08:00", "...Z") wins; naive text is in the source's
    # zone, or UTC (casting to TIMESTAMP would drop the offset silently)
    text = f"trim(CAST({c} AS VARCHAR))"
    naive = f"TRY_CAST({text} AS TIMESTAMP)"
    naive = f"timezone({sql_quote(zone)}, {naive})" if zone else f"CAST({naive} AS TIMESTAMPTZ)"
    offset = "[0-9]:[0-9]{2}(:[0-9]{2}([.][0-9]+)?)? *(Z|z|[+-][0-9]{2}(:?[0-9]{2})?)$"
    return (f"CASE WHEN regexp_matches({text}, '{offset}')"
            f" THEN TRY_CAST({text} AS TIMESTAMPTZ) ELSE {naive} END")


def import_table(source: str | Path, mapping: ColumnMapping, out: str | Path,
                 quarantine: str | Path | None = None, default_timezone: str = "UTC") -> ImportSummary:
    """Write ``out`` (Parquet) as a contract event log; validate it like any input."""
    out = Path(out)
    con = connect_duckdb()
    con.execute(f"CREATE TEMP VIEW src AS SELECT * FROM {source_sql(Path(source), 'source')}")
    cols = columns_of(con, "src")
    mapping.check(cols)
    n_source = con.execute("SELECT count(*) FROM src").fetchall()[0][0]
    # brackets keep a condition with OR from leaking into the checks ANDed after it
    where = f"WHERE ({mapping.where})" if mapping.where else ""
    try:
        n_kept = con.execute(f"SELECT count(*) FROM src {where}").fetchall()[0][0]
    except duckdb.Error as exc:
        raise EventLogError(f"mapping: --where {mapping.where!r} is not a valid condition: {exc}") from exc
    user = _user_expr(mapping.user, cols[mapping.user])
    ts = _time_expr(mapping.time, cols[mapping.time], mapping.source_timezone)
    event = sql_quote(mapping.event_name) if mapping.event_name else f"CAST({_ident(mapping.event)} AS VARCHAR)"
    value = f"TRY_CAST(({mapping.value}) AS DOUBLE)" if mapping.value else "CAST(NULL AS DOUBLE)"
    msg = f"CAST({_ident(mapping.message_id)} AS VARCHAR)" if mapping.message_id else "CAST(NULL AS VARCHAR)"
    channel = f"CAST({_ident(mapping.channel)} AS VARCHAR)" if mapping.channel else "CAST(NULL AS VARCHAR)"
    try:
        bad_rows, n_quarantined = _check_source(con, mapping, user, ts, value, where, quarantine)
    except duckdb.Error as exc:
        # a --value expression naming a column that is not there, or of a type it cannot use
        raise EventLogError(f"mapping: the source cannot be read with this mapping "
                            f"(--value {mapping.value!r}?): {str(exc).splitlines()[0]}") from exc
    keep = f"({where[6:]}) AND NOT ({bad_rows})" if where else f"WHERE NOT ({bad_rows})"
    where = keep if keep.startswith("WHERE") else f"WHERE {keep}"
    rows = f"SELECT {user} AS user_id, {ts} AS ts, {event} AS event, {msg} AS message_id, {channel} AS channel, {value} AS value"
    if mapping.group_by:
        g = _ident(mapping.group_by)
        query = f"""SELECT user_id, min(ts) AS ts, any_value(event) AS event, any_value(message_id) AS message_id,
                           any_value(channel) AS channel, sum(value) AS value
                    FROM ({rows}, CAST({g} AS VARCHAR) AS _group FROM src {where})
                    GROUP BY user_id, _group, event"""
    else:
        query = f"{rows} FROM src {where}"
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.staging-{os.getpid()}.parquet")
    try:
        con.execute(f"COPY ({query} ORDER BY user_id, ts) TO {sql_quote(str(staging))} (FORMAT parquet)")
    except duckdb.Error as exc:
        raise EventLogError(f"mapping: could not build events from the source: {exc}") from exc
    try:
        # source rows were checked above; anything left failing here is a mapping bug: fail loudly
        checked = open_log(staging, default_timezone=default_timezone)
        n_events = checked.con.execute("SELECT count(*) FROM events").fetchall()[0][0]
        write_atomic(out, lambda tmp: checked.con.execute(
            f"COPY (SELECT * FROM events ORDER BY user_id, ts) TO {sql_quote(str(tmp))} (FORMAT parquet)"))
        checked.close()
    finally:
        staging.unlink(missing_ok=True)
    return ImportSummary(out=out, n_source_rows=int(n_source), n_kept_by_filter=int(n_kept),
                         n_events=int(n_events), n_quarantined=n_quarantined)



def _check_source(con: duckdb.DuckDBPyConnection, mapping: ColumnMapping, user: str, ts: str,
                  value: str, where: str, quarantine: str | Path | None) -> tuple[str, int]:
    """Check the mapped columns in the source, so errors name the user's own columns and rows;
    returns the SQL condition of bad source rows (quarantined when asked, else an error)."""
    from features.events import EVENT_KINDS

    kinds = ", ".join(sql_quote(k) for k in EVENT_KINDS)
    # label -> (what the error shows, the condition of a bad row)
    checks = {
        f"source column {mapping.user!r}": (_ident(mapping.user), f"({user}) IS NULL OR trim({user}) = ''"),
        f"source column {mapping.time!r}": (_ident(mapping.time), f"({ts}) IS NULL"),
    }
    if mapping.event:
        e = _ident(mapping.event)
        checks[f"source column {mapping.event!r}"] = (
            e, f"lower(trim(CAST({e} AS VARCHAR))) NOT IN ({kinds}) OR {e} IS NULL")
    if mapping.value:
        # a value that is there but is not a number would otherwise become an empty value
        checks[f"value {mapping.value!r}"] = (
            f"CAST(({mapping.value}) AS VARCHAR)", f"({mapping.value}) IS NOT NULL AND ({value}) IS NULL")
    con.execute("CREATE OR REPLACE TEMP VIEW src_located AS SELECT *, row_number() OVER () AS _source_row FROM src")
    scope = where or "WHERE true"
    problems, any_bad = [], " OR ".join(f"({c})" for _, c in checks.values())
    for label, (shown, cond) in checks.items():
        n = con.execute(f"SELECT count(*) FROM src_located {scope} AND ({cond})").fetchall()[0][0]
        if n:
            sample = con.execute(
                f"SELECT _source_row, {shown} FROM src_located {scope} AND ({cond}) LIMIT 5").fetchall()
            problems.append(f"{label}: {n} row(s) missing or invalid. First bad rows: "
                            + "; ".join(f"row {r}: {v!r}" for r, v in sample))
    if not problems:
        return "false", 0
    if quarantine is None:
        raise EventLogError("import: invalid rows.\n  " + "\n  ".join(problems)
                            + "\nFix the source, or pass --quarantine FILE to move the bad rows aside.")
    Path(quarantine).parent.mkdir(parents=True, exist_ok=True)
    con.execute(f"COPY (SELECT * FROM src_located {scope} AND ({any_bad})) TO {sql_quote(str(quarantine))} (FORMAT parquet)")
    n_bad = con.execute(f"SELECT count(*) FROM src_located {scope} AND ({any_bad})").fetchall()[0][0]
    log.warning("import: %d source row(s) moved to %s:\n  %s", n_bad, quarantine, "\n  ".join(problems))
    return any_bad, int(n_bad)
