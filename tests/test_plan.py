"""The send plan: every rule holds, capacity holds, the optimiser is optimal, the plan beats
the baselines on the simulator's truth, and off-policy estimates cover the true value."""

from __future__ import annotations

import os
from datetime import datetime, timedelta, timezone
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytest

from configs import load_config
from features.events import EventLogError, from_frames, open_log
from serving.plan import PLAN_COLUMNS, plan_users
from serving.plan_rules import load_history, quiet_hours
from serving.plan_solver import Options, assign, solve_exact
from serving.policy_eval import estimate_policy_value, logged_sends, slot_rate_model
from serving.tagstore import RefreshPaths
from simulator.generate import simulate

W = datetime(2026, 3, 10, tzinfo=timezone.utc)  # the window start of the hand-made cases
FLAT = np.linspace(0.05, 0.3, 24)  # later local hours open better


def _plan(cfg, rows, users=None, hours=24, **kw):
    """Plan the hand-made users: rows (user_id, ts, event[, message_id, channel])."""
    events = pd.DataFrame(rows, columns=["user_id", "ts", "event", "message_id", "channel"])
    events["ts"] = pd.to_datetime(events["ts"], utc=True)
    ids = sorted(set(events["user_id"]) | set(users["user_id"] if users is not None else []))
    lg = from_frames(events, users)
    history = load_history(lg, W, hours, cfg)
    probs = np.tile(FLAT, (len(ids), 1))
    zones = kw.pop("zones", ["UTC"] * len(ids))
    result = plan_users(
        ids,
        probs,
        zones,
        W,
        cfg,
        window_hours=hours,
        history=history,
        explore=kw.pop("explore", 0.0),
        **kw,
    )
    return result.rows.set_index("user_id")


def _send(user, ts, channel="push", msg=None):
    return (user, ts, "send", msg, channel)


def _old_user(user):
    # an event long ago: the user is past their first days
    return (user, W - timedelta(days=60), "session", None, None)


@pytest.fixture(scope="module")
def cfg():
    return load_config()


# ---------------------------------------------------------------- one test per rule


def test_quiet_hours_hold_in_local_time(cfg):
    zones = ["Asia/Shanghai", "America/New_York", "Asia/Kolkata"]
    rows = [_old_user(f"q{i}") for i in range(3)]
    plan = _plan(cfg, rows, zones=zones)
    quiet = quiet_hours(cfg)
    for (user, row), zone in zip(plan.iterrows(), zones):
        local = row["send_at"].tz_convert(zone)
        assert not quiet[local.hour], (user, local)
        assert row["slot"] == local.hour
    # a window that lies wholly in the night gets no send, and says why
    night = _plan(cfg, [_old_user("n")], hours=6, zones=["UTC"])
    assert night.loc["n", "reason"] == "quiet_hours" and pd.isna(night.loc["n", "send_at"])


def test_sends_per_local_day(cfg):
    # two sends already logged on the window's first local day; past their first days: 1 a day
    rows = [_old_user("d"), _send("d", W + timedelta(hours=1)), _send("d", W + timedelta(hours=2))]
    assert _plan(cfg, rows).loc["d", "reason"] == "frequency_cap"
    two_days = _plan(cfg, rows, hours=48)
    assert two_days.loc["d", "send_at"] >= pd.Timestamp(W + timedelta(days=1))


def test_new_user_cap(cfg):
    signup = W - timedelta(days=1)
    users = pd.DataFrame({"user_id": ["n"], "signup_ts": [signup]})
    rows = []
    for h in (1, 3, 5, 7, 9):  # opened, so no silence: only the new-user cap speaks
        rows += [
            _send("n", signup + timedelta(hours=h), msg=f"m{h}"),
            ("n", signup + timedelta(hours=h, minutes=2), "open", f"m{h}", None),
        ]
    assert _plan(cfg, rows, users=users).loc["n", "reason"] == "frequency_cap"
    later = _plan(cfg, rows, users=users, hours=72)
    assert later.loc["n", "send_at"] >= pd.Timestamp(signup + timedelta(days=3))
    # fewer than 5 sends: a new user may get one more, up to 2 on a local day
    ok = _plan(cfg, rows[:4], users=users)
    assert ok.loc["n", "reason"] is None


def test_silence_after_three_unopened(cfg):
    last = W - timedelta(hours=10)
    rows = [
        _old_user("s"),
        _send("s", W - timedelta(days=3)),
        _send("s", W - timedelta(days=2)),
        _send("s", last),
    ]
    assert _plan(cfg, rows).loc["s", "reason"] == "silenced"
    later = _plan(cfg, rows, hours=72)
    assert later.loc["s", "send_at"] >= pd.Timestamp(last + timedelta(hours=48))
    # an open of the last send ends the streak
    opened = rows + [("s", last + timedelta(minutes=5), "open", None, None)]
    assert _plan(cfg, opened).loc["s", "reason"] is None


def test_weekly_cap_after_five_unopened(cfg):
    days = (20, 15, 10, 5, 4)
    rows = [_old_user("w")] + [_send("w", W - timedelta(days=d)) for d in days]
    assert _plan(cfg, rows).loc["w", "reason"] == "frequency_cap"
    later = _plan(cfg, rows, hours=96)
    # at most 2 sends in any 7 days: the send waits until the one of 5 days ago is a week old
    assert later.loc["w", "send_at"] >= pd.Timestamp(W + timedelta(days=2))


def test_monthly_quota_on_quota_channels(cfg):
    rows = [_old_user("q")]
    for d in (2, 4, 6, 8):  # opened, so no silence: only the quota speaks
        ts = W - timedelta(days=d)
        rows += [
            _send("q", ts, "wechat", f"m{d}"),
            ("q", ts + timedelta(minutes=3), "open", f"m{d}", "wechat"),
        ]
    assert _plan(cfg, rows, channel="wechat").loc["q", "reason"] == "quota"
    assert _plan(cfg, rows, channel="push").loc["q", "reason"] is None
    # the next month's quota is fresh
    april = _plan(cfg, rows, channel="wechat", hours=24 * 23)
    assert april.loc["q", "send_at"] >= pd.Timestamp("2026-04-01", tz="UTC")


def test_capacity_and_user_level_reasons(cfg):
    n = 300
    ids = [f"c{i:03d}" for i in range(n)]
    probs = np.tile(FLAT, (n, 1))
    probs[0] = np.nan  # no prediction
    probs[1] = 0.001  # below --min-open-prob
    unsub = np.zeros(n, dtype=bool)
    unsub[2] = True
    result = plan_users(
        ids,
        probs,
        ["UTC"] * n,
        W,
        cfg,
        capacity_per_hour=20,
        explore=0.1,
        min_open_prob=0.01,
        unsubscribed=unsub,
        seed=3,
    )
    rows = result.rows.set_index("user_id")
    assert list(result.rows.columns[:6]) == PLAN_COLUMNS
    assert rows.loc["c000", "reason"] == "no_prediction"
    assert rows.loc["c001", "reason"] == "low_value"
    assert rows.loc["c002", "reason"] == "unsubscribed"
    sent = rows[rows["send_at"].notna()]
    assert sent["send_at"].dt.floor("h").value_counts().max() <= 20
    # 14 allowed hours x 20 = 280 sends at most; the rest are told it was capacity
    assert len(sent) == 280 and (rows["reason"] == "capacity").sum() == n - 3 - 280
    assert sent["reason"].isna().all() and sent["propensity"].between(0, 1).all()
    assert rows.loc[rows["send_at"].isna(), "propensity"].isna().all()


def test_propensities_are_exact_without_capacity(cfg):
    n = 2000
    result = plan_users(
        [f"p{i}" for i in range(n)], np.tile(FLAT, (n, 1)), ["UTC"] * n, W, cfg, explore=0.2, seed=1
    )
    rows = result.rows
    k = 14  # allowed hours 08-21
    greedy = rows["propensity"].round(9) == round(0.8 + 0.2 / k, 9)
    assert set(rows["propensity"].round(9)) == {round(0.8 + 0.2 / k, 9), round(0.2 / k, 9)}
    assert (rows.loc[greedy, "slot"] == 21).all() and (rows.loc[~greedy, "slot"] != 21).all()
    # the share of sends at the greedy hour is what the propensities say
    assert abs(greedy.mean() - (0.8 + 0.2 / k)) < 0.03


def test_propensity_column_is_validated(tmp_path):
    events = pd.DataFrame(
        {
            "user_id": ["a", "a", "b"],
            "ts": ["2026-01-01T08:00Z"] * 3,
            "event": ["send", "send", "send"],
            "propensity": ["0.5", "0", "x"],
        }
    )
    path = tmp_path / "e.csv"
    events.to_csv(path, index=False)
    with pytest.raises(EventLogError, match=r"column 'propensity': 2 row\(s\)"):
        open_log(path)
    lg = open_log(path, quarantine=tmp_path / "bad.parquet")
    assert lg.query_df("SELECT propensity FROM events")["propensity"].tolist() == [0.5]
    assert pd.read_parquet(tmp_path / "bad.parquet")["propensity"].tolist() == ["0", "x"]


# ---------------------------------------------------------------- the optimiser


def test_optimiser_matches_the_exact_solver():
    rng = np.random.default_rng(7)
    for trial in range(4):
        n, hours = 1500, 24
        allowed = rng.random((n, hours)) < 0.55
        values = rng.beta(2, 10, (n, hours)) * (1 + np.sin(np.arange(hours) / 3 + trial))[None, :]
        user, bucket = np.nonzero(allowed)
        opts = Options(user, bucket, values[user, bucket], n, hours)
        capacity = np.full(hours, np.floor(n / hours * (0.4 + 0.2 * trial)))
        fast, exact = assign(opts, capacity), solve_exact(opts, capacity)
        loads = np.bincount(opts.bucket[fast.choice[fast.choice >= 0]], minlength=hours)
        assert (loads <= capacity).all()
        assert fast.value >= exact.value * (1 - 1e-3), (trial, fast.value, exact.value)
        assert fast.value <= exact.value + 1e-6 <= fast.bound + 1e-6


# ---------------------------------------------------------------- on simulated data


@pytest.fixture(scope="module")
def campaign(tmp_path_factory, cfg):
    """A simulated log, and a tag store from a simple per-user slot model of it."""
    root = tmp_path_factory.mktemp("campaign")
    sim = root / "sim"
    logged = cfg.with_overrides(simulate={"exploration": 0.1})
    summary = simulate(logged, sim, users=1500, days=60, seed=5, progress=False, sender="logged")
    lg = open_log(sim / "events.parquet", sim / "users.parquet")
    sends = logged_sends(lg, cfg)
    rates, population = slot_rate_model(sends, 24)
    users = pd.read_parquet(sim / "users.parquet")
    probs = rates.reindex(users["user_id"]).to_numpy()
    probs = np.where(np.isnan(probs), population[None, :], probs)
    serving = root / "serving"
    _publish_tags(serving, users["user_id"].to_numpy(), probs, users["timezone"].to_numpy())
    return {
        "sim": sim,
        "log": lg,
        "serving": serving,
        "probs": probs,
        "users": users,
        "snapshot": summary.snapshot.replace(tzinfo=timezone.utc),
        "truth": pd.read_parquet(sim / "truth.parquet").set_index("user_id")["true_open_probs"],
    }


def _publish_tags(serving: Path, ids, probs, zones) -> None:
    """The tag store's layout (serving/tagstore.py) without training a model."""
    paths = RefreshPaths(serving / "refreshes" / "r1")
    paths.root.mkdir(parents=True)
    tags = pd.DataFrame(
        {
            "user_id": ids,
            "slot_open_probs": list(probs.astype(np.float32)),
            "best_slot": probs.argmax(axis=1),
            "churn_tier": "low",
            "unsubscribed": False,
        }
    )
    tags.to_parquet(paths.tags, index=False)
    pd.DataFrame({"user_id": ids, "timezone": zones, "other": 1.0}).to_parquet(
        paths.features, index=False
    )
    con = duckdb.connect(str(paths.store))
    con.execute(f"CREATE TABLE tags AS SELECT * FROM read_parquet('{paths.tags}')")
    con.close()
    os.symlink(Path("refreshes") / "r1", serving / "current")


def _true_opens(frame: pd.DataFrame, truth: pd.Series) -> float:
    got = frame.dropna(subset=["slot"])
    return float(sum(truth[u][int(s)] for u, s in zip(got["user_id"], got["slot"])))


def test_plan_beats_both_baselines_on_the_truth(campaign, cfg):
    c = campaign
    history = load_history(c["log"], c["snapshot"], 24, cfg)
    users = c["users"]
    capacity = len(users) // 40
    result = plan_users(
        users["user_id"],
        c["probs"],
        users["timezone"],
        c["snapshot"],
        cfg,
        history=history,
        capacity_per_hour=capacity,
        explore=0.0,
    )
    plan_true = _true_opens(result.rows, c["truth"])
    global_true = _true_opens(result.baselines["global_best"], c["truth"])
    own_true = _true_opens(result.baselines["own_best"], c["truth"])
    assert plan_true > own_true > 0 and plan_true > global_true > 0, (
        plan_true,
        own_true,
        global_true,
    )
    assert (result.by_hour["plan_sends"] <= capacity).all()
    assert (result.by_hour["own_best_sends"] <= capacity).all()
    # the rules saw the log: a share of users is silenced or capped, each with a reason
    assert result.rows["send_at"].isna().sum() == result.rows["reason"].notna().sum() > 0
    print(
        f"\ntrue expected opens: plan {plan_true:.1f}, global best {global_true:.1f}, "
        f"own best {own_true:.1f} ({result.summary['planned']} sends, capacity {capacity}/h)"
    )


def test_plan_and_evaluate_policy_from_the_command_line(campaign, cfg, tmp_path):
    from typer.testing import CliRunner

    from sendtime import plan_commands
    from sendtime.cli import app

    if not any(getattr(cmd, "name", None) == "plan" for cmd in app.registered_commands):
        plan_commands.register(app)
    out = tmp_path / "plan.parquet"
    args = [
        "plan",
        "--window-start",
        c_iso(campaign["snapshot"]),
        "--out",
        str(out),
        "--serving-dir",
        str(campaign["serving"]),
        "--events",
        str(campaign["sim"] / "events.parquet"),
        "--users",
        str(campaign["sim"] / "users.parquet"),
        "--capacity-per-hour",
        "30",
        "--audience",
        "best_slot >= 12",
        "--explore",
        "0.1",
        "--no-mlflow",
    ]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "expected opens: plan" in res.output
    plan = pd.read_parquet(out)
    assert list(plan.columns[:6]) == PLAN_COLUMNS
    n_audience = int((campaign["probs"].argmax(axis=1) >= 12).sum())
    assert len(plan) == n_audience
    bad = CliRunner().invoke(
        app,
        [
            "plan",
            "--window-start",
            "soon",
            "--out",
            str(out),
            "--serving-dir",
            str(campaign["serving"]),
        ],
    )
    assert bad.exit_code != 0 and "--window-start" in bad.output
    for policy in ("champion", "global-best", str(out)):
        res = CliRunner().invoke(
            app,
            [
                "evaluate-policy",
                "--events",
                str(campaign["sim"] / "events.parquet"),
                "--users",
                str(campaign["sim"] / "users.parquet"),
                "--policy",
                policy,
                "--serving-dir",
                str(campaign["serving"]),
            ],
        )
        assert res.exit_code == 0, res.output
        assert "doubly robust" in res.output and "95% CI" in res.output


def c_iso(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


# ---------------------------------------------------------------- off-policy evaluation


def test_logged_sender_obeys_quiet_hours_and_logs_propensities(tmp_path, cfg):
    simulate(cfg, tmp_path, users=300, days=20, seed=2, progress=False, sender="logged")
    lg = open_log(tmp_path / "events.parquet", tmp_path / "users.parquet")
    sends = lg.query_df("SELECT local_hour, propensity FROM events_local WHERE event = 'send'")
    assert sends["propensity"].between(0, 1, inclusive="right").all()
    assert not quiet_hours(cfg)[sends["local_hour"].to_numpy()].any()
    truth = pd.read_parquet(tmp_path / "send_truth.parquet")
    assert len(truth) == len(sends)


def test_doubly_robust_interval_covers_the_true_value(tmp_path):
    """20 simulated logs (1,000 users, 40 days, 10 % exploration): a champion fitted on the
    first 60 % of each log's time is evaluated on the sends after it, against the mean true
    open probability of those very sends had they gone at the champion's slot."""
    cfg = load_config().with_overrides(simulate={"exploration": 0.1, "sender": "logged"})
    allowed = ~quiet_hours(cfg)
    covered, n_sends = 0, []
    for seed in range(20):
        out = tmp_path / str(seed)
        simulate(cfg, out, users=1000, days=40, seed=100 + seed, progress=False)
        sends = logged_sends(open_log(out / "events.parquet", out / "users.parquet"), cfg)
        split = sends["ts"].min() + (sends["ts"].max() - sends["ts"].min()) * 0.6
        train, ev = sends[sends["ts"] <= split], sends[sends["ts"] > split]
        model, population = slot_rate_model(train, 24)
        q = model.reindex(ev["user_id"]).to_numpy()
        q = np.where(np.isnan(q), population[None, :], q)
        champion = np.where(allowed[None, :], q, -1).argmax(axis=1)
        truth = pd.read_parquet(out / "send_truth.parquet")
        truth["ts"] = truth["ts"].dt.tz_localize(None)
        cf = ev.merge(truth, on=["user_id", "ts"], how="left")["true_open_probs"]
        true_value = np.vstack(cf.to_numpy())[np.arange(len(ev)), champion].mean()
        i, slot = np.arange(len(ev)), ev["slot"].to_numpy()
        est = estimate_policy_value(
            slot,
            ev["opened"].to_numpy(),
            ev["propensity"].to_numpy(),
            champion,
            q[i, slot],
            q[i, champion],
        )
        dr = est.estimates.set_index("estimator").loc["doubly robust"]
        covered += dr["ci_low"] <= true_value <= dr["ci_high"]
        n_sends.append(len(ev))
    print(
        f"\nDR 95% interval covered the true value in {covered}/20 seeds; "
        f"{np.mean(n_sends):.0f} logged sends per seed"
    )
    assert covered >= 18


def test_estimators_on_a_known_bandit():
    """Uniform logging over 4 slots, known open rates: all three land near the truth."""
    rng = np.random.default_rng(0)
    n, rates = 40_000, np.array([0.1, 0.2, 0.3, 0.4])
    slot = rng.integers(0, 4, n)
    opened = rng.random(n) < rates[slot]
    policy = np.full(n, 3)
    est = estimate_policy_value(
        slot, opened, np.full(n, 0.25), policy, np.full(n, 0.25), np.full(n, 0.25)
    ).estimates.set_index("estimator")
    for name in ("IPS", "self-normalised IPS", "doubly robust"):
        assert est.loc[name, "ci_low"] <= 0.4 <= est.loc[name, "ci_high"], name


def test_rules_history_from_the_feature_state_matches_the_log(sim_dir, cfg, tmp_path):
    """The refresh reads the rules' users off its feature state and copies the sends straight
    to Parquet; both must say what the log query says, as of a time inside the log."""
    from features.state import build_state
    from serving.plan_rules import copy_history_sends, history_from_state

    log = open_log(sim_dir / "events.parquet", sim_dir / "users.parquet")
    as_of = pd.Timestamp(log.max_ts()).to_pydatetime() - timedelta(days=20)
    expected = load_history(log, as_of, 24, cfg)
    state = build_state(log, as_of, cfg)
    signups = log.query_df("SELECT user_id, signup_ts FROM users")
    got = history_from_state(state, signups, cfg).set_index("user_id").sort_index()
    want = expected.users.set_index("user_id").sort_index()
    # users of the log query the state leaves out: nothing of them is known at T
    left_out = want.index.difference(got.index)
    assert (want.loc[left_out, "first_seen"] > as_of.replace(tzinfo=None)).all()
    assert len(got.index.difference(want.index)) == 0
    want = want.drop(left_out)
    assert len(want) > 1000 and (want["consecutive_unopened"] > 0).sum() > 100
    pd.testing.assert_series_equal(got["consecutive_unopened"], want["consecutive_unopened"], check_dtype=False)
    for column in ("first_seen", "last_send"):
        pd.testing.assert_series_equal(got[column].astype("datetime64[us]"), want[column].astype("datetime64[us]"))
    copy_history_sends(log, as_of, 24, cfg, tmp_path / "sends.parquet")
    sends = pd.read_parquet(tmp_path / "sends.parquet").sort_values(["user_id", "ts"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(sends, expected.sends.sort_values(["user_id", "ts"]).reset_index(drop=True),
                                  check_dtype=False)
