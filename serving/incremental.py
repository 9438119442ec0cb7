"""The refresh's features: yesterday's feature state moved forward when it can be, the
whole log read again when it cannot, and a sentence saying which and why.

The current refresh keeps its feature state (:mod:`features.state`) beside its tags. The
next refresh moves it forward from the events since, instead of reading the whole history
again, when three things hold: the state was built under the same configuration (slots,
labels, feature windows), the log's past is unchanged (the events up to the state's time
and the users table hash to what they did when it was saved: the log only grew), and the
new time is later by less than the shortest long window. Otherwise it rebuilds from the
whole log, which ``--full`` asks for outright.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from configs import Config
from features.events import EventLog
from features.matrix import PopulationPriors, UserMatrix, build_matrix
from features.state import (
    STATE_DIR,
    FeatureState,
    IncrementalMismatch,
    advance,
    build_state,
    config_fingerprint,
    log_fingerprints,
    only_grew,
    read_state,
)
from serving.tagstore import current_refresh

__all__ = ["RefreshFeatures", "refresh_features"]

logger = logging.getLogger(__name__)


@dataclass
class RefreshFeatures:
    matrix: UserMatrix
    priors: PopulationPriors
    state: FeatureState
    fingerprint: dict        # of the log up to the new as-of time (saved with the state)
    incremental: bool
    how: str                 # in words: moved forward from which refresh, or rebuilt and why
    seconds: float


def _saved_state(serving_dir: Path, as_of: datetime, cfg: Config) -> tuple[FeatureState | None, dict, str]:
    """The current refresh's state when it may be moved to ``as_of`` (else None and why)."""
    current = current_refresh(serving_dir)
    if current is None:
        return None, {}, "no refresh yet"
    meta_path = current.root / STATE_DIR / "state.json"
    if not meta_path.exists():
        return None, {}, f"refresh {current.refresh_id} kept no feature state"
    state, meta = read_state(current.root)
    if meta.get("config") != config_fingerprint(cfg):
        return None, meta, f"the configuration changed since refresh {current.refresh_id}"
    if state.as_of >= as_of:
        return None, meta, f"refresh {current.refresh_id} is as of {state.as_of}, not before {as_of}"
    return state, meta | {"refresh_id": current.refresh_id}, ""


def refresh_features(log: EventLog, as_of: datetime, cfg: Config, serving_dir: Path, *,
                     full: bool = False) -> RefreshFeatures:
    """The matrix as of ``as_of`` for the nightly refresh, moved forward from the current
    refresh's feature state when allowed (see the module's docstring), else built from the
    whole log."""
    clock = time.perf_counter()
    state, meta, why = (None, {}, "a full rebuild was asked for") if full else _saved_state(serving_dir, as_of, cfg)
    fingerprint: dict | None = None
    if state is not None:
        then, now = log_fingerprints(log, [state.as_of, as_of])
        changed = only_grew(meta.get("log") or {}, then)
        if changed:
            why = f"the log up to {state.as_of} is not the one refresh {meta['refresh_id']} read: {changed}"
            state = None
        else:
            fingerprint = now
            try:
                state = advance(log, state, as_of, cfg)
            except IncrementalMismatch as exc:
                why, state = str(exc), None
    incremental = state is not None
    if state is None:
        state = build_state(log, as_of, cfg)
        how = f"built from the whole log ({why})"
    else:
        how = f"moved forward from refresh {meta['refresh_id']} (as of {meta['as_of']}) with the events since"
    if fingerprint is None:
        fingerprint = log_fingerprints(log, [as_of])[0]
    matrix, priors = build_matrix(log, as_of, cfg, state=state)
    seconds = time.perf_counter() - clock
    logger.info("features of %d users as of %s %s in %.1f s", len(matrix), as_of, how, seconds)
    return RefreshFeatures(matrix=matrix, priors=priors, state=state, fingerprint=fingerprint,
                           incremental=incremental, how=how, seconds=seconds)
