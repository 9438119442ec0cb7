"""Which share of each user's engagement is nobody's rhythm? ``features.rhythm_background_share``
chosen from a log's own later sends, without any truth.

    .venv/bin/python benchmarks/rhythm_background.py --events E [--users U] [--config C]
        [--as-of T] [--hold-days 28] [--shares 0,0.15,0.3,0.45,0.6] [--truth TRUTH.parquet]

For each share, the rhythm basis is fitted on the log up to ``T - hold days`` and each user's
open rhythm is read from their evidence then (as ``sendtime features`` would at that time);
it is then scored on the sends of the following ``hold days`` (opened within the attribution
window, known by T): where each user's opens fell among their own sends (log-likelihood per
open: the rhythm's ranking of the hours the sender tried, the user's level left out), and
every send's outcome under ``rhythm_expected`` (Bernoulli log-likelihood per send). The
highest is the log's choice. These sends are the sender's, at its few hours, so the scores
see only those hours; a simulated log can be checked against its truth with ``--truth``
(``rhythm_expected``'s own slot capture and log loss over the oracle's at T, on the users
whose best slot's probability is over 0.01).
"""

from __future__ import annotations

import argparse
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import pandas as pd

from configs import load_config
from features.attribution import attributed_sends_sql
from features.events import open_log
from features.matrix import configured_rhythm_families, fit_rhythm, rhythm_inputs
from features.state import build_state
from simulator.judge import expected_log_loss, slot_capture


def _families(state, cfg, share: float) -> dict[str, np.ndarray]:
    """rhythm_open and rhythm_expected of every user of ``state``, as configured but with this
    background share."""
    cfg = _with_share(cfg, share)
    activity, sends, opened = rhythm_inputs(state)
    basis = fit_rhythm(activity, sends, opened, state.user_ids, cfg)
    return configured_rhythm_families(basis, activity, sends, opened, cfg, ("rhythm_open", "rhythm_expected"))


def _with_share(cfg, share: float):
    return cfg.model_copy(update={"features": cfg.features.model_copy(update={"rhythm_background_share": share})})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=Path, required=True)
    parser.add_argument("--users", type=Path, default=None)
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument("--as-of", default=None, help="T (default: snapshot.txt beside the events, else the last event)")
    parser.add_argument("--hold-days", type=int, default=28, help="the later sends scored (default 28)")
    parser.add_argument("--shares", default="0,0.15,0.3,0.45,0.6", help="background shares tried")
    parser.add_argument("--truth", type=Path, default=None, help="a simulated log's truth.parquet (optional check)")
    args = parser.parse_args()
    started = time.perf_counter()
    cfg = load_config(args.config)
    shares = [float(x) for x in args.shares.split(",")]
    log = open_log(args.events, args.users, default_timezone=cfg.slots.default_timezone)
    snapshot = args.events.parent / "snapshot.txt"
    if args.as_of:
        as_of = pd.Timestamp(args.as_of)
    elif snapshot.exists():
        as_of = pd.Timestamp(snapshot.read_text().strip())
    else:
        as_of = pd.Timestamp(log.max_ts())
    as_of = (as_of.tz_localize("UTC") if as_of.tzinfo is None else as_of.tz_convert("UTC")).to_pydatetime()
    start = as_of - timedelta(days=args.hold_days)
    window = cfg.labels.open_attribution_hours
    state = build_state(log, start, cfg)
    held = log.query_df(attributed_sends_sql(start, as_of - timedelta(hours=window), as_of, window, cfg.slots.kind))
    rows = pd.Index(state.user_ids).get_indexer(held["user_id"])
    unknown = int((rows < 0).sum())     # sends to users first seen after the fit: no rhythm to score
    held = held[rows >= 0]
    rows = rows[rows >= 0]
    shape = (len(state), state.slots["sends"].shape[1])
    sent, opened = np.zeros(shape), np.zeros(shape)
    np.add.at(sent, (rows, held["slot"].to_numpy()), 1.0)
    np.add.at(opened, (rows, held["slot"].to_numpy()), held["opened"].to_numpy().astype(float))
    answered = opened.sum(axis=1) > 0
    print(f"rhythm fitted as of {start:%Y-%m-%d %H:%M}; scored on {int(sent.sum()):,} later sends, "
          f"{int(opened.sum()):,} opened, of {int((sent.sum(axis=1) > 0).sum()):,} users "
          f"({unknown:,} sends to users first seen after it left out)")
    if args.truth is not None:
        truth = pd.read_parquet(args.truth)
        true_p = np.vstack(truth["true_open_probs"].to_numpy())
        state_t = build_state(log, as_of, cfg)
        at_t = pd.Index(state_t.user_ids).get_indexer(truth["user_id"])
        keep = (true_p.max(axis=1) > 0.01) & (at_t >= 0)
        t = true_p[keep]
        oracle = expected_log_loss(t, t)
    print(f"{'share':>6} {'where opens fell, per open':>27} {'outcomes, per send':>19}"
          + ("  truth at T: capture, over the oracle" if args.truth is not None else ""))
    for share in shares:
        families = _families(state, cfg, share)
        rhythm = families["rhythm_open"].astype(np.float64)[answered]
        n, o = sent[answered], opened[answered]
        where = n * rhythm / ((n * rhythm).sum(axis=1, keepdims=True) + 1e-300)
        per_open = float((o * np.log(np.where(o > 0, where, 1.0))).sum() / o.sum())
        expected = np.clip(families["rhythm_expected"].astype(np.float64), 1e-4, 0.999)
        per_send = float((opened * np.log(expected) + (sent - opened) * np.log1p(-expected)).sum() / sent.sum())
        line = f"{share:6.2f} {per_open:27.5f} {per_send:19.5f}"
        if args.truth is not None:
            q = np.clip(_families(state_t, cfg, share)["rhythm_expected"].astype(np.float64)[at_t[keep]], 1e-6, 0.999)
            line += f"  {slot_capture(t, q.argmax(axis=1)):.4f}, {expected_log_loss(t, q) / oracle - 1:+.2%}"
        print(line, flush=True)
    print(f"({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
