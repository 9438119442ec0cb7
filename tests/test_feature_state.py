"""The feature state moved forward equals the state rebuilt from the whole log, on the whole
matrix; the refresh moves it only when the configuration matches and the log only grew."""

from __future__ import annotations

import shutil
from datetime import datetime, timedelta

import numpy as np
import pandas as pd
import pytest

from features.events import from_frames, open_log
from features.matrix import build_matrix
from features.state import IncrementalMismatch, advance, build_state, read_state, write_state
from serving.incremental import refresh_features


def assert_same_matrix(moved, rebuilt) -> None:
    """Every scalar column and every per-slot family of two matrices, on every user."""
    assert list(moved.user_ids) == list(rebuilt.user_ids)
    a, b = moved.scalars, rebuilt.scalars
    assert list(a.columns) == list(b.columns)
    for column in a.columns:
        if a[column].dtype.kind in "fiub":
            # integer counts exactly; purchase values and age-weighted counts are float sums
            # (rounding only)
            tol = 1e-9 if column.startswith("value_") or "_decayed_" in column else 0.0
            np.testing.assert_allclose(a[column].to_numpy(float), b[column].to_numpy(float), rtol=tol, atol=tol,
                                       err_msg=column)
        else:
            assert (a[column].astype(str).to_numpy() == b[column].astype(str).to_numpy()).all(), column
    assert moved.slots.keys() == rebuilt.slots.keys()
    for family in moved.slots:
        if family.startswith(("decayed_", "rhythm_")) and not family.endswith("_rank"):
            # age weights: the old value decayed plus the new events', against one sum (the
            # rhythm families are read from them)
            np.testing.assert_allclose(moved.slots[family], rebuilt.slots[family], rtol=1e-6, err_msg=family)
        else:
            np.testing.assert_array_equal(moved.slots[family], rebuilt.slots[family], err_msg=family)


@pytest.mark.parametrize("step_hours,in_memory,half_life", [(24, True, None), (7, True, None), (30, True, None),
                                                            (24, False, None), (30, False, None), (24, True, 0)])
def test_a_state_moved_forward_equals_a_rebuild_on_the_whole_matrix(sim_dir, cfg, step_hours, in_memory, half_life):
    # in_memory False: the log is read from its file by every query, as a big log is, so
    # moving forward sees only the events its narrowed view kept (a slice it forgot fails);
    # half_life 0: no age-weighted evidence, so the full build reads only the history window
    if half_life is not None:
        cfg = cfg.with_overrides(features={"slot_half_life_days": half_life})
    log = open_log(sim_dir / "events.parquet", sim_dir / "users.parquet",
                   **({} if in_memory else {"materialize_max_rows": 0}))
    t = (log.max_ts() - timedelta(days=4)).replace(minute=13, second=0, microsecond=0)
    state = build_state(log, t, cfg)
    for _ in range(2):
        t += timedelta(hours=step_hours)
        state = advance(log, state, t, cfg)
        rebuilt = build_state(log, t, cfg)
        assert list(state.user_ids) == list(rebuilt.user_ids)
        moved_matrix, moved_priors = build_matrix(log, t, cfg, state=state)
        matrix, priors = build_matrix(log, t, cfg, state=rebuilt)
        assert_same_matrix(moved_matrix, matrix)
        np.testing.assert_allclose(moved_priors.slot_rate, priors.slot_rate, rtol=0, atol=0)


def _edge_log() -> tuple[pd.DataFrame, pd.DataFrame]:
    """Hand-made edge cases: a late open flipping yesterday's send, an unsubscribe after
    the last send (per channel and without one), a send that brings a user back, a new
    user, a signup without events, purchases with values, sends without message ids, active
    days before 1970, a latest send without a channel."""
    rows = [
        # a: sent at 22:00 on day 1, opened (by id) at 02:00 on day 2: after T, inside the window
        ("a", "2026-03-01 09:00", "session", None, None, None),
        ("a", "2026-03-01 22:00", "send", "m1", "push", None),
        ("a", "2026-03-02 02:00", "open", "m1", None, None),
        ("a", "2026-03-02 03:00", "purchase", None, None, 19.99),
        # b: unsubscribed from email after the last email send; then a push send on day 2
        ("b", "2026-02-20 10:00", "send", "m2", "email", None),
        ("b", "2026-02-25 10:00", "unsubscribe", None, "email", None),
        ("b", "2026-03-02 10:00", "send", "m3", "push", None),
        ("b", "2026-03-02 12:00", "unsubscribe", None, None, None),
        # c: sends without ids, opened by time; one open a day later than its send
        ("c", "2026-02-28 08:00", "send", None, None, None),
        ("c", "2026-02-28 09:30", "open", None, None, None),
        ("c", "2026-03-01 20:00", "send", None, None, None),
        ("c", "2026-03-02 06:00", "open", None, None, None),
        ("c", "2026-03-02 07:00", "click", None, None, 0.5),
        # d: first seen after T
        ("d", "2026-03-02 11:00", "session", None, None, None),
        # e: old history leaving the 7- and 30-day windows
        ("e", "2026-01-30 23:30", "session", None, None, None),
        ("e", "2026-02-22 23:30", "purchase", None, None, 5.0),
        ("e", "2026-02-23 00:30", "send", "m4", "push", None),
        # g: active days before 1970 (the day before it is -1, also "none yet"), back after T
        ("g", "1955-08-02 03:00", "session", None, None, None),
        ("g", "1969-12-31 23:00", "session", None, None, None),
        ("g", "2026-03-02 09:00", "session", None, None, None),
        # h: the latest send has no channel; an unsubscribe from push after it counts
        ("h", "2026-02-26 10:00", "send", "m5", "email", None),
        ("h", "2026-03-02 08:00", "send", "m6", None, None),
        ("h", "2026-03-02 09:00", "unsubscribe", None, "push", None),
    ]
    events = pd.DataFrame(rows, columns=["user_id", "ts", "event", "message_id", "channel", "value"])
    events["ts"] = pd.to_datetime(events["ts"]).dt.tz_localize("UTC")
    users = pd.DataFrame({"user_id": ["a", "b", "c", "d", "e", "f", "g", "h"],
                          "timezone": ["Asia/Shanghai", "UTC", "America/New_York", "Europe/Berlin", "UTC", "UTC",
                                       "UTC", "UTC"],
                          "signup_ts": pd.to_datetime(["2026-01-01 00:00"] * 3 + ["2026-03-02 10:00", "2026-01-01 00:00",
                                                                                       "2026-03-02 05:00"]
                                                      + ["2026-01-01 00:00"] * 2)})
    return events, users


@pytest.mark.parametrize("half_life", [None, 0])
def test_edge_cases_move_forward_exactly(cfg, half_life):
    if half_life is not None:     # windowed per-slot evidence only: the full build reads the history window
        cfg = cfg.with_overrides(features={"slot_half_life_days": half_life})
    events, users = _edge_log()
    log = from_frames(events, users)
    t0 = datetime(2026, 3, 1, 23, 0)
    state = build_state(log, t0, cfg)
    for t in (datetime(2026, 3, 2, 4, 0), datetime(2026, 3, 2, 23, 0), datetime(2026, 3, 3, 23, 0)):
        state = advance(log, state, t, cfg)
        moved, _ = build_matrix(log, t, cfg, state=state)
        rebuilt, _ = build_matrix(log, t, cfg)
        assert_same_matrix(moved, rebuilt)
    final = rebuilt.scalars
    assert final.loc["b", "unreachable"] == 1.0          # unsubscribed (every channel) after the last send
    assert final.loc["a", "consecutive_unopened"] == 0.0  # the late open counted
    assert "d" in final.index and "f" in final.index      # first seen / signed up after T
    assert final.loc["h", "unreachable"] == 1.0          # its latest send had no channel
    # g's active days: 1955-08-02, 1969-12-31 and 2026-03-02, first to last
    span = (pd.Timestamp("2026-03-02") - pd.Timestamp("1955-08-02")).days
    assert final.loc["g", "active_span_days"] == span and final.loc["g", "active_days_ever"] == 3


def test_the_saved_state_round_trips(sim_dir, cfg, tmp_path):
    log = open_log(sim_dir / "events.parquet", sim_dir / "users.parquet")
    t = log.max_ts() - timedelta(days=2)
    state = build_state(log, t, cfg)
    write_state(tmp_path, state, cfg, {"events_up_to_as_of": 1})
    again, meta = read_state(tmp_path)
    assert meta["log"] == {"events_up_to_as_of": 1} and again.as_of == t
    later = t + timedelta(days=1)
    assert_same_matrix(build_matrix(log, later, cfg, state=advance(log, again, later, cfg))[0],
                       build_matrix(log, later, cfg)[0])
    # a state saved by an earlier release (one arrays.npz) still reads, array for array
    folder = tmp_path / "feature_state"
    arrays = {path.stem: np.load(path) for path in (folder / "arrays").glob("*.npy")}
    assert len(arrays) > 60
    np.savez(folder / "arrays.npz", **arrays)
    shutil.rmtree(folder / "arrays")
    old, _ = read_state(tmp_path)
    for part in ("scan", "slots", "matured", "rhythm"):
        mine, theirs = getattr(again, part), getattr(old, part)
        assert mine.keys() == theirs.keys() and all(np.array_equal(mine[k], theirs[k]) for k in mine)
    assert np.array_equal(again.active, old.active) and np.array_equal(again.unreachable, old.unreachable)


def test_the_refresh_moves_the_state_only_when_the_log_only_grew(sim_dir, tmp_path):
    from configs import load_config
    from serving.tagstore import new_refresh_dir, publish_refresh, refresh_lock

    events = pd.read_parquet(sim_dir / "events.parquet")
    cut = events["ts"].max() - pd.Timedelta(days=1)
    folder = tmp_path / "events"
    folder.mkdir()
    events[events["ts"] <= cut].to_parquet(folder / "part-1.parquet")
    cfg = load_config().with_overrides(serving={"serving_dir": str(tmp_path / "serving")})
    serving_dir = tmp_path / "serving"

    def refresh(as_of, full=False):
        log = open_log(folder, sim_dir / "users.parquet")
        made = refresh_features(log, as_of, cfg, serving_dir, full=full)
        with refresh_lock(serving_dir) as lock:
            building, refresh_id = new_refresh_dir(serving_dir)
            write_state(building.root, made.state, cfg, made.fingerprint)
            (building.root / "manifest.json").write_text(f'{{"as_of": "{as_of.isoformat()}"}}')
            publish_refresh(serving_dir, building, refresh_id, 3, lock=lock)
        return made, log

    first, _ = refresh(cut.to_pydatetime().replace(tzinfo=None))
    assert not first.incremental and "no refresh yet" in first.how
    # one more day arrives as a new file: moved forward, equal to a rebuild
    events[events["ts"] > cut].to_parquet(folder / "part-2.parquet")
    end = events["ts"].max().to_pydatetime().replace(tzinfo=None)
    second, log = refresh(end)
    assert second.incremental and "moved forward" in second.how
    assert_same_matrix(second.matrix, build_matrix(log, end, cfg)[0])
    # the past changed (a row removed): rebuilt, and says why
    events[(events["ts"] <= cut)].iloc[1:].to_parquet(folder / "part-1.parquet")
    third, _ = refresh(end + timedelta(hours=1))
    assert not third.incremental and "changed" in third.how
    # another configuration: rebuilt
    cfg = cfg.with_overrides(features={"history_days": 60})
    fourth, _ = refresh(end + timedelta(hours=2))
    assert not fourth.incremental and "configuration" in fourth.how


def test_whole_history_features_by_hand(cfg):
    """Age-weighted counts, active days over the whole log and the rhythm between them, on
    a user whose evidence is older than every window."""
    rows = [("g", "2025-10-01 10:00", "session", None, None, None),   # 151 days before T: outside 90 days
            ("g", "2025-10-03 10:00", "session", None, None, None),
            ("g", "2025-10-07 10:00", "open", None, None, None),
            ("g", "2026-02-15 10:00", "open", None, None, None)]      # 14 days before T
    events = pd.DataFrame(rows, columns=["user_id", "ts", "event", "message_id", "channel", "value"])
    events["ts"] = pd.to_datetime(events["ts"]).dt.tz_localize("UTC")
    users = pd.DataFrame({"user_id": ["g"], "timezone": ["UTC"], "signup_ts": pd.to_datetime(["2025-09-01"])})
    t = datetime(2026, 3, 1, 10, 0)
    row = build_matrix(from_frames(events, users), t, cfg)[0].scalars.loc["g"]
    assert row["opens_90d"] == 1 and row["opens_ever"] == 2 and row["sessions_ever"] == 2
    assert row["opens_decayed_14d"] == pytest.approx(0.5 + 2 ** (-145 / 14))
    assert row["active_days_ever"] == 4 and row["active_span_days"] == 137
    gaps = np.array([2, 4, 131])
    assert row["mean_active_gap_days"] == pytest.approx(gaps.mean())
    assert row["active_gap_cv"] == pytest.approx(gaps.std() / gaps.mean())
    assert row["overdue_ratio"] == pytest.approx(14 / gaps.mean())
    assert row["days_since_first_engagement"] == pytest.approx(151)
    # the whole-history per-slot evidence sees the sessions at 10:00 that the 90-day window lost
    matrix = build_matrix(from_frames(events, users), t, cfg)[0]
    assert matrix.slots["decayed_session_rank"][0, 10] == 0 and matrix.slots["session_rank"][0, 10] != 0


def test_the_pooled_families_do_not_depend_on_blocks_or_threads(cfg):
    """build_matrix pools the per-slot counts in small blocks on every core: each user's
    numbers must be those of one pass over everyone."""
    from features.matrix import SlotCounts, population_priors, slot_features, slot_features_in_blocks

    rng = np.random.default_rng(3)
    n = 2_345
    lam = rng.gamma(0.5, 1.0, (n, 1)) * rng.dirichlet(np.ones(24), n) * 24
    sends = rng.poisson(lam * 2)
    counts = SlotCounts(user_ids=np.arange(n).astype(str).astype(object), sends=sends,
                        opened=rng.binomial(sends, 0.12), sessions=rng.poisson(lam),
                        opens_at=rng.poisson(lam * 0.3), purchases_at=rng.poisson(lam * 0.05))
    priors = population_priors(counts, cfg, "test")
    whole, rate = slot_features(SlotCounts(user_ids=counts.user_ids, **{k: getattr(counts, k).astype(np.float64)
                                                                         for k in ("sends", "opened", "sessions",
                                                                                   "opens_at", "purchases_at")}),
                                priors, cfg)
    for block, threads in ((100_000, 1), (500, 1), (333, 3)):
        got, got_rate = slot_features_in_blocks(counts, priors, cfg, block=block, threads=threads)
        assert got.keys() == whole.keys()
        for name in whole:
            np.testing.assert_array_equal(got[name], whole[name], err_msg=f"{name} block {block} threads {threads}")
        np.testing.assert_array_equal(got_rate, rate.ravel() if rate.ndim > 1 else rate)


def test_a_step_whose_sends_reach_past_the_history_is_refused(cfg):
    """Moving forward re-reads the sends of the attribution window before T; when that window
    reaches before the new history start (a step of history - window or more), those sends
    would be counted in the history they left (helper 22's fuzzer: last opened and streak)."""
    events = pd.DataFrame({"user_id": ["a", "a", "a"], "event": ["send", "open", "session"], "message_id": [None] * 3,
                           "ts": pd.to_datetime(["2026-03-09 16:00", "2026-03-09 17:00", "2026-06-08 12:00"], utc=True)})
    log = from_frames(events)
    t0 = datetime(2026, 3, 10)
    state = build_state(log, t0, cfg)
    step = timedelta(days=cfg.features.history_days) - timedelta(hours=cfg.labels.open_attribution_hours / 2)
    with pytest.raises(IncrementalMismatch, match="attribution window"):
        advance(log, state, t0 + step, cfg)


def test_the_full_build_in_ranges_of_users_equals_one_range(sim_dir, cfg, monkeypatch):
    """build_state counts the log a range of users at a time (PART_EVENTS events each, about
    20M), the open attribution and the active days included: ranges of a few thousand events
    must give every array of one range."""
    import features.state as state_module

    log = open_log(sim_dir / "events.parquet", sim_dir / "users.parquet")
    t = log.max_ts() - timedelta(days=2)
    whole = build_state(log, t, cfg)
    monkeypatch.setattr(state_module, "PART_EVENTS", 50_000)
    parts = build_state(log, t, cfg)
    assert list(parts.user_ids) == list(whole.user_ids)
    for name, values in whole.scan.items():
        np.testing.assert_allclose(parts.scan[name], values, rtol=1e-12, err_msg=name)
    for name, values in whole.slots.items():
        np.testing.assert_array_equal(parts.slots[name], values, err_msg=name)
    for group in ("matured", "rhythm"):
        for name, values in getattr(whole, group).items():
            np.testing.assert_array_equal(getattr(parts, group)[name], values, err_msg=f"{group} {name}")
    for name in ("active", "last_opened", "streak", "history_sends", "last_send", "unreachable"):
        np.testing.assert_array_equal(getattr(parts, name), getattr(whole, name), err_msg=name)
    assert whole.active.any() and (whole.history_sends > 0).any() and (whole.rhythm["n"] > 1).any()


def test_a_log_with_nobody_known_yet_gives_an_empty_state(cfg):
    """Every event and signup after T (helper 23's fuzzer: the coded scan indexed its first user)."""
    events = pd.DataFrame({"user_id": ["a"], "ts": pd.to_datetime(["2026-03-11"], utc=True), "event": ["send"],
                           "message_id": [None]})
    users = pd.DataFrame({"user_id": ["a"], "timezone": ["UTC"], "signup_ts": pd.to_datetime(["2026-03-11"])})
    state = build_state(from_frames(events, users), datetime(2026, 3, 10), cfg)
    assert len(state) == 0 and all(len(v) == 0 for v in state.scan.values())


def test_a_scan_condition_on_more_than_the_event_name_is_counted_in_sql(sim_dir, cfg, monkeypatch):
    """The coded scan looks up conditions of the event name alone by kind; one that reads
    another column (a purchase's value) is evaluated per event in SQL, and counts right."""
    import features.state as state_module
    from features.families import Count

    log = open_log(sim_dir / "events.parquet", sim_dir / "users.parquet")
    assert state_module._of_event_name(log, "event IN ('open', 'click')", ["send", "open", "click"]) == {
        "send": False, "open": True, "click": True}
    assert state_module._of_event_name(log, "event = 'purchase' AND value > 20", ["purchase"]) is None
    t = log.max_ts() - timedelta(days=2)
    usual = state_module._scan_aggregates
    big = Count("event = 'purchase' AND value > 20", timedelta(days=30))
    monkeypatch.setattr(state_module, "_scan_aggregates", lambda c: [*usual(c), ("big_purchases_30d", big)])
    state = build_state(log, t, cfg)
    events = pd.read_parquet(sim_dir / "events.parquet")
    ts = pd.to_datetime(events["ts"], utc=True).dt.tz_localize(None)
    inside = (events["event"] == "purchase") & (events["value"] > 20) & (ts <= t) & (ts > t - timedelta(days=30))
    expected = events[inside].groupby("user_id").size().reindex(state.user_ids, fill_value=0).to_numpy()
    assert expected.sum() > 0
    np.testing.assert_array_equal(state.scan["big_purchases_30d"], expected)
    np.testing.assert_array_equal(state.scan["purchases_30d"] >= expected, True)


def test_a_window_listed_twice_is_refused_at_the_edge(tmp_path):
    """A window or half-life twice names one column twice: moving the state forward would
    count or decay it twice (the fuzzer's (60, 60)); the configuration says so instead."""
    from configs import ConfigError, load_config

    path = tmp_path / "twice.toml"
    path.write_text("[features]\ndecay_half_lives_days = [60, 60]\n")
    with pytest.raises(ConfigError, match=r"decay_half_lives_days names \['60'\] more than once"):
        load_config(path)
    path.write_text("[features]\nfrequency_windows_days = [7, 30, 7]\n")
    with pytest.raises(ConfigError, match=r"frequency_windows_days names \['7'\] more than once"):
        load_config(path)
    # two numbers that name one column (helper 24's review), and a half-life that is no number
    path.write_text("[features]\ndecay_half_lives_days = [14, 14.0000001]\n")
    with pytest.raises(ConfigError, match=r"decay_half_lives_days names \['14'\] more than once"):
        load_config(path)
    path.write_text("[features]\ndecay_half_lives_days = [nan]\n")
    with pytest.raises(ConfigError, match="decay_half_lives_days must be positive numbers"):
        load_config(path)


def test_a_saved_state_outlives_settings_of_how_the_log_is_read(cfg):
    from features.state import HOW_NOT_WHAT, config_fingerprint

    how = {"materialize_max_rows": 0, "duckdb_memory_limit": "1GB", "validation_cache": False,
           "validation_cache_dir": "/elsewhere"}
    assert set(how) == set(HOW_NOT_WHAT)
    assert config_fingerprint(cfg.with_overrides(features=how)) == config_fingerprint(cfg)
    assert config_fingerprint(cfg.with_overrides(features={"history_days": 60})) != config_fingerprint(cfg)
