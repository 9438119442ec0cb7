"""TreeSHAP contributions of a LightGBM model for many rows, tree by tree over the distinct
ways the rows meet each tree.

Path-dependent TreeSHAP reads a row only through the side it takes at each split of the
tree (it walks every node, weighting the side the row does not take by cover). So two rows
that take the same side at every split of a tree get the same contributions from it, and
thousands of users at risk meet a tree in far fewer ways than there are users. Each tree's
contributions are computed by LightGBM itself (``pred_contrib`` on that one tree) once per
distinct way, then added to every row that meets the tree that way.

The sides follow LightGBM's numerical decision: an input within 1e-35 of zero reads as 0;
NaN goes the default way where the split's missing type is NaN and reads as 0 otherwise; 0
goes the default way where the missing type is Zero; else left when ``x <= threshold``.

Measured on the high-risk users of a simulated log (156 trees of up to 31 leaves, depth up
to 17): 3.4x fewer (row, tree) evaluations at 13k users, more at more users. The sums are
LightGBM's up to the order of additions (LightGBM adds every leaf's share into one running
total across trees; here each tree's total is added to the row's): they agree to 1e-14 in
absolute terms, and the reasons ranked from them are the same.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["DEDUPE_MIN_ROWS", "contributions_by_tree"]

# below this, one pred_contrib call over all rows costs less than the bookkeeping
DEDUPE_MIN_ROWS = 2000
# LightGBM's kZeroThreshold: its row reader reads |x| <= it as 0
_ZERO = float(np.float32(1e-35))


def _numeric_splits(model_text: str) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]] | None:
    """(split features, thresholds, decision types) of each tree; None when a tree has a
    categorical split or linear leaves (whose values read the row beyond its splits)."""
    blocks: list[dict[str, str]] = []
    for line in model_text.splitlines():
        if line.startswith("Tree="):
            blocks.append({})
        elif line.startswith("end of trees"):
            break
        elif blocks and "=" in line:
            key, value = line.split("=", 1)
            blocks[-1][key] = value
    trees = []
    for block in blocks:
        kinds = np.array(block.get("decision_type", "").split(), dtype=np.int64)
        if int(block.get("num_cat", "0")) or (kinds & 1).any() or block.get("is_linear", "0").strip() == "1":
            return None
        trees.append((np.array(block.get("split_feature", "").split(), dtype=np.int64),
                      np.array(block.get("threshold", "").split(), dtype=np.float64), kinds))
    return trees


def contributions_by_tree(booster: Any, x: np.ndarray, threads: int = 1) -> np.ndarray:
    """``booster.predict(x, pred_contrib=True)`` for a binary LightGBM model, each tree
    evaluated once per distinct way the rows meet it: (n_rows, n_features + 1).

    ``threads``: trees are shared out between this many threads (tree t to thread t mod
    threads, each with its own copy of the booster: LightGBM keeps the asked range of trees
    on the booster while it predicts), and their totals added in thread order."""
    n, width = x.shape
    text = booster.model_to_string()
    trees = _numeric_splits(text) if booster.num_model_per_iteration() == 1 else None
    if n < DEDUPE_MIN_ROWS or trees is None or len(trees) != booster.num_trees():
        return np.asarray(booster.predict(x, pred_contrib=True, num_threads=0))
    columns = np.asarray(x, dtype=np.float64).T
    # each feature's class: its interval among every threshold any tree puts on it, then
    # one class for what LightGBM reads as 0 and one for NaN
    every: dict[int, list[np.ndarray]] = {}
    for features, thresholds, _ in trees:
        for f in np.unique(features):
            every.setdefault(int(f), []).append(thresholds[features == f])
    cuts, rank = {}, {}
    for f, parts in every.items():
        cuts[f] = np.unique(np.concatenate(parts))
        values = columns[f]
        r = np.searchsorted(cuts[f], values, side="left")
        r[np.abs(values) <= _ZERO] = len(cuts[f]) + 1
        r[np.isnan(values)] = len(cuts[f]) + 2
        rank[f] = r
    threads = max(1, min(threads, len(trees)))

    def share(part: int) -> np.ndarray:
        own = booster if threads == 1 else type(booster)(model_str=text)
        total = np.zeros((width + 1, n))
        for t in range(part, len(trees), threads):
            features, thresholds, kinds = trees[t]
            used = np.unique(features)
            key, room = np.zeros(n, dtype=np.int64), 1
            for f in used:
                ways, radix = _ways(cuts[f], thresholds[features == f], kinds[features == f])
                room *= radix
                if room < 2 ** 62:
                    key = key * radix + ways[rank[f]]
            if room >= 2 ** 62:   # too many ways to number them: each row meets this tree on its own
                back = first = np.arange(n)
            else:
                back, distinct = pd.factorize(key)
                first = np.empty(len(distinct), dtype=np.int64)
                first[back] = np.arange(n)   # any row of a way stands for it
            phi = np.asarray(own.predict(x[first], pred_contrib=True, start_iteration=t, num_iteration=1,
                                         num_threads=1))
            for c in np.append(used, width):   # a tree adds nothing to the features it does not use
                total[c] += phi[:, c][back]
        return total

    if threads == 1:
        out = share(0)
    else:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            parts = list(pool.map(share, range(threads)))
        out = parts[0]
        for part in parts[1:]:
            out += part
    return np.ascontiguousarray(out.T)


def _ways(cuts: np.ndarray, thresholds: np.ndarray, kinds: np.ndarray) -> tuple[np.ndarray, int]:
    """For each class of a feature (its intervals among ``cuts``, then "reads as 0", then
    NaN), which way it goes through a tree's splits on that feature, numbered densely."""
    k = np.searchsorted(cuts, thresholds)          # each split's threshold is cuts[k]
    classes = np.arange(len(cuts) + 1)[:, None]    # interval r: (cuts[r-1], cuts[r]]
    regular = classes <= k[None, :]                # left when x <= threshold
    default_left = (kinds & 2) > 0
    missing = (kinds >> 2) & 3                     # 0: none, 1: zero, 2: NaN
    zero_left = np.where(missing == 1, default_left, 0.0 <= thresholds)
    nan_left = np.where(missing == 2, default_left, zero_left)   # elsewhere NaN reads as 0
    sides = np.vstack([regular, zero_left[None, :], nan_left[None, :]])
    _, ways = np.unique(sides, axis=0, return_inverse=True)
    return ways.reshape(-1), int(ways.max()) + 1
