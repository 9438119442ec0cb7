"""Safe refreshes (issue 9, item 5): one refresh at a time behind a lock with a clear
message, a backfill that does not become current unless asked, a read-only ``tags``, and
the serving folder consistent after all of them."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from datetime import timedelta
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from serving.models import load_champions
from serving.refresh import refresh_tags
from serving.tagstore import (
    LOCK_FILE,
    RefreshBusyError,
    RefreshPaths,
    TagQueryError,
    current_refresh,
    publish_refresh,
    query_tags,
    refresh_lock,
)

pytestmark = pytest.mark.integration

REFRESH_FILES = ("tags.parquet", "tags.duckdb", "features.parquet", "priors.parquet", "manifest.json")


def _in(cfg, serving_dir: Path):
    """The session's config, publishing into a folder of the test's own."""
    return cfg.model_copy(update={"serving": cfg.serving.model_copy(update={"serving_dir": str(serving_dir)})})


def _seeded(trained, serving_dir: Path) -> RefreshPaths:
    """A serving folder whose current refresh is a copy of the session's (no scoring)."""
    source = current_refresh(trained["cfg"].serving.serving_dir)
    (serving_dir / "refreshes").mkdir(parents=True)
    shutil.copytree(source.root, serving_dir / "refreshes" / source.root.name)
    os.symlink(Path("refreshes") / source.root.name, serving_dir / "current")
    return current_refresh(serving_dir)


def _overlay(trained, serving_dir: Path, tmp_path: Path) -> Path:
    text = Path(trained["config_path"]).read_text()
    old = trained["cfg"].serving.serving_dir
    assert old in text
    path = tmp_path / "sendtime.toml"
    path.write_text(text.replace(old, str(serving_dir)))
    return path


def _consistent(serving_dir: Path) -> RefreshPaths:
    current = current_refresh(serving_dir)
    assert current is not None and current.root.parent == (serving_dir / "refreshes").resolve()
    assert all((current.root / name).is_file() for name in REFRESH_FILES)
    assert current.read_manifest()["refresh_id"] == current.root.name
    assert not list((serving_dir / "refreshes").glob(".building-*"))
    assert not list(serving_dir.glob(".current-*"))
    assert (serving_dir / LOCK_FILE).read_text() == ""          # free again
    return current


# ---------------------------------------------------------------- one refresh at a time

def test_a_second_refresh_fails_at_once_naming_the_lock_and_its_holder(trained, tmp_path):
    cfg = _in(trained["cfg"], tmp_path / "serving")
    before = _seeded(trained, tmp_path / "serving")
    with refresh_lock(tmp_path / "serving"):
        start = time.monotonic()
        with pytest.raises(RefreshBusyError) as caught:
            refresh_tags(trained["log"], cfg, load_champions(cfg), tmp_path / "t.parquet", progress=False)
        assert time.monotonic() - start < 5
    message = str(caught.value)
    assert str(tmp_path / "serving" / LOCK_FILE) in message and f"pid {os.getpid()}" in message
    assert "started 20" in message and "\n" not in message
    assert current_refresh(tmp_path / "serving").root == before.root
    assert not list((tmp_path / "serving" / "refreshes").glob(".building-*"))
    assert not (tmp_path / "t.parquet").exists()


def test_two_concurrent_refreshes_one_wins_and_the_serving_folder_stays_consistent(trained, tmp_path):
    serving_dir = tmp_path / "serving"
    cfg = _in(trained["cfg"], serving_dir)
    _seeded(trained, serving_dir)
    crashed = serving_dir / "refreshes" / ".building-20000101T000000-dead00"   # an earlier run that died
    crashed.mkdir()
    champions = load_champions(cfg)
    barrier = threading.Barrier(2)
    outcomes: dict[str, object] = {}

    def run(name: str) -> None:
        barrier.wait()
        try:
            outcomes[name] = refresh_tags(trained["log"], cfg, champions, tmp_path / f"{name}.parquet",
                                          progress=False)
        except Exception as exc:  # noqa: BLE001 - the test sorts them out
            outcomes[name] = exc

    threads = [threading.Thread(target=run, args=(name,)) for name in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    won = [o for o in outcomes.values() if not isinstance(o, Exception)]
    lost = [o for o in outcomes.values() if isinstance(o, Exception)]
    assert len(won) == 1 and len(lost) == 1, outcomes
    assert isinstance(lost[0], RefreshBusyError) and LOCK_FILE in str(lost[0])
    current = _consistent(serving_dir)
    assert current.root == won[0].refresh.root and won[0].became_current
    assert not crashed.exists()
    loser = next(name for name, o in outcomes.items() if o is lost[0])
    assert not (tmp_path / f"{loser}.parquet").exists()
    pd.testing.assert_frame_equal(pd.read_parquet(won[0].tags_path), pd.read_parquet(current.tags))


# ---------------------------------------------------------------- a backfill is not served unless asked

def _building(serving_dir: Path, as_of: str, name: str) -> tuple[RefreshPaths, str]:
    refresh_id = f"2026010{name}T000000-abcdef"
    root = serving_dir / "refreshes" / f".building-{refresh_id}"
    root.mkdir(parents=True)
    (root / "manifest.json").write_text(json.dumps({"as_of": as_of, "refresh_id": refresh_id}))
    return RefreshPaths(root), refresh_id


def test_publishing_compares_as_of_times(tmp_path):
    serving_dir = tmp_path / "serving"
    with refresh_lock(serving_dir) as lock:
        def publish(as_of: str, name: str, **kw):
            return publish_refresh(serving_dir, *_building(serving_dir, as_of, name), keep=1, lock=lock, **kw)

        first = publish("2025-05-10T00:00:00+00:00", "1")
        assert first.became_current and not first.backfill
        old = publish("2025-05-01T00:00:00+00:00", "2")
        assert old.backfill and not old.became_current and old.current.root == first.paths.root
        assert current_refresh(serving_dir).root == first.paths.root
        assert old.paths.root.is_dir()                              # published, kept beside (keep=1 spares current)
        again = publish("2025-05-10T00:00:00+00:00", "3")           # a rerun as of the same time
        assert again.became_current and current_refresh(serving_dir).root == again.paths.root
        forced = publish("2025-05-01T00:00:00+00:00", "4", make_current=True)
        assert forced.backfill and forced.became_current
        assert current_refresh(serving_dir).root == forced.paths.root
        newer = publish("2025-05-02T00:00:00+00:00", "5")
        assert newer.became_current and not newer.backfill
    # publishing needs the lock: only its holder prunes
    building, refresh_id = _building(serving_dir, "2025-06-01T00:00:00+00:00", "6")
    with pytest.raises(RefreshBusyError, match="lock"):
        publish_refresh(serving_dir, building, refresh_id, keep=1, lock=lock)


def test_a_backfill_does_not_become_current_and_says_so_unless_asked(trained, tmp_path):
    from sendtime.cli import app

    serving_dir = tmp_path / "serving"
    before = _seeded(trained, serving_dir)
    config = _overlay(trained, serving_dir, tmp_path)
    past = (pd.Timestamp(before.read_manifest()["as_of"]) - timedelta(days=7)).isoformat()
    sim = trained["sim"]
    argv = ["--config", str(config), "--quiet", "score", "--events", str(sim / "events.parquet"),
            "--users", str(sim / "users.parquet"), "--as-of", past, "--out", str(tmp_path / "back.parquet")]
    runner = CliRunner()

    result = runner.invoke(app, argv)
    assert result.exit_code == 0, result.output
    assert "warning: backfill" in result.stderr and f"current refresh {before.root.name}" in result.stderr
    versions = load_champions(trained["cfg"]).versions()
    assert f"open v{versions['open']}" in result.stderr and f"churn v{versions['churn']}" in result.stderr
    assert "--make-current" in result.stderr and "(not current)" in result.stdout
    assert _consistent(serving_dir).root == before.root
    kept = [p for p in (serving_dir / "refreshes").iterdir() if p.name != before.root.name]
    assert len(kept) == 1 and pd.Timestamp(RefreshPaths(kept[0]).read_manifest()["as_of"]) == pd.Timestamp(past)
    assert (tmp_path / "back.parquet").is_file()

    forced = runner.invoke(app, argv + ["--make-current"])
    assert forced.exit_code == 0, forced.output
    assert "backfill made current" in forced.stdout
    current = _consistent(serving_dir)
    assert current.root != before.root and pd.Timestamp(current.read_manifest()["as_of"]) == pd.Timestamp(past)


def test_score_fails_at_once_while_a_refresh_holds_the_lock(trained, tmp_path):
    from sendtime.cli import app

    serving_dir = tmp_path / "serving"
    config = _overlay(trained, serving_dir, tmp_path)
    sim = trained["sim"]
    with refresh_lock(serving_dir):
        result = CliRunner().invoke(app, ["--config", str(config), "--quiet", "score", "--events",
                                          str(sim / "events.parquet"), "--out", str(tmp_path / "t.parquet")])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: another refresh")
    assert str(serving_dir / LOCK_FILE) in lines[0] and f"pid {os.getpid()}" in lines[0]
    assert not (tmp_path / "t.parquet").exists() and current_refresh(serving_dir) is None


# ---------------------------------------------------------------- tags reads the store and nothing else

def test_tags_is_read_only_and_cannot_touch_files(trained, tmp_path):
    serving_dir = trained["cfg"].serving.serving_dir
    n = len(pd.read_parquet(current_refresh(serving_dir).tags))
    assert query_tags(serving_dir, "SELECT count(*) AS n FROM tags")["n"].iloc[0] == n
    secret = tmp_path / "secret.csv"
    secret.write_text("a,b\n1,2\n")
    refused = {
        f"COPY tags TO '{tmp_path / 'leak.csv'}'": "Permission",
        f"SELECT * FROM read_csv('{secret}')": "Permission",
        "SELECT * FROM read_csv('/etc/passwd')": "Permission",
        f"ATTACH '{tmp_path / 'other.duckdb'}' AS other": "Permission",
        "INSTALL httpfs": "Permission",
        "LOAD httpfs": "Permission",
        f"EXPORT DATABASE '{tmp_path / 'dump'}'": "Permission",
        "SET enable_external_access = true": "locked",
        "CREATE TABLE copied AS SELECT * FROM tags": "read-only",
        "DELETE FROM tags": "read-only",
        f"SELECT 1; COPY tags TO '{tmp_path / 'leak2.csv'}'": "Permission",
    }
    for sql, why in refused.items():
        with pytest.raises(TagQueryError, match=why) as caught:
            query_tags(serving_dir, sql)
        assert "\n" not in str(caught.value) and str(caught.value).startswith("tags query failed"), sql
    assert sorted(p.name for p in tmp_path.iterdir()) == ["secret.csv"]
    assert query_tags(serving_dir, "SELECT count(*) AS n FROM tags")["n"].iloc[0] == n   # unchanged


def test_the_tags_command_prints_the_refusal_on_one_line(trained, tmp_path):
    from sendtime.cli import app

    result = CliRunner().invoke(app, ["--config", str(trained["config_path"]), "tags",
                                      "SELECT * FROM read_csv('/etc/passwd')"])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: tags query failed: Permission Error")
    assert "root:" not in result.output

