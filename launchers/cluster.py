"""Cluster the pre-training images and write the next cluster-id round beside the shards.

    mpirun -n R python launchers/cluster.py --data /data/in1k-shards --k 256 [--features pixel|RUN_DIR|timm:NAME]
    python launchers/cluster.py --data embedded --k 16           # one process
    python launchers/cluster.py --data /data/in1k-shards --assign-only [--round N]   # new shards, no k-means
    mpirun -n 8 python launchers/cluster.py --data /data/in1k-shards --k 256 --features RUN_DIR --device cuda

As root add --allow-run-as-root to mpirun (and --oversubscribe for more ranks than cores). Each rank featurises
every R-th shard (cached per shard: a rerun resumes), k-means runs data-parallel over MPI, and rank 0 writes
<shards>/clusters/round_NNNN/ atomically, its ids matched to the previous round's. --assign-only assigns the
shards added to the manifest since a round to its centroids (featurised by the round's own source, which --features
must name) and writes a new round with the extended ids; existing images keep theirs. Each rank binds to its
local rank's GPU (and gets cores / ranks-per-node threads unless --threads or OMP_NUM_THREADS says otherwise);
--device cuda featurises there.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

_MPI_ENV = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MV2_COMM_WORLD_SIZE")


def _communicator(kind: str):
    from moce_ds.clustering.comm import LocalComm, MPIComm, TorchComm

    if kind == "auto":
        kind = "mpi" if any(v in os.environ for v in _MPI_ENV) else "torch" if "WORLD_SIZE" in os.environ else "local"
    if kind == "mpi":
        return MPIComm()
    if kind == "torch":
        from moce_ds.engine.distributed import init_distributed

        init_distributed()
        return TorchComm()
    return LocalComm()


def main(argv: list[str] | None = None) -> int:
    from moce_ds.clustering.kmeans import DEFAULT_ITERS, DEFAULT_SPHERICAL, DEFAULT_TOL

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="shard folder (with manifest.json), its manifest, or 'embedded'")
    p.add_argument("--k", type=int, default=None, help="clusters (= moe.num_clusters); not with --assign-only")
    p.add_argument("--assign-only", action="store_true", help="assign new shards to a round's centroids, no k-means")
    p.add_argument("--round", type=int, default=None, help="--assign-only: the round to extend (default: latest)")
    p.add_argument("--features", default="pixel", help="pixel | a pre-training run or checkpoint folder | timm:NAME")
    p.add_argument("--weights", default=None, help="weights file for --features timm:NAME")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"),
                   help="where an encoder featurises (cuda: this rank's own GPU; auto: it when there is one)")
    p.add_argument("--iters", type=int, default=DEFAULT_ITERS, help="Lloyd iterations at most (default %(default)s)")
    p.add_argument("--tol", type=float, default=DEFAULT_TOL,
                   help="stop when the objective changes less than this (rel.; default %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--spherical", action=argparse.BooleanOptionalAction, default=DEFAULT_SPHERICAL,
                   help="cosine k-means on unit-norm rows (default %(default)s)")
    p.add_argument("--euclidean", dest="spherical", action="store_false", help="the same as --no-spherical")
    p.add_argument("--init-sample", type=int, default=100_000, help="rows k-means++ seeds from (on rank 0)")
    p.add_argument("--image-size", type=int, default=32, help="pixel features: images are resized to this")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--backend", default="auto", help="assignment: auto | torch | faiss | faiss_ivf")
    p.add_argument("--comm", default="auto", choices=("auto", "mpi", "torch", "local"))
    p.add_argument("--out", default=None, help="clusters folder (default: <shards>/clusters)")
    p.add_argument("--cache-dir", default=None, help="where the embedded set lives (default ~/.cache/moce_ds)")
    p.add_argument("--feature-cache", default=None, help="per-shard feature cache (default <clusters>/features/..)")
    p.add_argument("--no-match", action="store_true", help="do not match ids to the previous round")
    p.add_argument("--threads", type=int, default=0,
                   help="torch and faiss threads per rank (0: OMP_NUM_THREADS, else cores / ranks on the node)")
    args = p.parse_args(argv)
    if (args.k is None) != args.assign_only:
        p.error("pass --k K to cluster, or --assign-only (which keeps the round's k)")

    comm = _communicator(args.comm)
    logging.basicConfig(level=logging.INFO if comm.rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {comm.rank}] %(message)s")
    # at INFO faiss's loader reports its CPU-feature probe ("Could not load library with AVX512-SPR support")
    # as if it were an error; set before faiss is first imported
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    from moce_ds.clustering.job import assign_new_shards, run_clustering
    from moce_ds.engine.distributed import bind_local_process

    try:
        # under mpirun each rank drives its local rank's GPU and its share of the node's cores
        bind_local_process(args.threads, rank=comm.rank)
        if args.assign_only:
            rnd = assign_new_shards(
                args.data, features=args.features, weights=args.weights, round_number=args.round, out=args.out,
                cache_dir=args.cache_dir, feature_cache=args.feature_cache, image_size=args.image_size,
                batch_size=args.batch_size, comm=comm, device=args.device)
            if comm.rank == 0:
                print("nothing new to assign" if rnd is None else f"done: round {rnd.round} (k={rnd.k}) at {rnd.path}")
            return 0
        rnd = run_clustering(
            args.data, args.k, features=args.features, weights=args.weights, iters=args.iters, seed=args.seed,
            spherical=args.spherical, tol=args.tol, init_sample=args.init_sample, out=args.out,
            cache_dir=args.cache_dir, feature_cache=args.feature_cache, image_size=args.image_size,
            batch_size=args.batch_size, backend=args.backend, match=not args.no_match, comm=comm, device=args.device)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if comm.rank == 0:
        print(f"done: round {rnd.round} (k={rnd.k}) at {rnd.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
