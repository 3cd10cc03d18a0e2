"""Data-parallel Lloyd k-means: k-means++ initialisation, nearest-centroid assignment, empty-cluster re-seeding.

One implementation for one process, an ``mpirun`` job and the in-training refresh: every rank holds its own rows
of ``x`` and talks to the others only through a :class:`~moce_ds.clustering.comm.Communicator` (one all-reduce of
``[k*d sums | k counts | objective | N]`` per iteration; initial and re-seeded centroids are chosen on rank 0
and broadcast, so all ranks always hold identical centroids).

Assignment ("search") backends, picked per device by :func:`pick_backend`:

- ``torch``: blocked ``addmm(|c|^2, x, C^T, alpha=-2)`` + ``min`` (inner product + ``max`` when spherical) through
  torch's BLAS (MKL on x86), on CUDA when torch sees a GPU; the CPU default. Blocks of score rows are kept at
  ~2 MB so the ``min`` reads them from cache (64 MB blocks ran 40 % slower). faiss-cpu's flat search is no faster
  on CPU: its wheel bundles OpenBLAS 0.3.15 (OpenMP build) under faiss's own OpenMP pool, and with one thread it
  runs about as fast as this path, while with 2 threads on a loaded 2-core box it fell to 50-60 % of the matmul
  peak (fork-join regions wait for the slowest thread); benchmarks/README.md has the figures.
- ``faiss``: exact ``IndexFlat`` search; the default when faiss sees a GPU (faiss-gpu), where it wins.
- ``faiss_ivf``: approximate ``IndexIVFFlat`` over the centroids, for very large k (>= ``IVF_MIN_K``).
"""

from __future__ import annotations

import logging
import math
import sys
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
import torch
from tqdm import tqdm

from moce_ds.clustering.comm import Communicator, LocalComm

__all__ = ["BACKENDS", "IVF_MIN_K", "KMeansResult", "assign", "kmeans", "kmeans_plus_plus", "pick_backend",
           "unit_rows"]

logger = logging.getLogger("moce_ds")

BACKENDS = ("auto", "torch", "faiss", "faiss_ivf")
IVF_MIN_K = 65536  # below this an exact flat search over the centroids is cheap enough
_BLOCK_BYTES = 2 << 20  # score block [rows, k] float32: small enough to stay in cache for the min (64 MB: -40 %)


@dataclass
class KMeansResult:
    centroids: np.ndarray  # float32 [k, d], identical on every rank
    assignments: np.ndarray  # int64 [N_local]: this rank's rows
    objective: list[float] = field(default_factory=list)  # global mean squared distance to the assigned centroid
    sizes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # int64 [k], global
    reseeded: int = 0  # empty clusters re-seeded over all iterations
    backend: str = ""


def _as_f32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x, dtype=np.float32))


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (float32): the spherical k-means space."""
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def _faiss_gpus() -> int:
    try:
        import faiss

        return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    except ImportError:
        return 0


def pick_backend(k: int, backend: str = "auto") -> str:
    """``auto`` -> faiss on a faiss GPU, faiss_ivf for very large k, else torch (CPU or CUDA)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown k-means backend {backend!r}; one of {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    if _faiss_gpus() > 0:
        return "faiss"
    if k >= IVF_MIN_K:
        return "faiss_ivf"
    return "torch"


def _search_torch(x: np.ndarray, centroids: np.ndarray, spherical: bool) -> tuple[np.ndarray, np.ndarray]:
    dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    c = torch.from_numpy(centroids).to(dev)  # [k, d]
    k = c.shape[0]
    c_sq = (c * c).sum(1)  # [k]
    rows = max(256, _BLOCK_BYTES // (4 * k))
    idx = np.empty(x.shape[0], np.int64)
    sq = np.empty(x.shape[0], np.float32)
    for s in range(0, x.shape[0], rows):
        xb = torch.from_numpy(x[s : s + rows]).to(dev)  # [b, d]
        if spherical:
            best, arg = (xb @ c.T).max(1)  # max inner product = nearest on the unit sphere
            dist = 2.0 - 2.0 * best  # |x - c|^2 for unit x, c
        else:
            # |x - c|^2 = |x|^2 - 2 x.c + |c|^2: one GEMM (addmm) and one pass for the min; like faiss's flat
            # search, the expansion loses digits for points far from the origin relative to their spread
            best, arg = torch.addmm(c_sq, xb, c.T, alpha=-2.0).min(1)  # [b]
            dist = best + (xb * xb).sum(1)
        idx[s : s + rows] = arg.cpu().numpy()
        sq[s : s + rows] = dist.clamp_min_(0.0).cpu().numpy()
    return idx, sq


def _search_faiss(x: np.ndarray, centroids: np.ndarray, spherical: bool, ivf: bool) -> tuple[np.ndarray, np.ndarray]:
    import faiss

    k, d = centroids.shape
    metric = faiss.METRIC_INNER_PRODUCT if spherical else faiss.METRIC_L2
    if ivf:
        nlist = max(1, min(int(4 * math.sqrt(k)), k // 39))  # faiss wants >= 39 training points per list
        quantizer = faiss.IndexFlatIP(d) if spherical else faiss.IndexFlatL2(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, metric)
        index.train(centroids)
        index.nprobe = 16
    else:
        index = faiss.IndexFlatIP(d) if spherical else faiss.IndexFlatL2(d)
    if _faiss_gpus() > 0:
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(centroids)
    _, found = index.search(x, 1)  # [N, 1]
    idx = np.maximum(found[:, 0], 0).astype(np.int64)  # IVF may find nothing (-1) for a point: take centroid 0
    sq = ((x - centroids[idx]) ** 2).sum(1).astype(np.float32)  # the metric's own score differs when spherical
    return idx, sq


def _search(x: np.ndarray, centroids: np.ndarray, spherical: bool, backend: str) -> tuple[np.ndarray, np.ndarray]:
    """-> nearest centroid int64 [N], squared L2 distance to it float32 [N]."""
    if backend == "torch":
        return _search_torch(x, centroids, spherical)
    return _search_faiss(x, centroids, spherical, ivf=backend == "faiss_ivf")


def assign(x: np.ndarray, centroids: np.ndarray, spherical: bool = False,
           backend: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid: x [N, d], centroids [k, d] -> assignments int64 [N], squared L2 distance float32 [N].

    ``spherical``: rows and centroids are taken as unit norm (nearest by inner product).
    """
    c = _as_f32(centroids)
    return _search(_as_f32(x), c, spherical, pick_backend(c.shape[0], backend))


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


def _init_centroids(x: np.ndarray, k: int, seed: int, init_sample: int, comm: Communicator) -> np.ndarray:
    """k-means++ on rank 0 over a sample drawn from every rank in proportion to its rows; broadcast -> [k, d]."""
    counts = comm.allreduce_sum(np.eye(comm.world_size)[comm.rank] * x.shape[0]).astype(np.int64)  # [R] rows
    total = int(counts.sum())
    take = x.shape[0] if total <= init_sample else int(math.ceil(init_sample * x.shape[0] / total))
    rng = np.random.default_rng([seed, comm.rank])
    local = x if take >= x.shape[0] else x[np.sort(rng.choice(x.shape[0], take, replace=False))]
    parts = comm.gather(local)
    centroids = None
    if comm.rank == 0:
        sample = np.concatenate(parts)
        centroids = kmeans_plus_plus(sample, k, np.random.default_rng(seed))
    return comm.broadcast(centroids)


def _reseed(x: np.ndarray, sq: np.ndarray, num: int, comm: Communicator) -> np.ndarray:
    """``num`` distinct rows worst served by their centroid over all ranks, chosen on rank 0 -> [num, d].

    Ties break by (rank, row), so one process and several ranks holding the same rows in order pick the same.
    """
    order = np.argsort(-sq, kind="stable")[:num]
    parts = comm.gather((sq[order], order, x[order]))
    rows = None
    if comm.rank == 0:
        cand = [(-float(d), r, int(i), v) for r, (ds, ids, vs) in enumerate(parts) for d, i, v in zip(ds, ids, vs)]
        cand.sort(key=lambda t: t[:3])
        rows = np.stack([c[3] for c in cand[:num]]).astype(np.float32)
    return comm.broadcast(rows)


def kmeans(
    x: np.ndarray,
    k: int,
    iters: int = 25,
    seed: int = 0,
    spherical: bool = False,
    tol: float = 1e-4,
    comm: Communicator | None = None,
    init: np.ndarray | None = None,
    init_sample: int = 100_000,
    backend: str = "auto",
    progress: bool = False,
) -> KMeansResult:
    """Lloyd's k-means on this rank's rows x float [N_local, d]; every rank calls it with the same arguments.

    ``init`` [k, d]: start from these centroids (the same on every rank), else k-means++ on rank 0 over a sample of
    at most ``init_sample`` rows. ``spherical``: rows and centroids are L2-normalised (cosine k-means). Empty
    clusters are re-seeded with the rows farthest from their centroid. Stops when the objective's relative change
    drops to ``tol`` or after ``iters`` iterations. ``objective[i]`` is the global mean squared distance to the
    assigned centroid at iteration i; the returned assignments are the nearest of the returned centroids.
    """
    comm = comm if comm is not None else LocalComm()
    x = _as_f32(x)
    if x.ndim != 2:
        raise ValueError(f"kmeans expects x of shape [N, d], got {x.shape}")
    n, d = x.shape
    n_total = int(comm.allreduce_sum(np.array([n], np.float64))[0])
    if not 1 <= k <= n_total:
        raise ValueError(f"kmeans needs 1 <= k <= N, got k={k} for N={n_total}")
    if spherical:
        x = unit_rows(x)
    backend = pick_backend(k, backend)
    if init is not None:
        centroids = _as_f32(init)
        if centroids.shape != (k, d):
            raise ValueError(f"init centroids must have shape ({k}, {d}), got {centroids.shape}")
    else:
        centroids = _init_centroids(x, k, seed, init_sample, comm)
    if spherical:
        centroids = unit_rows(centroids)
    objective: list[float] = []
    reseeded = 0
    assignments, sq = _search(x, centroids, spherical, backend)
    quiet = not progress or comm.rank != 0 or not sys.stderr.isatty()  # progress on rank 0, on a terminal
    bar = tqdm(total=iters, desc=f"k-means k={k}", disable=quiet, leave=False)
    for it in range(iters):
        # one reduction per iteration: [k*d sums | k counts | sum of sq distances | N]
        onehot = sp.csr_matrix((np.ones(n, np.float64), (assignments, np.arange(n))), shape=(k, n))
        local = np.concatenate([
            (onehot @ x.astype(np.float64)).ravel(),
            np.bincount(assignments, minlength=k),
            [float(sq.sum(dtype=np.float64)), float(n)],
        ])
        tot = comm.allreduce_sum(local)
        sums, counts = tot[: k * d].reshape(k, d), tot[k * d : k * d + k]
        objective.append(float(tot[-2] / tot[-1]))
        bar.update(1)
        bar.set_postfix(objective=f"{objective[-1]:.5g}")
        if it > 0 and abs(objective[-2] - objective[-1]) <= tol * max(objective[-2], 1e-12):
            break
        if it == iters - 1:
            break  # keep assignments consistent with these centroids
        new = (sums / np.maximum(counts, 1.0)[:, None]).astype(np.float32)
        empty = np.flatnonzero(counts == 0)  # the same on every rank: counts are global
        if empty.size:
            new[empty] = _reseed(x, sq, int(empty.size), comm)
            reseeded += int(empty.size)
            logger.debug("kmeans iter %d: re-seeded %d empty clusters", it, empty.size)
        if spherical:
            new = unit_rows(new)
        centroids = new
        assignments, sq = _search(x, centroids, spherical, backend)
    bar.close()
    sizes = comm.allreduce_sum(np.bincount(assignments, minlength=k).astype(np.float64)).astype(np.int64)
    return KMeansResult(centroids=centroids, assignments=assignments, objective=objective, sizes=sizes,
                        reseeded=reseeded, backend=backend)
