"""benchmarks/quality_gap.py's inputs: the (user, slot) rows its truth-fitted shape reads, and
the daily counts its truth-fitted level reads (the window's edges, the order of the days)."""

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "quality_gap.py"
_spec = importlib.util.spec_from_file_location("quality_gap", _PATH)
quality_gap = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(quality_gap)


def test_slot_rows_turn_each_profile_to_start_at_the_rows_slot():
    rng = np.random.default_rng(0)
    slots = {"rhythm_open": rng.random((5, 24)), "session_share": rng.random((5, 24)), "eb_rate": rng.random((5, 24))}
    matrix = SimpleNamespace(n_slots=24, slots=slots)
    positions = np.array([3, 0, 4])
    extra = {"weekend_sessions": rng.random((3, 24))}
    rows = quality_gap._slot_rows(matrix, positions, extra)
    assert len(rows) == 3 * 24
    for i, user in enumerate(positions):
        for slot in (0, 7, 23):
            row = rows.iloc[i * 24 + slot]
            assert row["slot"] == slot
            assert row["eb_rate"] == slots["eb_rate"][user, slot]
            assert row["rhythm_open_plus1"] == slots["rhythm_open"][user, (slot + 1) % 24]
            assert row["session_share_plus23"] == slots["session_share"][user, (slot + 23) % 24]
            # the extra arrays are rows of the chosen users already, and keep their own slot
            assert row["weekend_sessions_plus0"] == extra["weekend_sessions"][i, slot]
            assert row["weekend_sessions_plus5"] == extra["weekend_sessions"][i, (slot + 5) % 24]
    assert "rhythm_open_plus0" not in rows      # the slot's own value is its family's column


def test_daily_counts_cover_the_last_28_days_before_as_of(tmp_path):
    as_of = pd.Timestamp("2026-03-01 12:00", tz="UTC")
    events = pd.DataFrame({
        "user_id": ["a", "a", "a", "a", "b", "b"],
        "ts": [as_of - pd.Timedelta(hours=1),          # day 0
               as_of - pd.Timedelta(days=1, hours=1),  # day 1
               as_of - pd.Timedelta(days=27, hours=23),  # day 27: the window's oldest
               as_of - pd.Timedelta(days=28, hours=1),   # older: out
               as_of + pd.Timedelta(hours=1),            # after as_of: out
               as_of - pd.Timedelta(days=2)],
        "event": ["session", "session", "open", "session", "session", "send"],
    })
    path = tmp_path / "events.parquet"
    events.to_parquet(path)
    daily = quality_gap._daily_counts(path, as_of, np.array(["a", "b", "c"]))
    assert daily.loc["a", "session_day0"] == 1 and daily.loc["a", "session_day1"] == 1
    assert daily.loc["a", "open_day27"] == 1
    assert daily.loc["a"].sum() == 3
    assert daily.loc["b", "send_day2"] == 1 and daily.loc["b"].sum() == 1
    assert daily.loc["c"].sum() == 0
    assert daily.shape == (3, 3 * 28)
