"""Stable cluster ids across rounds (DESIGN.md §1.5): match new clusters to the previous round's ids.

The gate's cluster table is indexed by cluster id, so a refreshed round must give "the same" cluster the same id.
A Hungarian assignment (``scipy.optimize.linear_sum_assignment``) pairs new with old clusters:

- ``centroids``: on the squared distance between centroids, when both rounds live in the same feature space
  (same feature source family and width), as the design asks;
- ``overlap``: on the number of images the two clusters share, when the feature spaces differ (e.g. the first
  refresh from the encoder after a round made from pixel features), where centroid distances mean nothing.

No matching when k differs (the gate table would not fit the new round anyway).
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment

__all__ = ["apply_matching", "match_by_centroids", "match_by_overlap"]


def match_by_centroids(new: np.ndarray, old: np.ndarray) -> np.ndarray:
    """new, old float [k, d] -> perm int64 [k]: new cluster j takes the old id perm[j] (minimum total distance)."""
    if new.shape != old.shape:
        raise ValueError(f"centroid matching needs equal shapes, got {new.shape} and {old.shape}")
    new64, old64 = new.astype(np.float64), old.astype(np.float64)
    cost = (new64 * new64).sum(1)[:, None] - 2.0 * new64 @ old64.T + (old64 * old64).sum(1)[None, :]  # [k_new, k_old]
    rows, cols = linear_sum_assignment(cost)
    perm = np.empty(new.shape[0], np.int64)
    perm[rows] = cols
    return perm


def match_by_overlap(new_ids: np.ndarray, old_ids: np.ndarray, k: int) -> np.ndarray:
    """new_ids, old_ids int [num_images] (-1 = none; tables of any length, compared on the common prefix)
    -> perm int64 [k]: new cluster j takes the old id perm[j] (maximum number of images keeping their id)."""
    m = min(new_ids.shape[0], old_ids.shape[0])
    a, b = np.asarray(new_ids[:m], np.int64), np.asarray(old_ids[:m], np.int64)
    both = (a >= 0) & (b >= 0) & (b < k)
    overlap = np.bincount(a[both] * k + b[both], minlength=k * k).reshape(k, k)  # [new, old] shared images
    rows, cols = linear_sum_assignment(-overlap)
    perm = np.empty(k, np.int64)
    perm[rows] = cols
    return perm


def apply_matching(perm: np.ndarray, centroids: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Relabel: centroids [k, d] -> row perm[j] holds new centroid j; ids [num_images] j -> perm[j] (-1 stays)."""
    out_c = np.empty_like(centroids)
    out_c[perm] = centroids
    ids = np.asarray(ids)
    out_ids = np.where(ids >= 0, perm[np.maximum(ids, 0)], -1).astype(ids.dtype)
    return out_c, out_ids
