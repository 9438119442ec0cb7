"""Why a user is at risk, in words a CRM team acts on: the features that push each user's
churn score up the most (SHAP contributions computed by the tree libraries themselves),
phrased from the user's own values with the wording each feature family declares."""

from __future__ import annotations

import numpy as np

from features.families import Column, phrase

__all__ = ["top_reasons"]


def top_reasons(contributions: np.ndarray, x: np.ndarray, names: list[str], k: int,
                catalog: dict[str, Column], categories: dict[str, tuple[str, ...]] | None = None,
                ) -> list[list[str]]:
    """For each row, the k features with the largest positive contribution, phrased.

    ``contributions`` is (n_rows, n_features [+ bias]) from pred_contrib; only pushes
    toward churn count as reasons.
    """
    contrib = contributions[:, : len(names)]
    order = np.argsort(-contrib, axis=1)[:, :k]
    out = []
    for i, row in enumerate(order):
        out.append([phrase(catalog, names[j], x[i, j], (categories or {}).get(names[j]))
                    for j in row if contrib[i, j] > 0])
    return out
