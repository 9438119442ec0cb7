"""The simulator: deterministic, shaped as the contract says, and carrying its truths."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from configs import load_config
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


# ---------------------------------------------------------------- fixes that hold in every setting

HARDER = Path(__file__).resolve().parents[1] / "configs" / "harder_setting.toml"


def _run(cfg, path, days=40, **simulate_overrides):
    if simulate_overrides:
        cfg = cfg.with_overrides(simulate=simulate_overrides)
    simulate(cfg, path, users=600, days=days, seed=9, progress=False)
    return pd.read_parquet(path / "events.parquet"), pd.read_parquet(path / "users.parquet"), \
        pd.read_parquet(path / "truth.parquet")


@pytest.mark.parametrize("setting,sender", [("default", "house"), ("harder", "house"), ("default", "logged")])
def test_no_send_reaches_a_user_after_their_unsubscribe(tmp_path, setting, sender):
    # many unsubscribes, so that a send after one (e.g. the day's second round) would show
    cfg = load_config(HARDER if setting == "harder" else None)
    ev, _, _ = _run(cfg, tmp_path, unsubscribe_per_send=0.05, sender=sender, send_rate=0.9)
    unsubs, sends = ev[ev["event"] == "unsubscribe"], ev[ev["event"] == "send"]
    assert len(unsubs) > 100
    per_channel = unsubs["channel"].notna().all()
    assert per_channel == cfg.simulate.unsubscribe_per_channel
    keys = ["user_id", "channel"] if per_channel else ["user_id"]
    both = pd.concat([unsubs.groupby(keys)["ts"].min().rename("unsub"),
                      sends.groupby(keys)["ts"].max().rename("last_send")], axis=1).dropna()
    assert (both["last_send"] < both["unsub"]).all()
    if per_channel:   # the other channels keep sending
        anywhere = sends.groupby("user_id")["ts"].max()
        first_unsub = unsubs.groupby("user_id")["ts"].min()
        assert (anywhere.reindex(first_unsub.index) > first_unsub).any()


def test_users_table_has_an_observable_tier_not_the_latent_segment(tiny):
    a, _, _ = tiny
    users = pd.read_parquet(a / "users.parquet")
    truth = pd.read_parquet(a / "truth.parquet")
    assert "segment" not in users.columns
    assert set(users["loyalty_tier"]) == {"basic", "silver", "gold"}
    share = pd.crosstab(truth["segment"], users["loyalty_tier"], normalize="index")
    assert share.loc["high_value", "gold"] > share.loc["silent", "gold"] + 0.15
    assert (share.max(axis=1) < 0.95).all()   # no tier gives the segment away


# ---------------------------------------------------------------- the harder setting

@pytest.fixture(scope="module")
def harder(tmp_path_factory):
    out = tmp_path_factory.mktemp("harder")
    simulate(load_config(HARDER), out, users=2000, days=40, seed=3, progress=False)
    return (pd.read_parquet(out / "events.parquet"), pd.read_parquet(out / "users.parquet"),
            pd.read_parquet(out / "truth.parquet"))


def test_harder_late_opens_channels_and_segment_volumes(harder):
    ev, _, truth = harder
    cfg = load_config(HARDER).simulate
    sends = ev[ev["event"] == "send"].set_index("message_id")
    opens = ev[(ev["event"] == "open") & ev["message_id"].notna()]
    lag = (opens["ts"].to_numpy() - sends.loc[opens["message_id"], "ts"].to_numpy()) / pd.Timedelta(hours=1)
    assert (lag > 0).all() and lag.max() <= 72.01
    assert 0.5 * cfg.late_open_share < (lag > 24).mean() < 1.5 * cfg.late_open_share
    # channels: every configured one is used, opened at its own rate
    rate = sends.loc[opens["message_id"], "channel"].value_counts() / sends["channel"].value_counts()
    assert set(rate.index) == set(cfg.channels)
    assert rate["email"] < rate["sms"] < rate["push"] < rate["wechat"]
    # sends per week by (latent) segment near domain.md's 3-4, 1-2 and a month's one
    per_user = sends.groupby("user_id").size().reindex(truth["user_id"], fill_value=0).to_numpy()
    per_week = pd.Series(per_user / 40 * 7).groupby(truth["segment"].to_numpy()).mean()
    for segment, target in zip(("high_value", "potential", "silent"), cfg.segment_sends_per_week):
        assert 0.75 * target < per_week[segment] < 1.1 * target
    assert set(truth["truth_channel"]) == {cfg.truth_channel}


def test_purchases_caused_by_opens_come_within_72_hours(tmp_path):
    # no sessions: every purchase is one an open caused; without that mechanism there are none
    cfg = load_config(HARDER)
    ev, _, _ = _run(cfg, tmp_path / "on", sessions_per_day=0.0, purchase_per_open=0.3)
    purchases = ev[ev["event"] == "purchase"].sort_values("ts")
    opens = ev[ev["event"] == "open"].sort_values("ts")[["user_id", "ts"]].rename(columns={"ts": "open_ts"})
    assert len(purchases) > 50
    paired = pd.merge_asof(purchases, opens, left_on="ts", right_on="open_ts", by="user_id")
    wait = paired["ts"] - paired["open_ts"]
    assert (wait > pd.Timedelta(0)).all() and (wait <= pd.Timedelta(hours=72)).all()
    ev_off, _, _ = _run(load_config(), tmp_path / "off", sessions_per_day=0.0)
    assert (ev_off["event"] == "purchase").sum() == 0


def test_faded_users_come_back_with_win_back(tmp_path):
    def comebacks(share: float) -> int:
        """Users active again (3 or more engagements) after 10 days without any."""
        ev, _, _ = _run(load_config(), tmp_path / str(share), days=60, fade_share=1.0, fade_days_mean=3.0,
                        sessions_per_day=2.0, winback_share=share, winback_after_days_mean=8.0)
        engaged = ev[ev["event"].isin(["session", "open"])].sort_values(["user_id", "ts"])
        after_gap = (engaged.groupby("user_id")["ts"].diff() > pd.Timedelta(days=10)).groupby(engaged["user_id"]).cumsum()
        return int(((after_gap > 0).groupby(engaged["user_id"]).sum() >= 3).sum())

    assert comebacks(1.0) > 5 * max(comebacks(0.0), 10)


def test_truth_is_the_label_probability_at_the_snapshot(tmp_path):
    # late opens scale the truth by the share that lands inside the attribution window
    cfg = load_config()
    _, _, on_time = _run(cfg, tmp_path / "a")
    _, _, late = _run(cfg, tmp_path / "b", late_open_share=0.4)
    p0 = np.vstack(on_time["true_open_probs"].to_numpy())
    p1 = np.vstack(late["true_open_probs"].to_numpy())
    both = (p0.sum(axis=1) > 0) & (p1.sum(axis=1) > 0)
    assert both.sum() > 400 and np.allclose(p1[both], 0.6 * p0[both])
    # drifting rhythms: the truth's best hour is where the user's sessions are at the end of
    # the log, not where they were at its start
    _, _, _ = _run(cfg, tmp_path / "c", rhythm_drift_hours_per_30_days=8.0, session_rhythm_share=1.0,
                   sessions_per_day=3.0, fade_share=0.0)
    ev = pd.read_parquet(tmp_path / "c" / "events.parquet")
    truth = pd.read_parquet(tmp_path / "c" / "truth.parquet").set_index("user_id")
    users = pd.read_parquet(tmp_path / "c" / "users.parquet").set_index("user_id")
    sessions = ev[ev["event"] == "session"].copy()
    zone = users["timezone"].reindex(sessions["user_id"]).to_numpy()
    sessions["hour"] = 0
    for name in np.unique(zone):
        sessions.loc[zone == name, "hour"] = sessions.loc[zone == name, "ts"].dt.tz_convert(name).dt.hour
    day = (sessions["ts"] - sessions["ts"].min()).dt.days
    best = pd.Series(np.vstack(truth["true_open_probs"].to_numpy()).argmax(axis=1), index=truth.index)

    def distance(part: pd.DataFrame) -> float:
        angle = part["hour"] * 2 * np.pi / 24
        mean = np.arctan2(np.sin(angle).groupby(part["user_id"]).mean(), np.cos(angle).groupby(part["user_id"]).mean())
        diff = (mean * 24 / (2 * np.pi) - best.reindex(mean.index)) % 24
        return float(np.minimum(diff, 24 - diff).mean())

    assert distance(sessions[day >= 33]) + 1.0 < distance(sessions[day < 7])
