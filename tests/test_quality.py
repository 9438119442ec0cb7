"""Model behaviour and a floor on quality against the simulator's truth (small data)."""

from datetime import timedelta

import numpy as np
import pandas as pd
import pytest

from features.events import from_frames
from features.matrix import build_matrix
from serving.core import slot_probabilities
from serving.models import load_champions
from simulator.judge import evaluate_against_truth

pytestmark = pytest.mark.integration


def test_quality_floor_against_truth(trained):
    report = evaluate_against_truth(pd.read_parquet(trained["tags"]), pd.read_parquet(trained["sim"] / "truth.parquet"),
                                    trained["cfg"], trained["log"])
    rows = report.table.set_index("method")
    model = rows.loc["sendtime model"]
    golden = rows.loc["baseline: global best hour"]
    habit = rows.loc["baseline: user's most frequent open hour"]
    # this small log gives capture ~0.80 and log loss ~+10 % vs the oracle (0.83 and +13 %
    # on the default data): looser floors, but a regression in features or training fails
    table = report.table.to_string()
    assert model["slot_capture"] > 0.72, table
    assert model["slot_capture"] > habit["slot_capture"] + 0.08, table
    assert model["log_loss_vs_oracle"] < 0.2, table
    assert model["log_loss_vs_oracle"] < golden["log_loss_vs_oracle"] / 1.5, table
    assert model["churn_auc"] > 0.93, table


def test_shifting_every_event_shifts_the_best_slot(trained):
    """Move every event 3 hours later: each user's predicted best local hour moves by 3."""
    cfg, sim = trained["cfg"], trained["sim"]
    events = pd.read_parquet(sim / "events.parquet")
    users = pd.read_parquet(sim / "users.parquet")
    as_of = events["ts"].max().to_pydatetime().replace(tzinfo=None)
    champions = load_champions(cfg)
    keep = users["user_id"].head(300)
    ev = events[events["user_id"].isin(keep)]
    shifted = ev.assign(ts=ev["ts"] + pd.Timedelta(hours=3))
    best = []
    for frame, t in ((ev, as_of), (shifted, as_of + timedelta(hours=3))):
        matrix, _ = build_matrix(from_frames(frame, users), t, cfg, user_ids=pd.Index(keep))
        # users who unsubscribed have no best hour to move
        active = np.flatnonzero((matrix.scalars["sessions_90d"].to_numpy() >= 15)
                                & (matrix.scalars["unreachable"].to_numpy() == 0))
        best.append(slot_probabilities(champions.open, matrix, active).argmax(axis=1))
    moved = (best[1] - best[0]) % 24
    counts = np.bincount(moved, minlength=24)
    # the model also knows population facts about clock hours, which do not move with one
    # user's log: most best hours move by 3, nearly all within an hour of it
    assert counts.argmax() == 3, counts
    assert (np.abs(moved - 3) <= 1).mean() > 0.7, counts


def test_more_recent_silence_raises_churn_risk(trained):
    cfg = trained["cfg"]
    champions = load_champions(cfg)
    matrix, _ = build_matrix(trained["log"], trained["log"].max_ts(), cfg)
    from features.rows import churn_rows

    rows = churn_rows(matrix)
    active = rows[rows["days_since_engagement"] < 3].head(200).copy()
    quiet = active.copy()
    for col in ("days_since_engagement", "days_since_session", "days_since_open"):
        quiet[col] = active[col] + 25
    for col in [c for c in active.columns if c.startswith(("sessions_7d", "opens_7d", "active_days_7d"))]:
        quiet[col] = 0
    assert champions.churn.predict(quiet).mean() > champions.churn.predict(active).mean()


def test_baselines_get_the_tags_unsubscribe_rule(cfg):
    """A user no message reaches gets 0 in every slot and no best slot in the tags; the
    baselines get the same rule, so they are not charged for predicting opens of a user who
    cannot open (a loss the model is spared by the rule, not by what it learned)."""
    from tests.conftest import make_events

    rows = [("gone", "2026-01-02 08:00", "send", "g1"), ("gone", "2026-01-02 09:00", "open", "g1"),
            ("gone", "2026-01-03 08:00", "send", "g2"), ("gone", "2026-01-03 09:00", "unsubscribe")]
    rows += [("here", f"2026-01-{d:02d} 08:00", "send", f"h{d}") for d in range(2, 9)]
    rows += [("here", f"2026-01-{d:02d} 09:00", "open", f"h{d}") for d in range(2, 9, 2)]
    log = from_frames(make_events(rows))
    n = cfg.slots.n_slots
    p_here = np.full(n, 0.1)
    p_here[9] = 0.5
    truth = pd.DataFrame({"user_id": ["gone", "here"], "true_open_probs": [np.zeros(n), p_here],
                          "active_at_snapshot": [True, True], "churned": [True, False],
                          "true_churn_prob": [0.9, 0.1]})
    tags = pd.DataFrame({"user_id": ["gone", "here"], "slot_open_probs": [np.zeros(n), p_here],
                         "churn_prob": [0.9, 0.1]})
    both = evaluate_against_truth(tags, truth, cfg, log).table.set_index("method")
    alone = evaluate_against_truth(tags.iloc[1:], truth.iloc[1:], cfg, log).table.set_index("method")
    for baseline in ("baseline: global best hour", "baseline: user's most frequent open hour"):
        # the unreachable user adds no loss (the mean over two users halves) and no capture
        assert both.loc[baseline, "expected_log_loss"] == pytest.approx(
            alone.loc[baseline, "expected_log_loss"] / 2, abs=1e-5), both.to_string()
        assert both.loc[baseline, "slot_capture"] == pytest.approx(alone.loc[baseline, "slot_capture"])
