"""Label definitions and point-in-time correctness of the feature matrix."""

from datetime import datetime

import numpy as np
import pandas as pd
import pytest

from features.events import from_frames
from features.matrix import build_matrix
from features.state import build_state
from tests.conftest import make_events
from training.labels import churn_labels, open_labels


def test_open_label_by_message_id_within_window(cfg):
    ev = make_events([
        ("a", "2026-01-01 08:00", "send", "m1"),
        ("a", "2026-01-01 09:00", "open", "m1"),      # opened
        ("a", "2026-01-02 08:00", "send", "m2"),
        ("a", "2026-01-03 09:00", "open", "m2"),      # 25 h later: outside the window
        ("a", "2026-01-04 08:00", "send", "m3"),
        ("a", "2026-01-04 09:00", "open", "m-other"),  # another message's open
    ])
    labels = open_labels(from_frames(ev), datetime(2025, 12, 31), datetime(2026, 1, 5),
                         datetime(2026, 1, 7), cfg)
    assert labels["opened"].tolist() == [1, 0, 0]


def test_open_label_without_message_id_goes_to_latest_send(cfg):
    ev = make_events([
        ("a", "2026-01-01 08:00", "send"),
        ("a", "2026-01-01 12:00", "send"),
        ("a", "2026-01-01 13:00", "open"),   # before the next send: answers the 12:00 send
        ("b", "2026-01-01 08:00", "send"),
        ("b", "2026-01-02 09:00", "open"),   # 25 h: too late
    ])
    labels = open_labels(from_frames(ev), datetime(2025, 12, 31), datetime(2026, 1, 3),
                         datetime(2026, 1, 5), cfg)
    got = dict(zip(zip(labels["user_id"], labels["ts"].dt.hour), labels["opened"]))
    assert got == {("a", 8): 0, ("a", 12): 1, ("b", 8): 0}


def test_opens_with_ids_answer_sends_logged_without_ids(cfg):
    ev = make_events([
        ("a", "2026-01-01 08:00", "send"),            # the sender logged no ids ...
        ("a", "2026-01-01 09:00", "open", "x-17"),    # ... the app logged its own
        ("a", "2026-01-01 12:00", "send", "m2"),      # a send with an id: only m2 answers it
        ("a", "2026-01-01 13:00", "open", "x-18"),
    ])
    labels = open_labels(from_frames(ev), datetime(2025, 12, 31), datetime(2026, 1, 3),
                         datetime(2026, 1, 5), cfg)
    assert labels.sort_values("ts")["opened"].tolist() == [1, 0]


def test_open_labels_refuse_incomplete_windows(cfg):
    ev = make_events([("a", "2026-01-01 08:00", "send")])
    with pytest.raises(ValueError, match="incomplete"):
        open_labels(from_frames(ev), datetime(2025, 12, 31), datetime(2026, 1, 2),
                    datetime(2026, 1, 2, 12), cfg)


def _tricky_log(seed: int) -> pd.DataFrame:
    """Sends with ids, without, and both; ids repeated inside a window; opens by id, by a
    wrong id and by none, at lags around the 24 h window; duplicates; ties to the minute."""
    rng = np.random.default_rng(seed)
    rows, k = [], 0
    for u in range(40):
        user, kind = f"u{u:02d}", int(rng.integers(3))
        minutes = np.sort(rng.integers(0, 6 * 24 * 4, int(rng.integers(0, 20)))) * 15   # ties
        last_id = None
        for m in minutes:
            ts = pd.Timestamp("2026-03-01", tz="UTC") + pd.Timedelta(minutes=int(m))
            # tied sends agree on having an id (where they disagree the SQL's ASOF picks any)
            has = kind == 0 or (kind == 2 and m % 2 == 0)
            k += 1
            msg = (last_id if last_id and rng.random() < 0.2 else f"m{k}") if has else None
            last_id = msg or last_id
            rows.append((user, ts, "send", msg))
            for _ in range(int(rng.integers(0, 3))):
                lag = pd.Timedelta(microseconds=int(rng.choice([0, 1, 30, 600, 1439, 1440, 2000]) * 60e6
                                                    + rng.choice([0, 0, 1, -1])))
                pick = rng.random()
                oid = (msg if pick < 0.6 else None) if pick < 0.8 else f"other{k}"
                rows.append((user, ts + lag, "open", oid))
        for m in rng.integers(0, 7 * 24 * 60, int(rng.integers(0, 3))):   # stray opens
            rows.append((user, pd.Timestamp("2026-03-01", tz="UTC") + pd.Timedelta(minutes=int(m)), "open", None))
    return pd.DataFrame(rows, columns=["user_id", "ts", "event", "message_id"])


@pytest.mark.parametrize("seed", range(5))
def test_the_arrays_attribution_equals_the_sql_definition(seed, monkeypatch):
    """features.state attributes the whole log with ``opened_flags``; labels, references and
    the incremental state use the SQL: both must flag the same sends."""
    import features.attribution as attribution

    events = _tricky_log(seed)
    log = from_frames(events)
    since, until = datetime(2026, 3, 2), datetime(2026, 3, 6, 12)
    want = log.query_df(attribution.attributed_sends_sql(since, until, until, 24, "hour_of_day"))
    want = want.groupby(["user_id", "ts"])["opened"].first()      # tied sends share a flag
    assert 0 < want.mean() < 1

    ids = np.sort(events["user_id"].unique())
    ev = events.assign(ts=events["ts"].dt.tz_localize(None), user=np.searchsorted(ids, events["user_id"]),
                       us=events["ts"].dt.tz_localize(None).astype("datetime64[us]").astype(np.int64),
                       msg=pd.factorize(events["message_id"])[0], has=events["message_id"].notna())
    window = pd.Timedelta(hours=24)
    sends = ev[(ev["event"] == "send") & (ev["ts"] > since - window) & (ev["ts"] <= until)].sort_values(["user", "us"])
    opens = ev[(ev["event"] == "open") & (ev["ts"] > since) & (ev["ts"] <= until)].sort_values("user")

    def flags() -> pd.Series:
        got = attribution.opened_flags(
            sends["user"].to_numpy(), sends["us"].to_numpy(), sends["msg"].to_numpy(), sends["has"].to_numpy(),
            opens["user"].to_numpy(), opens["us"].to_numpy(), opens["msg"].to_numpy(), opens["has"].to_numpy(),
            int(window / pd.Timedelta(microseconds=1)))
        out = pd.Series(got, index=pd.MultiIndex.from_arrays([sends["user_id"], sends["ts"]]))
        out = out[out.index.get_level_values(1) > since]
        return out.groupby(level=[0, 1]).first()

    got = flags()
    assert got.index.equals(want.index)
    assert (got.to_numpy() == want.to_numpy()).all(), got[got != want]
    # users folded into the key a few at a time (a long log's span) give the same flags
    monkeypatch.setattr(attribution, "_KEY_LIMIT", 3 * 10**12)
    assert (flags().to_numpy() == want.to_numpy()).all()


def test_churn_label_population_and_horizon(cfg):
    t = "2026-03-01"
    ev = make_events([
        ("stays", "2026-02-20", "session"), ("stays", "2026-03-20", "open"),
        ("churns", "2026-02-10", "purchase"),
        ("too_old", "2025-10-01", "session"),                 # outside the 90-day lookback
        ("late", "2026-02-25", "session"), ("late", "2026-04-15", "session"),  # after the horizon
        ("only_sends", "2026-02-25", "send"),                 # sends are not engagement
    ])
    labels = churn_labels(from_frames(ev), datetime.fromisoformat(t), cfg)
    assert dict(zip(labels["user_id"], labels["churned"])) == {"stays": 0, "churns": 1, "late": 1}


def _random_log(seed: int, n_users: int = 60, days: int = 50) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    start = pd.Timestamp("2026-01-01", tz="UTC")
    for u in range(n_users):
        for d in range(days):
            t = start + pd.Timedelta(days=d, hours=int(rng.integers(0, 24)), minutes=int(rng.integers(0, 60)))
            rows.append((f"u{u}", t, "send", f"m{u}-{d}"))
            if rng.random() < 0.3:
                rows.append((f"u{u}", t + pd.Timedelta(minutes=int(rng.integers(1, 600))), "open",
                             f"m{u}-{d}" if rng.random() < 0.9 else None))
            if rng.random() < 0.5:
                rows.append((f"u{u}", t + pd.Timedelta(hours=int(rng.integers(1, 20))), "session", None))
            if rng.random() < 0.05:
                rows.append((f"u{u}", t + pd.Timedelta(hours=2), "purchase", None))
    frame = pd.DataFrame(rows, columns=["user_id", "ts", "event", "message_id"])
    frame["value"] = np.where(frame["event"] == "purchase", 20.0, np.nan)
    return frame


def test_matrix_never_looks_past_as_of(cfg):
    """Events after as_of (even wildly different ones) leave the matrix unchanged."""
    as_of = datetime(2026, 1, 30, 12)
    events = _random_log(1)
    users = pd.DataFrame({"user_id": [f"u{u}" for u in range(60)],
                          "timezone": ["Asia/Shanghai", "Europe/London", "America/New_York"] * 20})
    past = events[events["ts"] <= pd.Timestamp(as_of, tz="UTC")]
    future = _random_log(2)
    future = future[future["ts"] > pd.Timestamp(as_of, tz="UTC")]
    m_past, _ = build_matrix(from_frames(past, users), as_of, cfg)
    m_all, _ = build_matrix(from_frames(pd.concat([past, future, events[events["ts"] > pd.Timestamp(as_of, tz="UTC")]]), users),
                            as_of, cfg)
    pd.testing.assert_frame_equal(m_past.scalars, m_all.scalars)
    for family, values in m_past.slots.items():
        np.testing.assert_allclose(values, m_all.slots[family], err_msg=family)


def test_opens_after_as_of_do_not_reach_features(cfg):
    ev = make_events([
        ("a", "2026-01-01 08:00", "send", "m1"),
        ("a", "2026-01-02 07:00", "open", "m1"),   # opened 23 h later
    ])
    before, _ = build_matrix(from_frames(ev), datetime(2026, 1, 2, 6), cfg)
    after, _ = build_matrix(from_frames(ev), datetime(2026, 1, 2, 8), cfg)
    assert before.scalars.loc["a", "opens_7d"] == 0 and after.scalars.loc["a", "opens_7d"] == 1
    assert before.scalars.loc["a", "consecutive_unopened"] == 1
    assert after.scalars.loc["a", "consecutive_unopened"] == 0


def test_slots_are_local_hours(cfg):
    ev = make_events([("a", "2026-01-01 00:30", "session"), ("b", "2026-01-01 00:30", "session")])
    users = pd.DataFrame({"user_id": ["a", "b"], "timezone": ["Asia/Shanghai", "America/New_York"]})
    m, _ = build_matrix(from_frames(ev, users), datetime(2026, 1, 2), cfg)
    share = m.slots["session_share"]
    assert share[m.user_ids.get_loc("a")].argmax() == 8
    assert share[m.user_ids.get_loc("b")].argmax() == 19


def test_local_hours_and_days_before_1970(cfg):
    """DuckDB's // and % truncate toward zero: a time before local 1970-01-01 once got a
    negative hour (and the features' per-slot arrays an index into another user's row)."""
    ev = make_events([("a", "1960-03-09 10:30:00", "send"), ("a", "1969-12-31 23:59:59.5", "send"),
                      ("a", "2026-03-09 10:00:00", "send"), ("a", "2026-03-09 11:00:00", "open"),
                      ("b", "1970-01-01 00:00:00", "session")])
    users = pd.DataFrame({"user_id": ["a", "b"], "timezone": ["America/New_York", "Asia/Kolkata"]})
    log = from_frames(ev, users)
    got = log.query_df("SELECT local_hour, hour(local_ts) AS hour, local_dow, isodow(local_ts) - 1 AS dow "
                       "FROM events_local")
    assert (got["local_hour"] == got["hour"]).all() and (got["local_dow"] == got["dow"]).all()
    assert sorted(got["local_hour"]) == [5, 5, 6, 7, 18]
    # every matured send of the log, by local hour (a half-life long enough for 1960 to count)
    state = build_state(log, datetime(2026, 3, 11), cfg.with_overrides(features={"slot_half_life_days": 100_000}))
    weights = state.slots["sends_decayed"][list(state.user_ids).index("a")]
    assert set(np.flatnonzero(weights)) == {5, 6, 18}
    assert not state.slots["sends_decayed"][list(state.user_ids).index("b")].any()


def test_fatigue_and_recency(cfg):
    ev = make_events([
        ("a", "2026-01-09 20:00", "send", "m1"), ("a", "2026-01-10 08:00", "send", "m2"),
        ("a", "2026-01-10 10:00", "send", "m3"), ("a", "2026-01-05 12:00", "session"),
    ])
    m, _ = build_matrix(from_frames(ev), datetime(2026, 1, 10, 12), cfg)
    row = m.scalars.loc["a"]
    assert row["sends_last_24h"] == 3 and row["consecutive_unopened"] == 3
    assert row["days_since_session"] == pytest.approx(5.0)
    assert np.isnan(row["days_since_open"])


def test_unreachable_means_unsubscribed_after_the_last_send(cfg):
    ev = make_events([
        ("gone", "2026-01-02 08:00", "send"), ("gone", "2026-01-02 09:00", "unsubscribe"),
        ("back", "2026-01-02 08:00", "unsubscribe"), ("back", "2026-01-03 08:00", "send"),
        ("never", "2026-01-03 08:00", "send"),
    ])
    m, _ = build_matrix(from_frames(ev), datetime(2026, 1, 10), cfg)
    assert m.scalars["unreachable"].sort_index().to_dict() == {"back": 0.0, "gone": 1.0, "never": 0.0}
    assert m.scalars.loc["back", "unsubscribed"] == 1.0


def test_an_unsubscribe_from_another_channel_leaves_the_user_reachable(cfg):
    ev = make_events([("a", "2026-01-02 08:00", "send"), ("a", "2026-01-02 09:00", "unsubscribe")])
    ev["channel"] = ["push", "email"]
    m, _ = build_matrix(from_frames(ev), datetime(2026, 1, 10), cfg)
    assert m.scalars.loc["a", "unreachable"] == 0.0
    ev["channel"] = ["push", "push"]
    m, _ = build_matrix(from_frames(ev), datetime(2026, 1, 10), cfg)
    assert m.scalars.loc["a", "unreachable"] == 1.0


def _stopping_log(seed: int, n_users: int = 40, days: int = 60) -> pd.DataFrame:
    """Daily sends at a random hour, some opened, sessions; half the users stop engaging
    (still sent to) on a random day, so every snapshot has users who churn and who stay."""
    rng = np.random.default_rng(seed)
    start = pd.Timestamp("2026-01-01", tz="UTC")
    rows = []
    for u in range(n_users):
        stop = int(rng.integers(5, days - 5)) if u % 2 else days
        for d in range(days):
            t = start + pd.Timedelta(days=d, hours=int(rng.integers(0, 24)), minutes=int(rng.integers(0, 60)))
            rows.append((f"u{u}", t, "send", f"m{u}-{d}"))
            if d < stop and rng.random() < 0.4:
                rows.append((f"u{u}", t + pd.Timedelta(minutes=int(rng.integers(1, 600))), "open", f"m{u}-{d}"))
            if d < stop and rng.random() < 0.4:
                rows.append((f"u{u}", t + pd.Timedelta(hours=int(rng.integers(1, 20))), "session", None))
    return pd.DataFrame(rows, columns=["user_id", "ts", "event", "message_id"])


@pytest.mark.parametrize("task", ["open", "churn"])
def test_no_label_reaches_into_the_next_split(cfg, task):
    """Every training label is settled before validation starts, every validation label
    before the holdout starts, every holdout label by the as-of time. A churn horizon
    longer than the snapshot step (10 days against 7) overlaps validation unless the
    training snapshots are spaced before it."""
    from training.datasets import build_dataset

    small = cfg.with_overrides(labels={"churn_horizon_days": 10},
                               datasets={"open_train_snapshots": 2, "churn_train_snapshots": 2})
    ds = build_dataset(from_frames(_stopping_log(3)), task, None, small, progress=False)
    if task == "open":   # an open label is settled one attribution window after its send
        window = pd.Timedelta(hours=small.labels.open_attribution_hours)
        ends = {name: split.meta["ts"].dt.tz_localize(None) + window
                for name, split in (("train", ds.train), ("valid", ds.valid), ("holdout", ds.holdout))}
    else:                # a churn label looks at the horizon after its snapshot
        horizon = pd.Timedelta(days=small.labels.churn_horizon_days)
        ends = {name: split.meta["snapshot"] + horizon
                for name, split in (("train", ds.train), ("valid", ds.valid), ("holdout", ds.holdout))}
    valid_start, holdout_start = ds.valid.meta["snapshot"].min(), ds.holdout.meta["snapshot"].min()
    assert ends["train"].max() <= valid_start, (ends["train"].max(), valid_start)
    assert ends["valid"].max() <= holdout_start, (ends["valid"].max(), holdout_start)
    assert ends["holdout"].max() <= pd.Timestamp(ds.as_of)
    assert ds.train.meta["snapshot"].nunique() == 2
    if task == "churn":  # the holdout: the last snapshot (a day) whose horizon ends by the as-of time
        assert pd.Timestamp(ds.as_of) - pd.Timedelta(days=1) < ends["holdout"].max() <= pd.Timestamp(ds.as_of)


def test_whole_history_totals_are_read_as_rates_not_raw():
    """Totals over the whole history grow with the log's age (a model trained on early
    snapshots meets larger values later): the models read their per-day rates only."""
    from features.rows import FeatureSpec

    frame = pd.DataFrame({"opens_ever": [3.0], "engagements_ever": [5.0], "active_days_ever": [2.0],
                          "opens_per_day_ever": [0.1], "lifetime_active_rate": [0.2], "days_since_open": [1.0]})
    names = FeatureSpec.fit(frame, (), 10).names
    assert names == ("opens_per_day_ever", "lifetime_active_rate", "days_since_open")


def test_a_churn_snapshot_builds_only_what_its_rows_read(sim_dir, cfg):
    """The churn rows read two per-slot summaries; built with only those families (no
    age-weighted pooling, no rhythm basis), they equal the rows of the whole matrix."""
    from features.events import open_log
    from features.rows import CHURN_SLOT_FAMILIES, churn_rows

    log = open_log(sim_dir / "events.parquet", sim_dir / "users.parquet")
    as_of = datetime(2026, 3, 1)
    whole, priors = build_matrix(log, as_of, cfg)
    only, lean = build_matrix(log, as_of, cfg, slot_families=CHURN_SLOT_FAMILIES)
    assert set(only.slots) == set(CHURN_SLOT_FAMILIES) < set(whole.slots)
    assert priors.rhythm is not None and lean.rhythm is None
    pd.testing.assert_frame_equal(churn_rows(only), churn_rows(whole))
