"""Why a user is at risk, in words a CRM team acts on: the features that push each user's
churn score up the most (SHAP contributions computed by the tree libraries themselves),
phrased from the user's own values with the wording each feature family declares."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from features.families import Column, phrase

__all__ = ["Reasons", "rank_reasons", "top_reasons"]


@dataclass
class Reasons:
    """Each row's reasons, strongest first: ``words[i, :counts[i]]`` (``words`` is (n, k),
    None past a row's count)."""

    words: np.ndarray     # (n, k) object
    counts: np.ndarray    # (n,) int

    def lists(self) -> list[list[str]]:
        return [row[:c].tolist() for row, c in zip(self.words, self.counts)]

    def flat(self) -> np.ndarray:
        """Every row's reasons one after the other (the values of a list column)."""
        keep = np.arange(self.words.shape[1])[None, :] < self.counts[:, None]
        return self.words[keep]

    @classmethod
    def concat(cls, parts: list[Reasons], k: int) -> Reasons:
        if not parts:
            return cls(words=np.empty((0, k), dtype=object), counts=np.zeros(0, dtype=np.int64))
        return cls(words=np.concatenate([p.words for p in parts]), counts=np.concatenate([p.counts for p in parts]))


def rank_reasons(contributions: np.ndarray, x: np.ndarray, names: list[str], k: int,
                 catalog: dict[str, Column], categories: dict[str, tuple[str, ...]] | None = None) -> Reasons:
    """For each row, the k features with the largest positive contribution, phrased.

    ``contributions`` is (n_rows, n_features [+ bias]) from pred_contrib; only pushes
    toward churn count as reasons. Each distinct (feature, value) is phrased once.
    """
    contrib = contributions[:, : len(names)]
    order = np.argsort(-contrib, axis=1)[:, :k]
    # descending order: a row's positive pushes come first
    counts = (np.take_along_axis(contrib, order, axis=1) > 0).sum(axis=1)
    chosen = np.arange(order.shape[1])[None, :] < counts[:, None]
    values = np.take_along_axis(x, order, axis=1)
    words = np.full(order.shape, None, dtype=object)
    cats = categories or {}
    for j in np.unique(order[chosen]):
        where = chosen & (order == j)
        picked = values[where]
        # distinct by bits: -0.0 and 0.0 may read differently
        _, first, back = np.unique(picked.view(f"u{picked.itemsize}"), return_index=True, return_inverse=True)
        said = np.array([phrase(catalog, names[j], v, cats.get(names[j])) for v in picked[first]], dtype=object)
        words[where] = said[back.reshape(-1)]
    return Reasons(words=words, counts=counts.astype(np.int64))


def top_reasons(contributions: np.ndarray, x: np.ndarray, names: list[str], k: int,
                catalog: dict[str, Column], categories: dict[str, tuple[str, ...]] | None = None,
                ) -> list[list[str]]:
    """For each row, the k features with the largest positive contribution, phrased
    (:func:`rank_reasons` as lists)."""
    return rank_reasons(contributions, x, names, k, catalog, categories).lists()
