"""The reference estimators of benchmarks/quality_ceiling.py: they read the whole log (not
the model's history window), say which of them are bounds, and invert the generator well
enough to be calibrated on its data, with or without the latent segment in users.parquet."""

import numpy as np
import pandas as pd
import pytest

from features.events import from_frames, open_log
from simulator.judge import expected_log_loss, slot_capture
from simulator.references import (
    REFERENCES,
    bayes_ignores,
    bayes_posterior,
    generator_priors,
    read_evidence,
    structural_em,
)

START = pd.Timestamp("2026-01-05", tz="UTC")     # a Monday
DAYS = 150


def _old_evidence_log(best_hour: int) -> tuple:
    """One user whose only informative evidence is more than 90 days old: sessions and
    opened sends at ``best_hour``, unopened sends at 08:00 (all in its first 50 days of
    150); the last 75 days hold one session at every hour (no preference)."""
    rows, msg = [], 0
    for d in range(50):
        rows.append(("u1", START + pd.Timedelta(days=d, hours=best_hour, minutes=20), "session", None))
        if d % 2 == 0:
            for hour, opened in ((best_hour, True), (8, False)):
                msg += 1
                sent = START + pd.Timedelta(days=d, hours=hour, minutes=5)
                rows.append(("u1", sent, "send", f"m{msg}"))
                if opened:
                    rows.append(("u1", sent + pd.Timedelta(minutes=30), "open", f"m{msg}"))
    for hour in range(24):
        rows.append(("u1", START + pd.Timedelta(days=DAYS - 75 + 3 * hour, hours=hour, minutes=30), "session", None))
    events = pd.DataFrame(rows, columns=["user_id", "ts", "event", "message_id"])
    users = pd.DataFrame({"user_id": ["u1"], "timezone": ["UTC"], "signup_ts": [START - pd.Timedelta(days=300)]})
    return from_frames(events, users), START + pd.Timedelta(days=DAYS)


def test_references_read_evidence_older_than_the_history_window(cfg):
    assert cfg.features.history_days < DAYS - 50      # the deciding evidence is outside the model's window
    log, as_of = _old_evidence_log(best_hour=20)
    ev = read_evidence(log, as_of, cfg, pd.Index(["u1"]))
    assert ev.days == DAYS and ev.sessions.sum() == 50 + 24
    assert ev.sessions.sum(axis=1)[0, 20] == 51
    assert len(ev.send_user) == 50 and ev.send_opened.sum() == 25
    opened_at = ev.by_hour(opened_only=True).sum(axis=1)
    assert opened_at[0, 20] == 25
    em = structural_em(ev.sessions.sum(axis=1), opened_at, cfg.simulate.session_rhythm_share)
    bayes = bayes_posterior(ev, generator_priors(cfg), draws=600)
    assert ev.sessions.sum(axis=1).argmax() == 20
    assert em.argmax() in (20, 21)
    assert bayes.best_slot[0] in (20, 21)
    assert bayes.predictive[0, 20] > 2 * bayes.predictive[0, 8]


def test_fatigue_counts_the_sends_of_the_24_hours_before(cfg):
    rows = [("u1", START + pd.Timedelta(hours=h), "send", f"m{i}") for i, h in enumerate((1, 3, 21, 50, 73))]
    log = from_frames(pd.DataFrame(rows, columns=["user_id", "ts", "event", "message_id"]))
    ev = read_evidence(log, START + pd.Timedelta(days=5), cfg, pd.Index(["u1"]))
    # the generator counts the last two sends when they came less than a day before
    assert ev.send_recent.tolist() == [0, 1, 2, 0, 1]
    # the sender's local days (Asia/Shanghai): two sends on the first, one on each of three more, of five
    assert ev.send_days[0].tolist() == [1.0, 3.0, 1.0]


def test_a_log_without_sends_and_users_without_events(cfg):
    rows = [("a", START + pd.Timedelta(days=d, hours=9), "session", None) for d in range(5)]
    log = from_frames(pd.DataFrame(rows, columns=["user_id", "ts", "event", "message_id"]))
    ev = read_evidence(log, START + pd.Timedelta(days=10), cfg, pd.Index(["a", "nobody"]))
    assert len(ev.send_user) == 0 and ev.attribute_kind == "" and ev.sessions.sum() == 5
    bayes = bayes_posterior(ev, generator_priors(cfg), draws=300)
    assert bayes.best_slot[0] == 9 and (bayes.predictive[1] > 0).all()    # "nobody" gets the prior's


def test_bound_and_reference_labels(cfg):
    assert REFERENCES["Bayes posterior"].kind == "bound"
    assert REFERENCES["session share"].kind == "reference"
    assert REFERENCES["structural EM"].kind == "reference"
    assert "unopened sends" in REFERENCES["structural EM"].ignores
    assert REFERENCES["true dominant archetype"].kind == "oracle-informed"
    # the default generator: nothing left out, so the Bayes posterior is a bound
    assert bayes_ignores(cfg) == ()
    # a generator it does not invert makes it a reference, and says what it ignores
    assert bayes_ignores(cfg.with_overrides(simulate={"sender": "logged"})) == ("the logged sender's rules",)
    fields = type(cfg.simulate).model_fields
    if "late_open_share" in fields and "rhythm_drift_hours_per_30_days" in fields:
        harder = cfg.with_overrides(simulate={"late_open_share": 0.15, "rhythm_drift_hours_per_30_days": 0.5})
        assert set(bayes_ignores(harder)) == {"late opens", "drifting rhythms"}


@pytest.fixture(scope="module")
def sim_truth(sim_dir):
    truth = pd.read_parquet(sim_dir / "truth.parquet")
    true_p = np.vstack(truth["true_open_probs"].to_numpy())
    return truth, true_p, true_p.max(axis=1) > 0.01


@pytest.mark.parametrize("attribute", ["as simulated", "none"])
def test_bayes_posterior_on_simulated_data(sim_dir, sim_truth, cfg, attribute):
    """Calibrated on the generator's own data, better than the simpler references, and
    working whether users.parquet holds an attribute leaning on the segment or none."""
    truth, true_p, keep = sim_truth
    users = pd.read_parquet(sim_dir / "users.parquet")
    if attribute == "none":
        users = users.drop(columns=[c for c in ("segment", "loyalty_tier") if c in users])
    log = from_frames(pd.read_parquet(sim_dir / "events.parquet"), users)
    as_of = pd.Timestamp((sim_dir / "snapshot.txt").read_text().strip())
    ev = read_evidence(log, as_of, cfg, pd.Index(truth["user_id"]))
    assert (ev.attribute_kind == "") == (attribute == "none")
    bayes = bayes_posterior(ev, generator_priors(cfg), draws=400)
    sessions = ev.sessions.sum(axis=1)
    session_capture = slot_capture(true_p[keep], sessions[keep].argmax(axis=1))
    bayes_capture = slot_capture(true_p[keep], bayes.best_slot[keep])
    assert bayes_capture > session_capture + 0.05
    assert 0.85 < bayes.predictive[keep].mean() / true_p[keep].mean() < 1.1
    oracle = expected_log_loss(true_p[keep], true_p[keep])
    assert expected_log_loss(true_p[keep], bayes.predictive[keep]) / oracle - 1 < 0.15
    assert np.allclose(bayes.segment.sum(axis=1), 1.0)
    assert (bayes.predictive[ev.unsubscribed] == 0).all()


def test_evidence_reads_the_parquet_log(sim_dir, cfg):
    """open_log (the benchmark's path) and in-memory frames give the same evidence."""
    log = open_log(sim_dir / "events.parquet", sim_dir / "users.parquet")
    as_of = pd.Timestamp((sim_dir / "snapshot.txt").read_text().strip())
    ids = pd.Index(pd.read_parquet(sim_dir / "truth.parquet")["user_id"][:200])
    a = read_evidence(log, as_of, cfg, ids)
    b = read_evidence(from_frames(pd.read_parquet(sim_dir / "events.parquet"),
                                  pd.read_parquet(sim_dir / "users.parquet")), as_of, cfg, ids)
    assert np.array_equal(a.sessions, b.sessions) and np.array_equal(a.send_days, b.send_days)
    assert a.days == b.days == (as_of - pd.Timestamp(a.start, tz="UTC")).days
