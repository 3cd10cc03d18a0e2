"""Data-parallel Lloyd k-means on FAISS: k-means++ initialisation, nearest-centroid assignment, empty-cluster
re-seeding, rows read in chunks so they may be a memory-mapped ``.npy`` (out of core).

One implementation for one process, an ``mpirun`` job and the in-training refresh: every rank holds its own rows
of ``x`` and talks to the others only through a :class:`~moce_ds.clustering.comm.Communicator` (one all-reduce of
``[k*d sums | k counts | objective | N]`` per iteration; initial and re-seeded centroids are chosen on rank 0
and broadcast, so all ranks always hold identical centroids).

One iteration is one pass over the rows in chunks of ~``CHUNK_BYTES``: each chunk is searched against the
centroids and its rows are added into per-cluster float32 sums (sparse one-hot matmul), which are folded into float64
k x d sums; no copy of all rows is ever made, so peak memory is the rows' bytes (resident pages of a memmap) plus
a bounded working set (one chunk, k x d sums, 12 bytes per row for assignments and distances).

Assignment ("search") backends, picked by :func:`pick_backend`:

- ``faiss``: exact flat search (``IndexFlatIP`` when spherical, ``IndexFlatL2`` otherwise); on faiss-gpu the
  index lives on this rank's own GPU, with one ``StandardGpuResources`` for the whole k-means. The default:
  measured at 1.28 M x 768 -> 256 on 2 cores it runs within a few % of ``faiss.Kmeans`` per iteration, while
  the torch path was 5.6x slower with a float64 update (benchmarks/results/kmeans.jsonl).
- ``faiss_ivf``: approximate ``IndexIVFFlat`` over the centroids, for very large k (>= ``IVF_MIN_K``).
- ``torch``: blocked matmul + ``max``/``min`` through torch (on CUDA when torch sees a GPU); only on request,
  for a CUDA torch beside faiss-cpu. It is not the default anywhere: it won no measured case on CPU.
"""

from __future__ import annotations

import logging
import math
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from tqdm import tqdm

from moce_ds.clustering.comm import Communicator, LocalComm
from moce_ds.config.schema import ClusterConfig

__all__ = ["BACKENDS", "CHUNK_BYTES", "DEFAULT_ITERS", "DEFAULT_SPHERICAL", "DEFAULT_TOL", "IVF_MIN_K", "KMeansResult",
           "assign", "cluster_sums", "faiss_gpu_for", "import_faiss", "kmeans", "kmeans_plus_plus", "pick_backend",
           "set_threads", "unit_rows"]

logger = logging.getLogger("moce_ds")

BACKENDS = ("auto", "faiss", "faiss_ivf", "torch")
IVF_MIN_K = 65536  # below this an exact flat search over the centroids is cheap enough
CHUNK_BYTES = 64 << 20  # rows read, searched and summed per step: the bounded working set (~22 k rows at d=768)
_TORCH_BLOCK_BYTES = 2 << 20  # torch path's score block [rows, k]: small enough to stay in cache for the max/min
_UNIT_TOL = 1e-5  # |x|^2 within this of 1: rows are taken as already unit (no per-chunk normalising copy)

# The k-means defaults of every caller (this function, the offline job and its launcher, the in-training refresh,
# the embedded set's first round). The config schema owns them, so `cluster.iters` and `cluster.py --iters` start
# from one number; config sits below clustering, so it cannot import them from here.
DEFAULT_ITERS: int = ClusterConfig.iters
DEFAULT_SPHERICAL: bool = ClusterConfig.spherical  # features are unit norm: cosine k-means
DEFAULT_TOL: float = ClusterConfig.tol


@dataclass
class KMeansResult:
    centroids: np.ndarray  # float32 [k, d], identical on every rank
    assignments: np.ndarray  # int64 [N_local]: this rank's rows
    objective: list[float] = field(default_factory=list)  # global mean squared distance to the assigned centroid
    sizes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # int64 [k], global
    reseeded: int = 0  # empty clusters re-seeded over all iterations
    backend: str = ""


def import_faiss() -> Any:
    """``import faiss`` with its loader's "Could not load library with AVX512-SPR support" INFO lines hidden:
    they report the CPU-feature probe falling back to another build, not an error."""
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    import faiss

    return faiss


def set_threads(threads: int) -> None:
    """Threads per rank for torch and for faiss's OpenMP pool (R ranks on C cores: C // R each)."""
    torch.set_num_threads(threads)
    try:
        import_faiss().omp_set_num_threads(threads)
    except ImportError:
        pass


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (float32): the spherical k-means space."""
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def _faiss_gpus() -> int:
    try:
        faiss = import_faiss()
    except ImportError:
        return 0
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def faiss_gpu_for(local_rank: int, gpus: int) -> int | None:
    """The GPU faiss-gpu puts this rank's index on: its local rank's own (as torch and DeepSpeed bind it), None
    without GPUs. Never ``index_cpu_to_all_gpus``: 8 ranks would each open a context and scratch pool on all 8
    GPUs (and fail outright in exclusive-process mode); never ``local_rank % gpus``, which stacks ranks on one."""
    if gpus <= 0:
        return None
    if not 0 <= local_rank < gpus:
        raise ValueError(f"k-means on faiss-gpu: local rank {local_rank} but faiss sees {gpus} GPU(s); launch at "
                         f"most one rank per GPU, or pass --backend torch / use faiss-cpu.")
    return local_rank


def pick_backend(k: int, backend: str = "auto") -> str:
    """``auto`` -> faiss_ivf for very large k, else faiss (on this rank's GPU when faiss has GPUs)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown k-means backend {backend!r}; pass one of {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    return "faiss_ivf" if k >= IVF_MIN_K else "faiss"


def _chunk_rows(d: int) -> int:
    return max(256, CHUNK_BYTES // (4 * max(d, 1)))


def _add_sums(total: np.ndarray, idx: np.ndarray, chunk: np.ndarray) -> None:
    """total float64 [k, d] += per-cluster sums of chunk float32 [b, d] by idx int64 [b], summed in float32.

    A sparse one-hot [k, b] @ chunk: single-threaded, so it never fights faiss's OpenMP pool (torch's parallel
    index_add_ ran 10x slower beside faiss searches on a loaded 2-core box); float64 only for the k x d sums."""
    onehot = sp.csr_matrix((np.ones(len(idx), np.float32), (idx, np.arange(len(idx)))), shape=(total.shape[0],
                                                                                             len(idx)))
    total += onehot @ chunk


def _readonly_tensor(a: np.ndarray) -> torch.Tensor:
    # a memmap opened read-only: torch warns that it may not write, and it only reads here
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(a)


class _Rows:
    """This rank's rows [N, d] (ndarray or memmap, any float dtype) read as float32 chunks, unit-scaled when
    spherical and not already unit."""

    def __init__(self, x: np.ndarray, spherical: bool) -> None:
        self.x, self.n, self.d = x, int(x.shape[0]), int(x.shape[1])
        self.step = _chunk_rows(self.d)
        self.inv: np.ndarray | None = None  # float32 [N] 1/|x| when rows must be normalised per chunk
        self.sq: np.ndarray | None = None  # float32 [N] |x|^2 as searched (after any normalising)
        if spherical:
            sq = np.concatenate([np.einsum("ij,ij->i", c, c) for _, c in self._raw()]) if self.n else np.zeros(0)
            if np.abs(sq - 1.0).max(initial=0.0) > _UNIT_TOL:
                self.inv = (1.0 / np.maximum(np.sqrt(sq), 1e-12)).astype(np.float32)
                sq = sq * self.inv**2  # 1, or 0 for an all-zero row
            self.sq = sq.astype(np.float32)

    def _raw(self):
        for s in range(0, self.n, self.step):
            yield s, np.ascontiguousarray(self.x[s : s + self.step], dtype=np.float32)  # [b, d], no copy when it is

    def starts(self) -> list[int]:
        return list(range(0, self.n, self.step))

    def chunk(self, s: int) -> np.ndarray:
        """Rows [s, s + step) -> float32 [b, d] (a view of float32 rows unless they are normalised here)."""
        c = np.ascontiguousarray(self.x[s : s + self.step], dtype=np.float32)
        return c if self.inv is None else c * self.inv[s : s + len(c), None]

    def take(self, idx: np.ndarray) -> np.ndarray:
        """Rows at ``idx`` (in that order) -> float32 [len(idx), d]."""
        rows = np.ascontiguousarray(self.x[idx], dtype=np.float32)
        return rows if self.inv is None else rows * self.inv[idx, None]


class _Searcher:
    """Nearest centroid of row chunks; one index (and on faiss-gpu one StandardGpuResources) per k-means."""

    def __init__(self, d: int, spherical: bool, backend: str, device: int | None = None) -> None:
        self.d, self.spherical, self.backend = d, spherical, backend
        if device is None:  # the GPU torch is bound to (moce_ds.engine.distributed.bind_local_process), else 0
            device = torch.cuda.current_device() if torch.cuda.is_available() else 0
        self.gpu_res, self.device, self.threads = None, device, 1  # threads: chunk workers per pass
        if backend != "torch":
            self.faiss = import_faiss()
            gpus = _faiss_gpus()
            if gpus > 0:  # this rank's own GPU; temporary memory reused across iterations
                self.device = faiss_gpu_for(device, gpus)
                self.gpu_res = self.faiss.StandardGpuResources()
            else:  # faiss's OpenMP threads (set_threads / OMP_NUM_THREADS), one chunk worker each
                self.threads = self.faiss.omp_get_max_threads()
        self.index: Any = None

    def set_centroids(self, c: np.ndarray) -> None:
        """c float32 [k, d]."""
        self.c_sq = np.einsum("ij,ij->i", c, c)  # [k]
        if self.backend == "torch":
            dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
            self.c = torch.from_numpy(c).to(dev)
            return
        faiss, k = self.faiss, c.shape[0]
        if self.backend == "faiss" and self.index is not None:  # same index (and GPU memory) every iteration
            self.index.reset()
            self.index.add(c)
            return
        flat = faiss.IndexFlatIP(self.d) if self.spherical else faiss.IndexFlatL2(self.d)
        if self.backend == "faiss_ivf":
            nlist = max(1, min(int(4 * math.sqrt(k)), k // 39))  # faiss wants >= 39 training points per list
            metric = faiss.METRIC_INNER_PRODUCT if self.spherical else faiss.METRIC_L2
            index = faiss.IndexIVFFlat(flat, self.d, nlist, metric)
            index.train(c)
            index.nprobe = 16
            self._quantizer = flat  # the IVF index holds a raw pointer to it
        else:
            index = flat
        if self.gpu_res is not None:
            index = faiss.index_cpu_to_gpu(self.gpu_res, self.device, index)
        index.add(c)
        self.index = index

    def search(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """rows float32 [b, d] -> nearest int64 [b], score float32 [b] (inner product if spherical, else |x-c|^2)."""
        if self.backend == "torch":
            return self._search_torch(rows)
        score, found = self.index.search(rows, 1)  # [b, 1] each
        score, found = score[:, 0], found[:, 0]
        miss = found < 0
        if miss.any():  # IVF may find nothing for a point: centroid 0, its distance computed by the caller
            score[miss], found[miss] = np.nan, 0
        return found.astype(np.int64), score

    def _search_torch(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        c, k = self.c, self.c.shape[0]
        step = max(256, _TORCH_BLOCK_BYTES // (4 * k))
        idx, score = np.empty(len(rows), np.int64), np.empty(len(rows), np.float32)
        c_sq = torch.from_numpy(self.c_sq).to(c.device)
        for s in range(0, len(rows), step):
            xb = _readonly_tensor(rows[s : s + step]).to(c.device)  # [b, d]
            if self.spherical:
                best, arg = (xb @ c.T).max(1)  # max inner product = nearest on the unit sphere
            else:  # |x - c|^2 = |x|^2 - 2 x.c + |c|^2: one addmm and one pass for the min
                best, arg = torch.addmm(c_sq, xb, c.T, alpha=-2.0).min(1)
                best = best + (xb * xb).sum(1)
            idx[s : s + step], score[s : s + step] = arg.cpu().numpy(), best.cpu().numpy()
        return idx, score


def _sq_dist(score: np.ndarray, idx: np.ndarray, row_sq: np.ndarray, c_sq: np.ndarray, spherical: bool,
             rows: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Search score -> squared L2 distance float32 [b] to the found centroid."""
    # spherical: |x - c|^2 = |x|^2 + |c|^2 - 2 x.c, no copy of the rows
    sq = row_sq + c_sq[idx] - 2.0 * score if spherical else score
    bad = np.isnan(sq)  # IVF found nothing: the distance to centroid 0, computed for those rows only
    if bad.any():
        sq[bad] = ((rows[bad] - centroids[idx[bad]]) ** 2).sum(1)
    return np.maximum(sq, 0.0).astype(np.float32)


def _pass(rows: _Rows, searcher: _Searcher, centroids: np.ndarray, spherical: bool,
          sums: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """One pass over the rows -> assignments int64 [N], squared distances float32 [N], and with ``sums`` the
    per-cluster row sums float64 [k, d] (float32 within a chunk, float64 across chunks).

    On CPU the chunks are split over ``searcher.threads`` threads, each searching with a one-thread faiss (it
    releases the GIL) and summing its own chunks: single-threaded searches plus the sums in parallel beat one
    OpenMP-parallel search followed by a serial sum (2.4 vs 2.8 s per 1.28 M x 768 rows, k=256, 2 cores).
    Chunks are dealt to threads by position, so the float64 sums add up in the same order on every run."""
    k, d = centroids.shape
    searcher.set_centroids(centroids)
    assignments, sq = np.empty(rows.n, np.int64), np.empty(rows.n, np.float32)
    starts, workers = rows.starts(), max(1, min(searcher.threads, len(rows.starts())))

    def work(w: int) -> np.ndarray | None:
        if workers > 1:
            searcher.faiss.omp_set_num_threads(1)  # this thread's OpenMP setting only
        total = np.zeros((k, d), np.float64) if sums else None
        for s in starts[w::workers]:
            chunk = rows.chunk(s)
            e = s + len(chunk)
            idx, score = searcher.search(chunk)
            row_sq = rows.sq[s:e] if rows.sq is not None else np.einsum("ij,ij->i", chunk, chunk)
            assignments[s:e] = idx  # disjoint slices: no lock needed
            sq[s:e] = _sq_dist(score, idx, row_sq, searcher.c_sq, spherical, chunk, centroids)
            if sums:
                _add_sums(total, idx, chunk)
        return total

    if workers == 1:
        totals = [work(0)]
    else:
        with ThreadPoolExecutor(workers) as pool:
            totals = list(pool.map(work, range(workers)))
    return assignments, sq, (sum(totals[1:], totals[0]) if sums else None)


def cluster_sums(x: np.ndarray, assignments: np.ndarray, k: int,
                 chunk_rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-cluster sums of rows x [N, d] by assignments int [N] -> sums float64 [k, d], counts int64 [k], in
    float32 chunks of ``chunk_rows`` rows (default ~``CHUNK_BYTES``) folded into float64: the k-means update."""
    step = chunk_rows or _chunk_rows(x.shape[1])
    total = np.zeros((k, x.shape[1]), np.float64)
    for s in range(0, x.shape[0], step):
        _add_sums(total, np.asarray(assignments[s : s + step], np.int64),
                  np.ascontiguousarray(x[s : s + step], dtype=np.float32))
    return total, np.bincount(np.asarray(assignments, np.int64), minlength=k)


def assign(x: np.ndarray, centroids: np.ndarray, spherical: bool = False,
           backend: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid: x [N, d], centroids [k, d] -> assignments int64 [N], squared L2 distance float32 [N].

    ``spherical``: rows and centroids are taken as unit norm (nearest by inner product). ``x`` may be a memmap.
    """
    c = np.ascontiguousarray(centroids, dtype=np.float32)
    rows = _Rows(x, spherical=False)  # taken as given, as documented
    searcher = _Searcher(c.shape[1], spherical, pick_backend(c.shape[0], backend))
    a, sq, _ = _pass(rows, searcher, c, spherical, sums=False)
    return a, sq


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


def _init_centroids(rows: _Rows, k: int, seed: int, init_sample: int, comm: Communicator) -> np.ndarray:
    """k-means++ on rank 0 over a sample drawn from every rank in proportion to its rows; broadcast -> [k, d]."""
    counts = comm.allreduce_sum(np.eye(comm.world_size)[comm.rank] * rows.n).astype(np.int64)  # [R] rows
    total = int(counts.sum())
    take = rows.n if total <= init_sample else int(math.ceil(init_sample * rows.n / total))
    rng = np.random.default_rng([seed, comm.rank])
    pick = np.arange(rows.n) if take >= rows.n else np.sort(rng.choice(rows.n, take, replace=False))
    parts = comm.gather(rows.take(pick))  # sorted indices: a memmap reads them in file order
    centroids = None
    if comm.rank == 0:
        centroids = kmeans_plus_plus(np.concatenate(parts), k, np.random.default_rng(seed))
    return comm.broadcast(centroids)


def _reseed(rows: _Rows, sq: np.ndarray, num: int, comm: Communicator) -> np.ndarray:
    """``num`` distinct rows worst served by their centroid over all ranks, chosen on rank 0 -> [num, d].

    Ties break by (rank, row), so one process and several ranks holding the same rows in order pick the same.
    """
    order = np.argsort(-sq, kind="stable")[:num]
    parts = comm.gather((sq[order], order, rows.take(order)))
    out = None
    if comm.rank == 0:
        cand = [(-float(d), r, int(i), v) for r, (ds, ids, vs) in enumerate(parts) for d, i, v in zip(ds, ids, vs)]
        cand.sort(key=lambda t: t[:3])
        out = np.stack([c[3] for c in cand[:num]]).astype(np.float32)
    return comm.broadcast(out)


def kmeans(
    x: np.ndarray,
    k: int,
    iters: int = DEFAULT_ITERS,
    seed: int = 0,
    spherical: bool = DEFAULT_SPHERICAL,
    tol: float = DEFAULT_TOL,
    comm: Communicator | None = None,
    init: np.ndarray | None = None,
    init_sample: int = 100_000,
    backend: str = "auto",
    progress: bool = False,
) -> KMeansResult:
    """Lloyd's k-means on this rank's rows x float [N_local, d] (an array or a memmap, read in chunks); every rank
    calls it with the same arguments.

    ``init`` [k, d]: start from these centroids (the same on every rank), else k-means++ on rank 0 over a sample of
    at most ``init_sample`` rows. ``spherical``: rows and centroids are L2-normalised (cosine k-means). Empty
    clusters are re-seeded with the rows farthest from their centroid. Stops when the objective's relative change
    drops to ``tol`` or after ``iters`` iterations. ``objective[i]`` is the global mean squared distance to the
    assigned centroid at iteration i; the returned assignments are the nearest of the returned centroids.
    """
    comm = comm if comm is not None else LocalComm()
    if x.ndim != 2:
        raise ValueError(f"kmeans expects x of shape [N, d], got {x.shape}")
    n, d = x.shape
    n_total = int(comm.allreduce_sum(np.array([n], np.float64))[0])
    if not 1 <= k <= n_total:
        raise ValueError(f"kmeans needs 1 <= k <= N, got k={k} for N={n_total}: pass a k of at most {n_total}")
    rows = _Rows(x, spherical)
    backend = pick_backend(k, backend)
    if init is not None:
        centroids = np.ascontiguousarray(init, dtype=np.float32)
        if centroids.shape != (k, d):
            raise ValueError(f"init centroids must have shape ({k}, {d}), got {centroids.shape}")
    else:
        centroids = _init_centroids(rows, k, seed, init_sample, comm)
    if spherical:
        centroids = unit_rows(centroids)
    searcher = _Searcher(d, spherical, backend, device=getattr(comm, "local_rank", comm.rank))
    objective: list[float] = []
    reseeded = 0
    quiet = not progress or comm.rank != 0 or not sys.stderr.isatty()  # progress on rank 0, on a terminal
    bar = tqdm(total=iters, desc=f"k-means k={k}", disable=quiet, leave=False)
    for it in range(iters):
        last = it == iters - 1
        assignments, sq, sums = _pass(rows, searcher, centroids, spherical, sums=not last)
        # one reduction per iteration: [k*d sums | k counts | sum of sq distances | N]
        tot = comm.allreduce_sum(np.concatenate([
            sums.ravel() if sums is not None else np.zeros(k * d),
            np.bincount(assignments, minlength=k),
            [float(sq.sum(dtype=np.float64)), float(n)],
        ]))
        sums, counts = tot[: k * d].reshape(k, d), tot[k * d : k * d + k]
        objective.append(float(tot[-2] / tot[-1]))
        bar.update(1)
        bar.set_postfix(objective=f"{objective[-1]:.5g}")
        if last or (it > 0 and abs(objective[-2] - objective[-1]) <= tol * max(objective[-2], 1e-12)):
            break  # assignments stay those of these centroids
        new = (sums / np.maximum(counts, 1.0)[:, None]).astype(np.float32)
        empty = np.flatnonzero(counts == 0)  # the same on every rank: counts are global
        if empty.size:
            new[empty] = _reseed(rows, sq, int(empty.size), comm)
            reseeded += int(empty.size)
            logger.debug("kmeans iter %d: re-seeded %d empty clusters", it, empty.size)
        centroids = unit_rows(new) if spherical else new
    bar.close()
    sizes = comm.allreduce_sum(np.bincount(assignments, minlength=k).astype(np.float64)).astype(np.int64)
    return KMeansResult(centroids=centroids, assignments=assignments, objective=objective, sizes=sizes,
                        reseeded=reseeded, backend=backend)
