import pandas as pd
import pytest

from features.events import EventLogError, from_frames, open_log
from tests.conftest import make_events


def test_unknown_event_names_column_count_and_rows():
    ev = make_events([("a", "2026-01-01", "send"), ("b", "2026-01-01", "opn"), ("c", "2026-01-02", "opn")])
    with pytest.raises(EventLogError) as err:
        from_frames(ev)
    text = str(err.value)
    assert "column 'event'" in text and "2 row(s)" in text and "'opn'" in text and "row 2" in text


def test_missing_required_column_is_named():
    with pytest.raises(EventLogError, match="missing required column.*'ts'"):
        from_frames(pd.DataFrame({"user_id": ["a"], "event": ["send"]}))


def test_bad_timestamps_and_user_ids_from_csv(tmp_path):
    path = tmp_path / "e.csv"
    path.write_text("user_id,ts,event\na,2026-01-01T08:00:00+08:00,send\n,2026-01-01,open\nc,yesterday,open\n")
    with pytest.raises(EventLogError) as err:
        open_log(path)
    text = str(err.value)
    assert "column 'user_id': 1 row(s)" in text
    assert "column 'ts': 1 row(s)" in text and "'yesterday'" in text


def test_quarantine_moves_bad_rows_aside_and_keeps_the_rest(tmp_path):
    path = tmp_path / "e.csv"
    path.write_text("user_id,ts,event\na,2026-01-01T08:00:00+08:00,send\nb,2026-01-01,opn\n")
    log = open_log(path, quarantine=tmp_path / "bad.parquet")
    assert log.quarantined_rows == 1
    bad = pd.read_parquet(tmp_path / "bad.parquet")
    assert bad["event"].tolist() == ["opn"] and bad["bad_columns"].iloc[0] == "event;"
    kept = log.query_df("SELECT user_id, ts FROM events")
    # tz-aware input is normalised to UTC
    assert kept["user_id"].tolist() == ["a"] and kept["ts"].iloc[0] == pd.Timestamp("2026-01-01 00:00")


def test_invalid_timezone_falls_back_to_default_with_a_warning(caplog):
    ev = make_events([("a", "2026-01-01 00:00", "session")])
    users = pd.DataFrame({"user_id": ["a"], "timezone": ["Mars/Olympus"]})
    log = from_frames(ev, users, default_timezone="Asia/Shanghai")
    assert "Mars/Olympus" in caplog.text
    local = log.query_df("SELECT local_hour FROM events_local")
    assert local["local_hour"].tolist() == [8]


def test_duplicate_user_rows_rejected():
    ev = make_events([("a", "2026-01-01", "send")])
    with pytest.raises(EventLogError, match="appear more than once"):
        from_frames(ev, pd.DataFrame({"user_id": ["a", "a"]}))


def test_bad_values_show_what_was_written_and_quarantine_keeps_extra_columns(tmp_path):
    path = tmp_path / "e.csv"
    path.write_text("user_id,ts,event,value,campaign\na,2026-01-01,purchase,12.5,spring\n"
                    "b,2026-01-01,purchase,twelve,summer\n")
    with pytest.raises(EventLogError) as err:
        open_log(path)
    assert "column 'value': 1 row(s)" in str(err.value) and "e.csv:2: 'twelve'" in str(err.value)
    open_log(path, quarantine=tmp_path / "bad.parquet")
    bad = pd.read_parquet(tmp_path / "bad.parquet")
    assert bad["value"].tolist() == ["twelve"] and bad["campaign"].tolist() == ["summer"]


def test_unparseable_signup_and_missing_user_ids_in_users_are_rejected_with_rows():
    ev = make_events([("a", "2026-01-01", "send")])
    with pytest.raises(EventLogError, match=r"'signup_ts': 1 row\(s\).*row 2: 'garbage'"):
        from_frames(ev, pd.DataFrame({"user_id": ["a", "b", "c"], "signup_ts": ["2026-01-01", "garbage", None]}))
    with pytest.raises(EventLogError, match=r"'user_id': 1 row\(s\).*row 2"):
        from_frames(ev, pd.DataFrame({"user_id": ["a", None]}))


def test_event_files_found_clean_are_checked_again_only_when_they_change(tmp_path):
    import os

    from features.validated import ValidatedFiles

    folder, marks = tmp_path / "events", tmp_path / "validated"
    folder.mkdir()
    make_events([("a", "2026-01-01", "send"), ("a", "2026-01-01 01:00", "open")]).to_parquet(folder / "part-1.parquet")
    assert open_log(folder, validated_dir=marks).query_df("SELECT count(*) AS n FROM events")["n"][0] == 2
    assert len(list(marks.glob("*.ok"))) == 1
    # a new file is checked on its own; its bad row is reported with the file it is in
    bad = folder / "part-2.parquet"
    make_events([("b", "2026-01-02", "opn")]).to_parquet(bad)
    with pytest.raises(EventLogError, match=r"column 'event': 1 row\(s\).*part-2\.parquet"):
        open_log(folder, validated_dir=marks)
    assert len(list(marks.glob("*.ok"))) == 1          # a file with bad rows gets no marker
    # the marker is what is trusted: a file marked clean is not read again ...
    files = sorted(folder.glob("*.parquet"))
    other = ValidatedFiles(marks, files, "other checks")
    other.unchecked()
    other.mark(files)                                  # a marker of other checks does not count
    with pytest.raises(EventLogError, match=r"1 row\(s\)"):
        open_log(folder, validated_dir=marks)
    _mark_as_open_log_would(folder, marks, [bad])
    assert open_log(folder, validated_dir=marks).query_df("SELECT count(*) AS n FROM events")["n"][0] == 3
    # ... until it changes: touched, it is checked again
    os.utime(bad, ns=(bad.stat().st_atime_ns, bad.stat().st_mtime_ns + 1000))
    with pytest.raises(EventLogError, match=r"column 'event': 1 row\(s\)"):
        open_log(folder, validated_dir=marks)
    # ... or when the log's schema changes (a new file with another column)
    _mark_as_open_log_would(folder, marks, [bad])
    make_events([("c", "2026-01-03", "send")]).assign(channel="push").to_parquet(folder / "part-3.parquet")
    with pytest.raises(EventLogError, match=r"column 'event': 1 row\(s\)"):
        open_log(folder, validated_dir=marks)
    # a file rewritten while it was being checked keeps no marker of what was checked
    (folder / "part-3.parquet").unlink()
    make_events([("b", "2026-01-02", "open")]).to_parquet(bad)
    racing = ValidatedFiles(marks, [bad], "race")
    assert racing.unchecked() == [bad]
    before = set(marks.glob("*.ok"))
    make_events([("b", "2026-01-02", "opn")]).to_parquet(bad)
    racing.mark([bad])
    assert set(marks.glob("*.ok")) == before
    assert racing.unchecked() == [bad]
    # without the markers' folder every row is checked every time
    with pytest.raises(EventLogError):
        open_log(folder)


def _mark_as_open_log_would(folder, marks, files) -> None:
    """Plant markers for ``files`` under the digest open_log uses for ``folder`` now."""
    from features.events import checks_digest
    from features.validated import ValidatedFiles

    log = open_log(folder, quarantine=folder.parent / "quarantine.parquet")   # builds the views
    known = ValidatedFiles(marks, files, checks_digest(log.con))
    known.unchecked()
    known.mark(files)
