"""The clustering job: shards -> features (per rank, cached) -> data-parallel k-means -> a new round.

``launchers/cluster.py`` calls :func:`run_clustering` once per rank (``mpirun -n R`` or a single process); the
in-training refresh (:mod:`moce_ds.clustering.refresh`) shares :func:`write_matched_round` with it.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from moce_ds.clustering.comm import Communicator, LocalComm
from moce_ds.clustering.feature_sources import FeatureExtractor, make_extractor, round_extractor
from moce_ds.clustering.features import featurize_shards
from moce_ds.clustering.kmeans import (
    DEFAULT_ITERS,
    DEFAULT_SPHERICAL,
    DEFAULT_TOL,
    KMeansResult,
    assign,
    kmeans,
    unit_rows,
)
from moce_ds.clustering.matching import apply_matching, match_by_centroids, match_by_overlap
from moce_ds.data.sidecar import ClusterRound, latest_round, load_round, load_round_at, write_round
from moce_ds.data.sources import resolve_shards
from moce_ds.metrics.prometheus import write_clustering_textfile

__all__ = ["assign_new_shards", "gather_ids", "run_clustering", "write_matched_round", "PROM_TEXTFILE"]

PROM_TEXTFILE = "moce_cluster.prom"  # <clusters root>/moce_cluster.prom: the newest round's result for Prometheus

logger = logging.getLogger("moce_ds")


def _resolve_data(data: str, cache_dir: Path | None, comm: Communicator) -> tuple[list[str], list[int] | None, Path]:
    """'embedded' or a shard folder / manifest -> (shard urls, per-shard counts, clusters root)."""
    if data == "embedded":
        from moce_ds.data.embedded import build_embedded_dataset, default_cache_dir

        cache = Path(cache_dir) if cache_dir else default_cache_dir()
        if comm.rank == 0:  # one rank builds, the others load what it wrote
            build_embedded_dataset(cache)
        comm.barrier()
        ds = build_embedded_dataset(cache)
        src = resolve_shards(ds.root / "shards")
        return src.urls, src.counts, ds.root / "clusters"
    src = resolve_shards(data)
    if src.root is None:
        raise ValueError(f"--data {data!r} must be a shard folder or its manifest.json (the round is written "
                         f"to <folder>/clusters), or 'embedded'")
    return src.urls, src.counts, src.root / "clusters"


def gather_ids(index: np.ndarray, assignments: np.ndarray, comm: Communicator,
               num_images: int | None = None) -> np.ndarray | None:
    """Every rank's (global index, cluster) pairs -> int32 table [num_images] on rank 0 (-1 = no id); None elsewhere."""
    parts = comm.gather((np.asarray(index, np.int64), np.asarray(assignments, np.int64)))
    if comm.rank != 0:
        return None
    idx = np.concatenate([p[0] for p in parts])
    cl = np.concatenate([p[1] for p in parts])
    size = max(int(idx.max()) + 1 if idx.size else 0, num_images or 0)
    ids = np.full(size, -1, np.int32)
    ids[idx] = cl
    return ids


def write_matched_round(root: Path, ids: np.ndarray, res: KMeansResult, source: str, space: str,
                        extra: dict, match: bool = True) -> ClusterRound:
    """Match the new clusters to the previous round's ids (when k agrees), then write the round atomically."""
    k = res.centroids.shape[0]
    centroids = res.centroids
    prev = latest_round(root)
    info: dict = {"matched_to": None, "match_method": None}
    if match and prev is not None and prev.k == k:
        prev_c = prev.centroids()
        if prev.manifest.get("feature_space", prev.manifest.get("feature_source")) == space and \
                prev_c.shape == centroids.shape:
            perm, method = match_by_centroids(centroids, prev_c), "centroids"
        else:  # another feature space: centroid distances mean nothing, shared images do
            perm, method = match_by_overlap(ids, prev.ids(mmap=False), k), "overlap"
        centroids, ids = apply_matching(perm, centroids, ids)
        prev_ids = prev.ids(mmap=False)
        m = min(ids.shape[0], prev_ids.shape[0])
        both = (ids[:m] >= 0) & (prev_ids[:m] >= 0)
        kept = float((ids[:m][both] == prev_ids[:m][both]).mean()) if both.any() else 0.0
        info = {"matched_to": prev.round, "match_method": method, "ids_kept_fraction": round(kept, 4)}
        logger.info("matched %d new clusters to round %d by %s: %.1f%% of images keep their id", k, prev.round,
                    method, 100 * kept)
    meta = dict(extra, feature_space=space, objective=res.objective, iterations=len(res.objective),
                reseeded=res.reseeded, backend=res.backend, **info)
    return write_round(root, ids, centroids, feature_source=source, extra=meta)


def run_clustering(
    data: str,
    k: int,
    features: str = "pixel",
    weights: str | None = None,
    iters: int = DEFAULT_ITERS,
    seed: int = 0,
    spherical: bool = DEFAULT_SPHERICAL,
    tol: float = DEFAULT_TOL,
    init_sample: int = 100_000,
    out: Path | None = None,
    cache_dir: Path | None = None,
    feature_cache: Path | None = None,
    image_size: int = 32,
    batch_size: int = 256,
    backend: str = "auto",
    match: bool = True,
    comm: Communicator | None = None,
    progress: bool = True,
    device: str | None = None,
) -> ClusterRound:
    """Cluster a shard folder (or ``'embedded'``) into ``k`` clusters and write the next round; returns it on
    every rank. Each rank featurises every world_size-th shard (an encoder on ``device``: "cpu", "cuda[:N]", "auto");
    features are cached under ``feature_cache`` (default ``<clusters root>/features/<source>``) so a rerun resumes."""
    comm = comm if comm is not None else LocalComm()
    t0 = time.perf_counter()
    urls, counts, root = _resolve_data(data, cache_dir, comm)
    root = Path(out) if out is not None else root
    if counts is not None and sum(counts) < k:
        raise ValueError(f"--k {k} is more clusters than the {sum(counts)} images of {data}: pass --k of at most "
                         f"{sum(counts)} (moe.num_clusters must then match it).")
    extractor = make_extractor(features, weights, image_size, device)
    cache = Path(feature_cache) if feature_cache is not None else _feature_cache(root, extractor)
    x, index, skipped = featurize_shards(urls, extractor, cache, comm, counts, batch_size, progress)
    t_feat = time.perf_counter() - t0
    d = _common_dim(x, comm)
    if not x.size:
        x = np.zeros((0, d), np.float32)
    # rows that decoded vs images the manifest lists: the one pair of counts the job reports (and checks k against)
    clustered, num_skipped = (int(v) for v in comm.allreduce_sum(np.array([len(x), sum(skipped.values())])))
    listed = sum(counts) if counts else clustered + num_skipped
    if clustered < k:  # every rank raises: none waits in the k-means' first collective
        raise ValueError(f"--k {k} is more clusters than the {clustered} images of {data} that decode "
                         f"({num_skipped} of {listed} skipped): pass --k of at most {clustered} (moe.num_clusters "
                         f"must then match it).")
    res = kmeans(x, k, iters=iters, seed=seed, spherical=spherical, tol=tol, comm=comm, init_sample=init_sample,
                 backend=backend, progress=progress)
    ids = gather_ids(index, res.assignments, comm, sum(counts) if counts else None)
    sk = comm.gather(skipped)
    path = None
    if comm.rank == 0:
        total_skipped: dict[str, int] = {}
        for part in sk:
            for r, c in part.items():
                total_skipped[r] = total_skipped.get(r, 0) + c
        extra = {"feature_extractor": extractor.spec,
                 "seed": seed, "spherical": spherical, "tol": tol, "ranks": comm.world_size, "comm": comm.name,
                 "data": str(data), "skipped": total_skipped, "feature_seconds": round(t_feat, 3),
                 "seconds": round(time.perf_counter() - t0, 3)}
        rnd = write_matched_round(root, ids, res, extractor.source, extractor.space, extra, match=match)
        path = str(rnd.path)
        # A batch job's HTTP endpoint would die with it: leave the result as a Prometheus textfile beside the
        # rounds (point node_exporter's --collector.textfile.directory at it, or copy it there).
        write_clustering_textfile(root / PROM_TEXTFILE, rnd.round, k, float(res.objective[-1]),
                                  list(rnd.manifest.get("cluster_sizes", [])), len(res.objective),
                                  time.perf_counter() - t0, int((ids >= 0).sum()))
        why = ", ".join(f"{r} {c}" for r, c in sorted(total_skipped.items()))
        logger.info("round %d: k=%d over %d of the %d images%s, objective %.5g after %d iterations (%.1f s)",
                    rnd.round, k, clustered, listed, f" ({num_skipped} skipped: {why})" if num_skipped else "",
                    res.objective[-1], len(res.objective), time.perf_counter() - t0)
    path = comm.broadcast(path)
    comm.barrier()
    return load_round_at(Path(path))


def _feature_cache(root: Path, extractor: FeatureExtractor) -> Path:
    """<clusters root>/features/<source as a file name>: the default per-shard feature cache of one source."""
    return root / "features" / "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in extractor.source)[-100:]


# round-manifest keys that describe one k-means run, not the centroids an assign-only round inherits
_RUN_KEYS = ("objective", "iterations", "reseeded", "matched_to", "match_method", "ids_kept_fraction", "seconds",
             "feature_seconds", "skipped", "ranks", "comm")


def assign_new_shards(
    data: str,
    features: str = "pixel",
    weights: str | None = None,
    round_number: int | None = None,
    out: Path | None = None,
    cache_dir: Path | None = None,
    feature_cache: Path | None = None,
    image_size: int = 32,
    batch_size: int = 256,
    comm: Communicator | None = None,
    progress: bool = True,
    device: str | None = None,
) -> ClusterRound | None:
    """Assign the shards added to the manifest since a round (default: the latest) to its centroids, featurised by
    the round's own source, and write a new round with the extended ids (ids of existing images unchanged), without
    k-means. Returns the new round on every rank; None (nothing written) when nothing is new.

    New shards: those past the leading shards whose images the round's table covers (global indices follow the
    manifest's order). Raises ValueError when ``features`` is not the round's feature source."""
    comm = comm if comm is not None else LocalComm()
    urls, counts, root = _resolve_data(data, cache_dir, comm)
    root = Path(out) if out is not None else root
    rnd = load_round(root, round_number) if round_number is not None else latest_round(root)
    if rnd is None:
        raise ValueError(f"no cluster round under {root} to assign to: run launchers/cluster.py --k K first.")
    asked = make_extractor(features, weights, image_size).source
    if asked != rnd.manifest.get("feature_source"):
        raise ValueError(f"round {rnd.round} was clustered on {rnd.manifest.get('feature_source')}, not --features "
                         f"{features} ({asked}): pass that round's source, or re-cluster without --assign-only.")
    table = rnd.ids(mmap=False)  # int32 [num_images]
    first_new = 0 if counts is None else len(urls)  # without counts every shard is read; only -1 ids change
    covered = 0
    for i, c in enumerate(counts or []):
        if covered + c > table.shape[0]:
            first_new = i
            break
        covered += c
    new_urls = urls[first_new:]
    new_counts = counts[first_new:] if counts else None
    if not new_urls:
        if comm.rank == 0:
            logger.info("nothing to assign: round %d covers all %d images of %s", rnd.round, table.shape[0], data)
        return None
    extractor = round_extractor(rnd, device=device)
    cache = Path(feature_cache) if feature_cache is not None else _feature_cache(root, extractor)
    x, index, skipped = featurize_shards(new_urls, extractor, cache, comm, new_counts, batch_size, progress)
    centroids = rnd.centroids()
    spherical = bool(rnd.manifest.get("spherical", False))
    nearest = np.zeros(0, np.int64)
    if x.size:
        if x.shape[1] != centroids.shape[1]:
            raise ValueError(f"features of width {x.shape[1]} do not fit round {rnd.round}'s {centroids.shape[1]}-wide "
                             f"centroids: the round's feature source {extractor.source} changed; re-cluster.")
        if spherical:  # assign() takes rows and centroids as unit norm
            x, centroids = unit_rows(x), unit_rows(centroids)
        nearest, _ = assign(x, centroids, spherical=spherical)
    total = sum(counts) if counts else None
    found = gather_ids(index, nearest, comm, max(total or 0, table.shape[0]))
    parts = comm.gather(skipped)
    path = None
    if comm.rank == 0:
        skipped = {r: sum(p.get(r, 0) for p in parts) for r in {r for p in parts for r in p}}
        ids = np.full(found.shape[0], -1, np.int32)
        ids[: table.shape[0]] = table
        fill = ids < 0  # only images without an id get one: existing ids never change
        ids[fill] = found[fill]
        added = int((fill & (found >= 0)).sum())
        extra = {key: v for key, v in rnd.manifest.items() if key not in _RUN_KEYS}
        extra["assign_only"] = {"from_round": rnd.round, "shards": [Path(u).name for u in new_urls],
                                "images_assigned": added, "skipped": skipped}
        new = write_round(root, ids, rnd.centroids(), feature_source=rnd.manifest["feature_source"], extra=extra)
        path = str(new.path)
        logger.info("round %d: %d images of %d new shards assigned to round %d's centroids", new.round, added,
                    len(new_urls), rnd.round)
    path = comm.broadcast(path)
    comm.barrier()
    return load_round_at(Path(path))


def _common_dim(x: np.ndarray, comm: Communicator) -> int:
    """Feature width agreed by all ranks (a rank with no shards has none of its own)."""
    dims = comm.gather(int(x.shape[1]) if x.size else 0)
    d: int | str = 0
    if comm.rank == 0:
        widths = {w for w in dims if w}
        d = widths.pop() if len(widths) == 1 else f"no features, or ranks disagree on their width: {dims}"
    d = comm.broadcast(d)  # an error reaches every rank, so none waits forever
    if isinstance(d, str):
        raise ValueError(d)
    return int(d)
