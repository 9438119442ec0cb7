"""benchmarks/rhythm_background.py: the share a log chooses from its own later sends, scored on
exactly the sends of the held-out window (none before the fit's T, none whose window passes T)."""

import importlib.util
import re
import sys
from datetime import timedelta
from pathlib import Path

import numpy as np
import pandas as pd

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "rhythm_background.py"
_spec = importlib.util.spec_from_file_location("rhythm_background", _PATH)
rhythm_background = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(rhythm_background)


def test_scores_each_share_on_the_held_out_sends(sim_dir, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["rhythm_background.py", "--events", str(sim_dir / "events.parquet"),
                                      "--users", str(sim_dir / "users.parquet"), "--hold-days", "21",
                                      "--shares", "0,0.45", "--truth", str(sim_dir / "truth.parquet")])
    rhythm_background.main()
    out = capsys.readouterr().out
    as_of = pd.Timestamp((sim_dir / "snapshot.txt").read_text().strip())
    events = pd.read_parquet(sim_dir / "events.parquet", columns=["ts", "event"])
    start, end = as_of - timedelta(days=21), as_of - timedelta(hours=24)
    held = int(((events["event"] == "send") & (events["ts"] > start) & (events["ts"] <= end)).sum())
    scored = int(re.search(r"scored on ([\d,]+) later sends", out).group(1).replace(",", ""))
    unknown = int(re.search(r"\(([\d,]+) sends to users first seen after it", out).group(1).replace(",", ""))
    assert scored + unknown == held and scored > 0.9 * held
    rows = [line.split() for line in out.splitlines() if re.match(r"\s+0\.(00|45)\s", line)]
    assert [row[0] for row in rows] == ["0.00", "0.45"]
    for row in rows:
        per_open, per_send, capture = float(row[1]), float(row[2]), float(row[3].rstrip(","))
        assert np.isfinite([per_open, per_send]).all() and per_open < 0 and per_send < 0
        assert 0 < capture <= 1
