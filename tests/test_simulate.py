"""The simulator: deterministic, shaped as the contract says, and carrying its truths."""

import numpy as np
import pandas as pd
import pytest

from simulator.generate import simulate


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, cfg):
    a = tmp_path_factory.mktemp("a")
    b = tmp_path_factory.mktemp("b")
    c = tmp_path_factory.mktemp("c")
    simulate(cfg, a, users=400, days=40, seed=3, progress=False)
    simulate(cfg, b, users=400, days=40, seed=3, progress=False)
    simulate(cfg, c, users=400, days=40, seed=4, progress=False)
    return a, b, c


def test_same_seed_same_tables_other_seed_other(tiny):
    a, b, c = tiny
    for name in ("events", "users", "truth"):
        pd.testing.assert_frame_equal(pd.read_parquet(a / f"{name}.parquet"), pd.read_parquet(b / f"{name}.parquet"))
    assert not pd.read_parquet(a / "events.parquet").equals(pd.read_parquet(c / "events.parquet"))


def test_schema_and_snapshot(tiny, cfg):
    a, _, _ = tiny
    ev = pd.read_parquet(a / "events.parquet")
    assert list(ev.columns) == ["user_id", "ts", "event", "message_id", "channel", "value"]
    assert str(ev["ts"].dt.tz) == "UTC"
    assert set(ev["event"]) <= {"send", "open", "click", "purchase", "session", "unsubscribe"}
    snapshot = pd.Timestamp((a / "snapshot.txt").read_text().strip())
    assert ev["ts"].max() <= snapshot
    assert (ev.loc[ev["event"] == "purchase", "value"] > 0).all()
    truth = pd.read_parquet(a / "truth.parquet")
    probs = np.vstack(truth["true_open_probs"].to_numpy())
    assert probs.shape == (400, cfg.slots.n_slots) and (probs >= 0).all() and (probs <= 1).all()
    assert not (truth["churned"] & ~truth["active_at_snapshot"]).any()


def test_opens_follow_their_sends_within_a_day(tiny):
    a, _, _ = tiny
    ev = pd.read_parquet(a / "events.parquet")
    sends = ev[ev["event"] == "send"].set_index("message_id")["ts"]
    opens = ev[(ev["event"] == "open") & ev["message_id"].notna()]
    lag = pd.Series(opens["ts"].to_numpy() - sends.loc[opens["message_id"]].to_numpy())
    assert (lag > pd.Timedelta(0)).all() and (lag < pd.Timedelta(hours=24)).all()
    assert 0.05 < len(opens) / len(sends) < 0.3


def test_biased_sender_and_cold_start_users(tiny, cfg):
    a, _, _ = tiny
    ev = pd.read_parquet(a / "events.parquet")
    sends = ev[ev["event"] == "send"]
    hours = sends["ts"].dt.tz_convert(cfg.simulate.sender_timezone).dt.hour
    assert hours.isin(cfg.simulate.house_hours).mean() > 0.9
    users = pd.read_parquet(a / "users.parquet")
    assert len(set(users["user_id"]) - set(ev["user_id"])) > 0
    assert users["timezone"].nunique() >= 3
