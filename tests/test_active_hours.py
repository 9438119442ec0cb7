"""Active hours from any engagement where no open model exists (issue #8, item 5): the
predictor's shape, point-in-time correctness, the messages when there is nothing to
predict from or to check against, the comparison with the two references on a simulated
sessions-only log, and the tags' active_hours column."""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from features.active_hours import NothingToPredictError, predict_active_hours
from features.events import from_frames, open_log
from training.evaluation import active_hours_report


@pytest.fixture(scope="module")
def sessions(sim_dir, tmp_path_factory):
    """The small simulated log with only its session events (an app log without sends)."""
    events = pd.read_parquet(sim_dir / "events.parquet")
    path = tmp_path_factory.mktemp("sessions") / "sessions.parquet"
    events[events["event"] == "session"].reset_index(drop=True).to_parquet(path, index=False)
    return {"events": path, "users": sim_dir / "users.parquet"}


@pytest.fixture(scope="module")
def sessions_log(sessions):
    return open_log(sessions["events"], sessions["users"])


@pytest.fixture(scope="module")
def few_users(sessions, tmp_path_factory):
    """The sessions of 200 of those users: for the jobs around the predictor."""
    events = pd.read_parquet(sessions["events"])
    keep = np.sort(events["user_id"].unique())[:200]
    path = tmp_path_factory.mktemp("few") / "sessions.parquet"
    events[events["user_id"].isin(keep)].to_parquet(path, index=False)
    return {"events": path, "users": sessions["users"], "log": open_log(path, sessions["users"])}


def test_predicted_hours_have_one_row_per_user_and_fall_back_to_the_population(cfg, sessions_log):
    as_of = sessions_log.max_ts() - timedelta(days=30)
    hours = predict_active_hours(sessions_log, as_of, cfg)
    n, k = len(hours.user_ids), cfg.active_hours.top_k
    assert n > 1000 and hours.user_ids.is_unique
    assert hours.shares.shape == (n, 24) and hours.top_hours.shape == hours.own_top_hours.shape == (n, k)
    np.testing.assert_allclose(hours.shares.sum(axis=1), 1.0)
    assert ((hours.top_hours >= 0) & (hours.top_hours < 24)).all()
    assert all(len(set(row)) == k for row in hours.top_hours)
    np.testing.assert_array_equal(hours.top_hours[:, 0], hours.shares.argmax(axis=1))
    assert (hours.n_events > 0).all()
    np.testing.assert_array_equal(hours.population_top, np.argsort(-hours.population_share, kind="stable")[:k])
    assert "chosen on" in hours.choice.how
    frame = hours.frame()
    assert list(frame.columns) == ["user_id", "active_hours", "own_top_hours", "events_before", "hour_shares"]
    assert len(frame) == n

    # asked users, one of them unknown: the same hours for the known one, the population's for the other
    asked = pd.Index([hours.user_ids[5], "nobody-seen"])
    few = predict_active_hours(sessions_log, as_of, cfg, user_ids=asked, choice=hours.choice)
    np.testing.assert_array_equal(few.top_hours[0], hours.top_hours[5])
    np.testing.assert_array_equal(few.top_hours[1], hours.population_top)
    assert few.n_events.tolist() == [hours.n_events[5], 0]


def test_events_after_t_change_nothing(cfg, sessions):
    events = pd.read_parquet(sessions["events"])
    users = pd.read_parquet(sessions["users"])
    as_of = events["ts"].max().tz_convert(None).to_pydatetime() - timedelta(days=30)
    cut = pd.Timestamp(as_of, tz="UTC")
    # wild future: every known user busy at 03:00 UTC every day of the next two months, and strangers
    rng = np.random.default_rng(0)
    known = events.loc[events["ts"] <= cut, "user_id"].unique()
    wild = pd.DataFrame({
        "user_id": np.concatenate([rng.choice(known, 20_000), [f"new{i}" for i in range(500)]]),
        "ts": cut + pd.to_timedelta(rng.integers(1, 60, 20_500), unit="D") + pd.Timedelta(hours=3),
        "event": rng.choice(["session", "purchase", "click"], 20_500),
    })
    upto = from_frames(events[events["ts"] <= cut], users)
    wilder = from_frames(pd.concat([events, wild], ignore_index=True), users)
    a = predict_active_hours(upto, as_of, cfg)
    b = predict_active_hours(wilder, as_of, cfg)
    assert a.choice == b.choice
    pd.testing.assert_index_equal(a.user_ids, b.user_ids)
    for name in ("shares", "top_hours", "own_top_hours", "n_events", "population_share", "population_top"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


def test_a_log_without_engagement_says_there_is_nothing_to_predict(cfg, tmp_path):
    from sendtime.cli import app

    ts = pd.date_range("2026-01-01", periods=50, freq="7h", tz="UTC")
    sends = pd.DataFrame({"user_id": [f"u{i % 5}" for i in range(50)], "ts": ts, "event": "send"})
    with pytest.raises(NothingToPredictError, match="no engagement event.*nothing to predict from.*send 50"):
        predict_active_hours(from_frames(sends), ts[-1].tz_convert(None).to_pydatetime(), cfg)
    path = tmp_path / "sends.parquet"
    sends.to_parquet(path, index=False)
    res = CliRunner().invoke(app, ["--quiet", "active-hours", "--events", str(path)])
    assert res.exit_code == 1
    assert "nothing to predict from" in res.stderr and "Traceback" not in res.output


def test_nothing_after_t_is_said_not_shown_as_an_empty_table(cfg, few_users, tmp_path):
    from sendtime.cli import app

    last = few_users["log"].max_ts()
    report = active_hours_report(few_users["log"], cfg, as_of=last)
    assert report.table.empty and "nothing after T to check" in report.note
    assert "nothing after T to check" in report.to_text()
    out = tmp_path / "hours.parquet"
    res = CliRunner().invoke(app, ["--quiet", "active-hours", "--events", str(few_users["events"]), "--users",
                                   str(few_users["users"]), "--as-of", last.isoformat(), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "nothing after T to check" in res.stdout
    assert len(pd.read_parquet(out)) == len(report.hours.user_ids)


def test_predicted_hours_beat_both_references_on_a_sessions_only_log(cfg, sessions_log):
    report = active_hours_report(sessions_log, cfg)
    shares = {row["hours"].split(" (")[0]: row["share"] for _, row in report.table.iterrows()}
    k = cfg.active_hours.top_k
    predicted = shares[f"predicted top {k}"]
    assert predicted > shares[f"each user's own {k} most frequent past hours"]
    assert predicted > shares[f"population's top {k}"]
    assert report.table["events"].iloc[0] > 5000
    assert "predicted top 3" in report.to_text()


def test_tags_carry_active_hours_without_an_open_champion(cfg, few_users, tmp_path):
    from serving.models import Champions
    from serving.refresh import ACTIVE_HOURS_FIELD, refresh_tags

    local = cfg.with_overrides(serving={"serving_dir": str(tmp_path / "serving")}, drift={"enabled": False})
    none = Champions(open=None, churn=None, missing={"open": "no champion", "churn": "no champion"})
    log_ = few_users["log"]
    as_of = log_.max_ts() - timedelta(days=30)
    result = refresh_tags(log_, local, none, tmp_path / "tags.parquet", as_of, progress=False)
    tags = pd.read_parquet(result.tags_path)
    assert tags.columns[-1] == ACTIVE_HOURS_FIELD.name and tags["slot_open_probs"].isna().all()
    hours = predict_active_hours(log_, as_of, local, user_ids=pd.Index(tags["user_id"]))
    np.testing.assert_array_equal(np.stack(tags["active_hours"].to_numpy()), hours.top_hours)
