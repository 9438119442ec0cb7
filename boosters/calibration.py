"""Applying a stored calibrator: plain data (isotonic knots or sigmoid coefficients)
fitted by ``training.calibration`` and stored with the model; serving applies it."""

from __future__ import annotations

import numpy as np

__all__ = ["apply_calibration"]


def apply_calibration(p: np.ndarray, calibrator: dict) -> np.ndarray:
    """Map raw probabilities through a stored calibrator."""
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
    return np.clip(out, 1e-6, 1 - 1e-6)
