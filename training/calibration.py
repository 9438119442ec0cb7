"""Fit a probability calibrator on time-held-out predictions, and keep it only where it
helps: a calibrator is tried on one half of the validation users and judged on the other.

The fitted calibrator is plain data (knots or coefficients) stored with the model; the
serving predictor applies it (``boosters.apply_calibration``).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.special import logit
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss

from boosters import apply_calibration

__all__ = ["RHYTHM_BLEND_FEATURE", "fit_calibrator", "with_rhythm_blend"]

_MAX_KNOTS = 200
# the input an open model's probabilities are blended with (boosters.calibration)
RHYTHM_BLEND_FEATURE = "slot_rhythm_expected"


def _fit(kind: str, p: np.ndarray, y: np.ndarray) -> dict:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    if kind == "isotonic":
        iso = IsotonicRegression(out_of_bounds="clip", y_min=1e-4, y_max=1 - 1e-4).fit(p, y)
        x, v = iso.X_thresholds_, iso.y_thresholds_
        if len(x) > _MAX_KNOTS:
            keep = np.unique(np.linspace(0, len(x) - 1, _MAX_KNOTS).astype(int))
            x, v = x[keep], v[keep]
        return {"kind": "isotonic", "x": x.tolist(), "y": v.tolist()}
    if kind == "sigmoid":
        lr = LogisticRegression(C=1e6).fit(logit(p).reshape(-1, 1), y)
        return {"kind": "sigmoid", "a": float(lr.coef_[0, 0]), "b": float(lr.intercept_[0])}
    return {"kind": "none"}


def fit_calibrator(kind: str, p_valid: np.ndarray, y_valid: np.ndarray, groups: np.ndarray) -> tuple[dict, dict]:
    """The calibrator to ship, and the evidence: held-out log loss with and without it."""
    if kind == "none":
        return {"kind": "none"}, {}
    # split by user, so one person's sends never sit on both sides
    half = pd.util.hash_array(np.asarray(groups, dtype=object)) % 2 == 0
    evidence = {}
    losses_raw, losses_cal = [], []
    for fit_mask in (half, ~half):
        if fit_mask.sum() < 50 or (~fit_mask).sum() < 50 or len(np.unique(y_valid[fit_mask])) < 2:
            continue
        cal = _fit(kind, p_valid[fit_mask], y_valid[fit_mask])
        test = ~fit_mask
        losses_raw.append(log_loss(y_valid[test], np.clip(p_valid[test], 1e-6, 1 - 1e-6), labels=[0, 1]))
        losses_cal.append(log_loss(y_valid[test], apply_calibration(p_valid[test], cal), labels=[0, 1]))
    if not losses_raw:
        return {"kind": "none"}, {}
    evidence = {"calibration_crossfit_raw_log_loss": float(np.mean(losses_raw)),
                "calibration_crossfit_cal_log_loss": float(np.mean(losses_cal))}
    if evidence["calibration_crossfit_cal_log_loss"] < evidence["calibration_crossfit_raw_log_loss"]:
        return _fit(kind, p_valid, y_valid), evidence
    return {"kind": "none"}, evidence


def with_rhythm_blend(calibrator: dict, names: list[str], weight: float) -> dict:
    """The calibrator with the blend of ``boosters.calibration`` (weight ``weight`` on the
    learned rhythm's open rate at the slot), when the model reads that input; as it was
    otherwise. The weight travels with the model: a later config does not change a
    registered version's numbers."""
    if weight <= 0 or RHYTHM_BLEND_FEATURE not in names:
        return calibrator
    return {**calibrator, "rhythm_blend": {"weight": float(weight), "feature": RHYTHM_BLEND_FEATURE,
                                           "index": names.index(RHYTHM_BLEND_FEATURE)}}
