"""PostgreSQL as a tag store (issue 11, item 4), against a real server the test starts
itself (pgserver ships PostgreSQL): a refresh published there answers ``tags`` and ``plan``
as the DuckDB store does; a publish swaps all tables at once, or nothing when it fails or
is a backfill; and a query can neither write nor read a server file, even when the URL's
user is a superuser."""

from __future__ import annotations

import json
import math
import threading
import uuid
from datetime import timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from serving.pg_tagstore import (
    READER_ROLE,
    TagStoreError,
    publish_to_postgres,
    query_tags_pg,
    redact_url,
    served_refresh_id,
)
from serving.plan import PLAN_COLUMNS, plan_campaign, read_audience
from serving.refresh import TAG_SCHEMA
from serving.tagstore import Publication, RefreshPaths, TagQueryError, current_refresh, query_tags

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pg_server(tmp_path_factory):
    """One PostgreSQL server for the module (about 1.5 s to start)."""
    import pgserver

    server = pgserver.get_server(tmp_path_factory.mktemp("pg") / "data", cleanup_mode="stop")
    yield server
    server.cleanup()


@pytest.fixture
def pg_url(pg_server):
    """A database of the test's own on the module's server (the URL's user is a superuser)."""
    name = f"t_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(pg_server.get_uri(), autocommit=True) as con:
        con.execute(f"CREATE DATABASE {name}")
    return pg_server.get_uri(database=name)


def _refresh(root: Path, refresh_id: str, n: int, *, user_ids: list[str] | None = None,
             as_of: str = "2026-01-01T00:00:00+00:00") -> RefreshPaths:
    """A refresh folder with the files a publish reads, without scoring anyone; every row
    carries the refresh id (open_model_version), so a reader can tell refreshes apart."""
    paths = RefreshPaths(root / refresh_id)
    paths.root.mkdir(parents=True)
    rng = np.random.default_rng(n)
    ids = user_ids or [f"u{i:06d}" for i in range(n)]
    n = len(ids)
    probs = rng.random((n, 24), dtype=np.float32) * 0.3
    tags = pd.DataFrame({
        "user_id": ids, "slot_open_probs": list(probs), "best_slot": probs.argmax(axis=1),
        "best_slot_open_prob": probs.max(axis=1).astype(float), "churn_prob": rng.random(n),
        "churn_tier": np.array(["low", "medium", "high"])[np.arange(n) % 3],
        "churn_reasons": [["recency up", 'a "quoted", reason'] if i % 5 == 0 else None for i in range(n)],
        "open_model_version": refresh_id, "churn_model_version": "1",
        "scored_at": pd.Timestamp("2026-01-01T01:02:03", tz="UTC"),
        "cold_start": np.arange(n) % 7 == 0, "unsubscribed": np.arange(n) % 11 == 0,
    })
    pq.write_table(pa.Table.from_pandas(tags, schema=TAG_SCHEMA, preserve_index=False), paths.tags)
    pd.DataFrame({"user_id": ids, "timezone": np.array(["Asia/Shanghai", "Europe/Berlin"])[np.arange(n) % 2],
                  "recency": 1.0}).to_parquet(paths.features, index=False)
    pd.DataFrame({"level": ["global"], "key": ["*"], "n_users": [n], "slot_open_probs": [[0.1] * 24],
                  "churn_prob": [0.2]}).to_parquet(paths.priors, index=False)
    paths.manifest.write_text(json.dumps({"refresh_id": refresh_id, "as_of": as_of}))
    return paths


def _served(url: str) -> tuple[str | None, int]:
    frame = query_tags_pg(url, "SELECT count(*) AS n FROM tags")
    return served_refresh_id(url), int(frame["n"].iloc[0])


def _leftovers(url: str) -> list[str]:
    with psycopg.connect(url) as con:
        return [r[0] for r in con.execute("SELECT tablename FROM pg_tables WHERE tablename ~ '__(new|old)_'")]


def _cell(value):
    """One cell of either store's frame as a plain comparable value (lists of float32
    compared as float32, missing as None)."""
    if isinstance(value, (list, tuple, np.ndarray)):
        return tuple(float(np.float32(v)) if isinstance(v, (float, np.floating)) else v for v in value)
    if value is None or value is pd.NA or value is pd.NaT or (isinstance(value, float) and np.isnan(value)):
        return None
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer, int)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        return float(value)
    if isinstance(value, pd.Timestamp) or hasattr(value, "tzinfo"):
        return pd.Timestamp(value).tz_convert("UTC")
    return value


def _rows(frame: pd.DataFrame) -> list[tuple]:
    return [tuple(_cell(v) for v in row) for row in frame.itertuples(index=False)]


# ---------------------------------------------------------------- the same answers as DuckDB

def test_a_published_refresh_answers_tags_queries_like_the_duckdb_store(trained, pg_url):
    serving_dir = trained["cfg"].serving.serving_dir
    current = current_refresh(serving_dir)
    done = publish_to_postgres(pg_url, current)
    assert done.published and done.n_tags == len(pd.read_parquet(current.tags)) > 1000
    assert current.refresh_id in done.describe()
    for sql in (
        "SELECT * FROM tags",
        "SELECT churn_tier, count(*) AS users, avg(churn_prob) AS mean_churn_prob FROM tags GROUP BY 1 ORDER BY 1",
        "SELECT user_id, best_slot, slot_open_probs FROM tags WHERE churn_tier = 'high' AND NOT unsubscribed",
        "SELECT best_slot, count(*) AS n FROM tags GROUP BY best_slot ORDER BY best_slot",
        "SELECT level, key, n_users, churn_prob, slot_open_probs FROM priors",
        "SELECT key, value FROM manifest",
    ):
        duck = query_tags(serving_dir, sql)
        pg = query_tags(serving_dir, sql, tag_store_url=pg_url)
        assert list(pg.columns) == list(duck.columns), sql
        assert len(pg) == len(duck) > 0, sql
        key = [c for c in duck.columns[:2] if c != "slot_open_probs"]
        got, want = (_rows(f.sort_values(key, na_position="first", kind="stable")) for f in (pg, duck))
        for g, w in zip(got, want):   # sums may add up in another order: the last bits of a mean may differ
            assert all(math.isclose(a, b, rel_tol=1e-12) if isinstance(a, float) and isinstance(b, float) else a == b
                       for a, b in zip(g, w)), (sql, g, w)
    # the command line reads the configured store, and --serving-dir still names a DuckDB one
    app = _app()
    args = ["--config", str(trained["config_path"]), "tags", "SELECT count(*) AS n FROM tags"]
    via_pg = CliRunner().invoke(app, [*args, "--tag-store", pg_url])
    via_duck = CliRunner().invoke(app, args)
    assert via_pg.exit_code == 0 == via_duck.exit_code, via_pg.output
    assert via_pg.stdout == via_duck.stdout and str(done.n_tags) in via_pg.stdout


def _app():
    from sendtime.cli import app

    return app


def test_plan_through_postgres_gives_the_plan_duckdb_gives(trained, pg_url, tmp_path):
    cfg = trained["cfg"]
    serving_dir = cfg.serving.serving_dir
    publish_to_postgres(pg_url, current_refresh(serving_dir))
    start = pd.Timestamp(trained["log"].max_ts()).to_pydatetime() + timedelta(hours=1)
    options = {"audience": "churn_tier <> 'low' OR best_slot >= 12", "capacity_per_hour": 25, "explore": 0.1, "seed": 3}
    duck = plan_campaign(cfg, start, serving_dir=serving_dir, **options)
    pg = plan_campaign(cfg, start, tag_store_url=pg_url, **options)
    assert len(pg.rows) == len(duck.rows) > 100 and pg.summary["planned"] > 0
    pd.testing.assert_frame_equal(pg.rows, duck.rows)
    pd.testing.assert_frame_equal(pg.by_hour, duck.by_hour)
    # a list of ids: known ones in the tags' order, unknown ones last with no prediction
    some = sorted(pd.read_parquet(current_refresh(serving_dir).tags, columns=["user_id"])["user_id"])[::97]
    listed = ["nobody", *some, "nobody", "no-one"]
    for where in (None, "best_slot >= 12"):
        a = read_audience(serving_dir, where=where, user_ids=listed, n_slots=cfg.slots.n_slots)
        b = read_audience(serving_dir, where=where, user_ids=listed, n_slots=cfg.slots.n_slots, tag_store_url=pg_url)
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)
    # the command line: --tag-store through the same plan
    out = tmp_path / "plan.parquet"
    res = CliRunner().invoke(_app(), [
        "--config", str(trained["config_path"]), "plan", "--window-start", start.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "--out", str(out), "--tag-store", pg_url, "--audience", options["audience"], "--capacity-per-hour", "25",
        "--explore", "0.1", "--seed", "3", "--no-mlflow"])
    assert res.exit_code == 0, res.output
    duck.rows[PLAN_COLUMNS].to_parquet(tmp_path / "duck.parquet", index=False)
    pd.testing.assert_frame_equal(pd.read_parquet(out)[PLAN_COLUMNS], pd.read_parquet(tmp_path / "duck.parquet"))
    bad = read_audience_error(pg_url, "no_such_column > 1")
    assert "--audience" in bad and "no_such_column" in bad and "\n" not in bad


def read_audience_error(url: str, where: str) -> str:
    from serving.plan import PlanError

    with pytest.raises(PlanError) as caught:
        read_audience(Path("/nonexistent"), where=where, tag_store_url=url)
    return str(caught.value)


# ---------------------------------------------------------------- all tables at once, or nothing

def test_readers_see_one_complete_refresh_at_a_time_during_publishes(pg_url, tmp_path):
    sizes = {f"r{k}": 3000 + 1500 * k for k in range(6)}
    publish_to_postgres(pg_url, _refresh(tmp_path, "r0", sizes["r0"]))
    seen: list[tuple] = []
    errors: list[BaseException] = []
    stop = threading.Event()
    probe = """SELECT (SELECT count(*) FROM tags) AS n, (SELECT min(open_model_version) FROM tags) AS lo,
                      (SELECT max(open_model_version) FROM tags) AS hi,
                      (SELECT value::json->>'refresh_id' FROM manifest) AS manifest,
                      (SELECT count(*) FROM user_timezones) AS zones, (SELECT max(n_users) FROM priors) AS priors"""

    def read() -> None:
        while not stop.is_set():
            try:
                seen.append(tuple(query_tags_pg(pg_url, probe).iloc[0]))
            except BaseException as exc:   # noqa: BLE001 - any failure of a reader fails the test
                errors.append(exc)
                return

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for refresh_id in list(sizes)[1:]:
            publish_to_postgres(pg_url, _refresh(tmp_path, refresh_id, sizes[refresh_id]))
    finally:
        stop.set()
        reader.join()
    assert not errors, errors[0]
    assert len(seen) > 10
    print(f"\n{len(seen)} reads during 5 publishes saw refreshes {sorted({row[3] for row in seen})}")
    for n, lo, hi, manifest, zones, priors in seen:
        assert lo == hi == manifest and n == zones == priors == sizes[manifest], (n, lo, hi, manifest, zones, priors)
    assert len({row[3] for row in seen}) >= 2          # the reader saw swaps happen
    assert _served(pg_url) == ("r5", sizes["r5"]) and _leftovers(pg_url) == []


def test_a_failed_publish_leaves_the_served_tables_and_a_backfill_is_not_published(pg_url, tmp_path):
    publish_to_postgres(pg_url, _refresh(tmp_path, "good", 2000))
    assert _served(pg_url) == ("good", 2000)
    duplicated = _refresh(tmp_path, "duplicated", 0, user_ids=["a", "b", "a"])
    bad_text = _refresh(tmp_path, "nul", 0, user_ids=[f"u{i}" for i in range(5000)] + ["bad\x00id"])
    truncated = _refresh(tmp_path, "truncated", 500)
    truncated.tags.write_bytes(truncated.tags.read_bytes()[:2000])
    for bad, why in ((duplicated, r"Key \(user_id\)=\(a\) is duplicated"), (bad_text, "0x00"), (truncated, "cannot be read")):
        with pytest.raises(TagStoreError, match=why) as caught:
            publish_to_postgres(pg_url, bad)
        assert "\n" not in str(caught.value)
        assert _served(pg_url) == ("good", 2000), bad.refresh_id
    assert _leftovers(pg_url) == []
    # a backfill the serving folder kept out of service stays out of PostgreSQL too
    older = _refresh(tmp_path, "older", 100, as_of="2025-06-01T00:00:00+00:00")
    kept_out = Publication(paths=older, became_current=False, current=older, as_of="2025-06-01T00:00:00+00:00",
                           current_as_of="2026-01-01T00:00:00+00:00")
    done = publish_to_postgres(pg_url, older, kept_out)
    assert not done.published and "backfill" in done.reason
    assert _served(pg_url) == ("good", 2000)
    made_current = Publication(paths=older, became_current=True, current=older, as_of="2025-06-01T00:00:00+00:00",
                               current_as_of="2026-01-01T00:00:00+00:00")
    assert publish_to_postgres(pg_url, older, made_current).published
    assert _served(pg_url) == ("older", 100)


# ---------------------------------------------------------------- read only, no server files

def test_tags_on_postgres_cannot_write_nor_touch_server_files_even_as_superuser(pg_url, tmp_path):
    publish_to_postgres(pg_url, _refresh(tmp_path, "r1", 300))
    with psycopg.connect(pg_url) as con:   # the URL's own user could: the guard is not the user's rights
        assert con.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()[0]
    leak = tmp_path / "leak.csv"
    refused = {
        "DROP TABLE tags": "only a query",
        "INSERT INTO tags (user_id) VALUES ('x')": "only a query",
        "INSERT INTO tags (user_id) VALUES ('x') RETURNING user_id": "read-only transaction",
        "DELETE FROM tags RETURNING user_id": "read-only transaction",
        "WITH gone AS (DELETE FROM tags RETURNING user_id) SELECT count(*) FROM gone": "read-only transaction",
        "CREATE TABLE copied AS SELECT * FROM tags": "only a query",
        "SELECT pg_read_file('/etc/passwd')": "permission denied",
        "SELECT * FROM pg_ls_dir('/')": "permission denied",
        "SELECT lo_import('/etc/passwd')": "permission denied",
        f"COPY tags TO '{leak}'": "only a query",
        "COPY (SELECT 1) TO PROGRAM 'touch /tmp/sendtime-pwned'": "only a query",
        "SELECT 1; DROP TABLE tags": "multiple commands",
        # a superuser session could lift SET ROLE inside one statement; the runner forbids it
        "SELECT set_config('role', 'postgres', false), pg_read_file('/etc/passwd')": "permission denied",
        "SELECT set_config('role', 'postgres', true)": "security-definer",
        "SELECT * FROM ts_stat('SELECT set_config(''role'', ''postgres'', true)::tsvector')": "security-definer",
        "SELECT * FROM ts_stat('SELECT pg_read_file(''/etc/passwd'')::tsvector')": "permission denied",
        "DO $$ BEGIN RAISE EXCEPTION '%', pg_read_file('/etc/passwd'); END $$": "only a query",
        "SELECT set_config('transaction_read_only', 'off', true)": "read-write",
        "SELECT * FROM pg_authid": "permission denied",
    }
    for sql, why in refused.items():
        with pytest.raises(TagQueryError, match=why) as caught:
            query_tags_pg(pg_url, sql)
        message = str(caught.value)
        assert "\n" not in message and message.startswith("tags query failed") and "root:" not in message, sql
    assert not leak.exists() and not Path("/tmp/sendtime-pwned").exists()
    assert _served(pg_url) == ("r1", 300)
    res = CliRunner().invoke(_app(), ["tags", "--tag-store", pg_url, "SELECT pg_read_file('/etc/passwd')"])
    assert res.exit_code == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: tags query failed: permission denied"), lines
    assert "root:" not in res.output
    assert redact_url("postgresql://reader:s3cret@db.internal:5432/tags") == "postgresql://reader:***@db.internal:5432/tags"


def test_a_scheduler_login_with_only_the_reader_role_reads_the_tags(pg_server, pg_url, tmp_path):
    publish_to_postgres(pg_url, _refresh(tmp_path, "r1", 400))
    login = f"scheduler_{uuid.uuid4().hex[:6]}"
    with psycopg.connect(pg_url, autocommit=True) as con:
        con.execute(f"CREATE ROLE {login} LOGIN")
        con.execute(f"GRANT {READER_ROLE} TO {login}")
    url = pg_url.replace("postgres:@", f"{login}:@", 1)
    assert query_tags_pg(url, "SELECT count(*) AS n FROM tags")["n"].iloc[0] == 400
    with pytest.raises(TagQueryError, match="read-only"):
        query_tags_pg(url, "DELETE FROM tags RETURNING user_id")
    with pytest.raises(TagStoreError, match="no tags"):   # before any publish: a clear reason
        query_tags_pg(pg_server.get_uri(), "SELECT 1")


def test_a_publisher_without_superuser_rights_creates_the_reader_role_and_reads(tmp_path_factory, tmp_path):
    """The usual production set-up: the URL's user owns its database and may create roles,
    nothing more (a server of its own: the reader role must not exist yet)."""
    import pgserver

    server = pgserver.get_server(tmp_path_factory.mktemp("pg_plain") / "data", cleanup_mode="stop")
    try:
        with psycopg.connect(server.get_uri(), autocommit=True) as con:
            con.execute("CREATE ROLE publisher LOGIN CREATEROLE")
            con.execute("CREATE DATABASE store OWNER publisher")
            con.execute("CREATE ROLE other_publisher LOGIN CREATEROLE")
            con.execute("CREATE DATABASE other OWNER other_publisher")
        url = server.get_uri(database="store").replace("postgres:@", "publisher:@", 1)
        for refresh_id, n in (("r1", 300), ("r2", 200)):
            publish_to_postgres(url, _refresh(tmp_path, refresh_id, n))
        frame = query_tags_pg(url, "SELECT count(*) AS n, current_user AS who FROM tags")
        assert (frame["n"].iloc[0], frame["who"].iloc[0]) == (200, READER_ROLE)
        with pytest.raises(TagQueryError, match="security-definer"):   # nor back to the publisher's rights
            query_tags_pg(url, "SELECT set_config('role', 'publisher', true)")
        # a user the existing reader role was not granted to is told what to ask for
        other = server.get_uri(database="other").replace("postgres:@", "other_publisher:@", 1)
        with pytest.raises(TagStoreError, match=f"GRANT {READER_ROLE} TO"):
            publish_to_postgres(other, _refresh(tmp_path, "r3", 10))
    finally:
        server.cleanup()


# ---------------------------------------------------------------- score publishes (refresh wiring)

def test_score_publishes_the_current_refresh_to_the_configured_postgres(trained, pg_url, tmp_path, monkeypatch):
    text = Path(trained["config_path"]).read_text().replace(trained["cfg"].serving.serving_dir,
                                                             str(tmp_path / "serving"))
    config = tmp_path / "sendtime.toml"
    config.write_text(text)
    monkeypatch.setenv("SENDTIME_TAG_STORE_URL", pg_url)
    sim = trained["sim"]
    res = CliRunner().invoke(_app(), ["--config", str(config), "--quiet", "score", "--events",
                                      str(sim / "events.parquet"), "--users", str(sim / "users.parquet"),
                                      "--out", str(tmp_path / "tags.parquet")])
    assert res.exit_code == 0, res.output
    current = current_refresh(tmp_path / "serving")
    assert _served(pg_url) == (current.refresh_id, len(pd.read_parquet(current.tags)))
    monkeypatch.setenv("SENDTIME_TAG_STORE_URL", "mysql://user:secret@host/db")
    bad = CliRunner().invoke(_app(), ["--config", str(config), "tags"])
    assert bad.exit_code == 1 and "SENDTIME_TAG_STORE_URL" in bad.stderr and "secret" not in bad.output
