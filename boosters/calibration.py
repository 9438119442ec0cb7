"""Applying a stored calibrator: plain data (isotonic knots or sigmoid coefficients)
fitted by ``training.calibration`` and stored with the model; serving applies it.

An open model's calibrator may also carry a blend with one of its own inputs,
``rhythm_blend = {"weight": w, "index": j, "feature": name}``: the probability is then
``sigmoid((1 - w) logit(calibrated) + w logit(x[:, j]))``, x[:, j] being the learned rhythm's
open rate at the row's slot (``slot_rhythm_expected``). The trees learn from sends, which went
out at the few hours the sender chose; the rhythm is learned from every hour's sessions and
answers, so it ranks a user's other hours better than the trees extrapolate them."""

from __future__ import annotations

import numpy as np

__all__ = ["apply_calibration", "blend_input"]


def blend_input(calibrator: dict, x: np.ndarray) -> np.ndarray | None:
    """A copy of the input column the calibrator blends with (None: no blend). Taken before
    predicting: compiled trees may overwrite their input."""
    blend = calibrator.get("rhythm_blend")
    if not blend or not blend.get("weight"):
        return None
    return np.array(x[:, int(blend["index"])], dtype=float)


def apply_calibration(p: np.ndarray, calibrator: dict, anchor: np.ndarray | None = None) -> np.ndarray:
    """Map raw probabilities through a stored calibrator; ``anchor``: :func:`blend_input` of
    the same rows, when the calibrator blends."""
    p = np.clip(np.asarray(p, dtype=float), 1e-6, 1 - 1e-6)
    kind = calibrator.get("kind", "none")
    if kind == "isotonic":
        # the tiny raw-score term keeps isotonic plateaus from tying slots of one user
        out = np.interp(p, calibrator["x"], calibrator["y"]) + 1e-6 * p
    elif kind == "sigmoid":
        z = calibrator["a"] * np.log(p / (1 - p)) + calibrator["b"]
        out = 1.0 / (1.0 + np.exp(-z))
    else:
        out = p
    out = np.clip(out, 1e-6, 1 - 1e-6)
    blend = calibrator.get("rhythm_blend")
    if blend and blend.get("weight"):
        if anchor is None:
            raise ValueError(f"this calibrator blends with the input {blend.get('feature')!r}: pass its column")
        w = float(blend["weight"])
        a = np.clip(np.asarray(anchor, dtype=float), 1e-6, 1 - 1e-6)
        z = (1 - w) * np.log(out / (1 - out)) + w * np.log(a / (1 - a))
        # a row without the input (NaN) keeps the model's own probability
        out = np.where(np.isfinite(a), np.clip(1.0 / (1.0 + np.exp(-z)), 1e-6, 1 - 1e-6), out)
    return out
