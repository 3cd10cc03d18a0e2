"""k-means with k-means++ initialisation and FAISS flat-index assignment.

One core for one process now; the per-iteration reduction (cluster sums, counts, objective) goes through a
``reduce`` hook (an all-reduce sum over ranks, identity by default) so an mpi4py or torch.distributed version can
reuse this code by passing its communicator's all-reduce and its local shard of ``x``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import faiss
import numpy as np
import scipy.sparse as sp

__all__ = ["KMeansResult", "assign", "kmeans", "kmeans_plus_plus"]

logger = logging.getLogger("moce_ds")

Reduce = Callable[[np.ndarray], np.ndarray]


@dataclass
class KMeansResult:
    centroids: np.ndarray  # float32 [k, d]
    assignments: np.ndarray  # int64 [N]
    objective: list[float] = field(default_factory=list)  # mean squared distance to the assigned centroid, per iter
    sizes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # int64 [k]


def _as_f32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x, dtype=np.float32))


def _normalise(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def _search(x: np.ndarray, centroids: np.ndarray, spherical: bool) -> tuple[np.ndarray, np.ndarray]:
    """-> nearest centroid int64 [N], squared L2 distance float32 [N] (rows unit norm when spherical)."""
    d = centroids.shape[1]
    index = faiss.IndexFlatIP(d) if spherical else faiss.IndexFlatL2(d)
    index.add(centroids)
    score, idx = index.search(x, 1)  # [N, 1] each
    if spherical:
        sq = 2.0 - 2.0 * score[:, 0]  # |x - c|^2 for unit x, c
    else:
        sq = score[:, 0]
    return idx[:, 0].astype(np.int64), np.maximum(sq, 0.0).astype(np.float32)


def assign(x: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid by L2: x [N, d], centroids [k, d] -> assignments int64 [N], sq_dist float32 [N]."""
    return _search(_as_f32(x), _as_f32(centroids), spherical=False)


def kmeans_plus_plus(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Greedy k-means++ seeding (Arthur & Vassilvitskii; 2 + log k candidates per step as in sklearn) -> [k, d]."""
    n = x.shape[0]
    trials = 2 + int(math.log(k)) if k > 1 else 1
    sq_norms = np.einsum("ij,ij->i", x, x)
    centers = np.empty((k, x.shape[1]), np.float32)
    first = int(rng.integers(n))
    centers[0] = x[first]
    closest = np.maximum(sq_norms - 2.0 * x @ x[first] + sq_norms[first], 0.0)  # [N] squared distance to nearest
    for c in range(1, k):
        total = float(closest.sum())
        if total <= 0.0:  # all points coincide with chosen centres: any point will do
            cand = rng.integers(n, size=trials)
        else:
            cand = np.searchsorted(np.cumsum(closest, dtype=np.float64), rng.random(trials) * total)
            cand = np.minimum(cand, n - 1)
        # [trials, N] squared distances to each candidate; keep the candidate that lowers the potential most
        d_cand = np.maximum(sq_norms[None, :] - 2.0 * x[cand] @ x.T + sq_norms[cand][:, None], 0.0)
        pots = np.minimum(closest[None, :], d_cand)
        best = int(np.argmin(pots.sum(axis=1)))
        centers[c] = x[cand[best]]
        closest = pots[best]
    return centers


def kmeans(
    x: np.ndarray,
    k: int,
    iters: int = 25,
    seed: int = 0,
    spherical: bool = False,
    tol: float = 1e-4,
    reduce: Reduce | None = None,
) -> KMeansResult:
    """Lloyd's k-means on x float [N, d].

    k-means++ initialisation (seeded), FAISS flat search (L2, or inner product when ``spherical``: rows and
    centroids L2-normalised) for the assignment, empty clusters re-seeded from the points farthest from their
    centroids, stop when the objective's relative change drops below ``tol``. ``objective[i]`` is the mean squared
    distance to the assigned centroid at iteration i; the returned assignments are the nearest of the returned
    centroids. ``reduce`` sums an array over ranks (identity for one process); with several ranks, seeding and
    re-seeding happen on each rank's local points, so a distributed caller must broadcast them from one rank.
    """
    x = _as_f32(x)
    if x.ndim != 2:
        raise ValueError(f"kmeans expects x of shape [N, d], got {x.shape}")
    n, d = x.shape
    if not 1 <= k <= n:
        raise ValueError(f"kmeans needs 1 <= k <= N, got k={k} for N={n}")
    if spherical:
        x = _normalise(x)
    red: Reduce = reduce if reduce is not None else (lambda a: a)
    rng = np.random.default_rng(seed)
    centroids = kmeans_plus_plus(x, k, rng)
    objective: list[float] = []
    assignments, sq = _search(x, centroids, spherical)
    for it in range(iters):
        # one reduction per iteration: [k*d sums | k counts | sum of sq distances | N]
        onehot = sp.csr_matrix((np.ones(n, np.float64), (assignments, np.arange(n))), shape=(k, n))
        local = np.concatenate(
            [
                (onehot @ x.astype(np.float64)).ravel(),
                np.bincount(assignments, minlength=k),
                [float(sq.sum(dtype=np.float64)), float(n)],
            ]
        )
        tot = red(local)
        sums, counts = tot[: k * d].reshape(k, d), tot[k * d : k * d + k]
        objective.append(float(tot[-2] / tot[-1]))
        if it > 0 and abs(objective[-2] - objective[-1]) <= tol * max(objective[-2], 1e-12):
            break
        if it == iters - 1:
            break  # keep assignments consistent with these centroids
        new = (sums / np.maximum(counts, 1.0)[:, None]).astype(np.float32)
        empty = np.flatnonzero(counts == 0)
        if empty.size:
            # re-seed each empty cluster with a distinct point among those worst served by their centroid
            far = np.argsort(-sq, kind="stable")[: empty.size]
            new[empty] = x[far]
            logger.debug("kmeans iter %d: re-seeded %d empty clusters", it, empty.size)
        if spherical:
            new = _normalise(new)
        centroids = new
        assignments, sq = _search(x, centroids, spherical)
    sizes = red(np.bincount(assignments, minlength=k).astype(np.float64)).astype(np.int64)
    return KMeansResult(centroids=centroids, assignments=assignments, objective=objective, sizes=sizes)
