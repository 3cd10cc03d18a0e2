"""k-means benchmark (issue 4): assignment throughput against a matmul peak, 1 vs 2 MPI ranks, LPT balance.

    python benchmarks/kmeans.py            # ~1-2 min on 2 cores; appends to results/kmeans.jsonl, draws kmeans.png

1. Assignment (nearest centroid for N rows) through each path -- our torch path (blocked addmm + argmin, what
   ``backend=auto`` picks on CPU), faiss-cpu's IndexFlatL2 with its default OpenMP threads and with 1 thread,
   scikit-learn's ``pairwise_distances_argmin_min`` -- as GFLOP/s of the 2*N*d*k distance matmul and as a
   fraction of the peak of a plain torch matmul measured in the same run.
2. The same k-means (fixed start, fixed iterations) under ``mpirun -n 1`` and ``-n 2``, 1 torch thread per rank,
   plus 1 rank with 2 threads; wall time of the k-means itself (rank 0, after a barrier).
3. Images per expert at step 0 for a random cluster table vs ``cluster.init_table=lpt`` (CV over experts).
Never asserts.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from moce_ds.clustering.kmeans import assign, kmeans  # noqa: E402
from moce_ds.clustering.packing import expert_images, lpt_pack  # noqa: E402
from moce_ds.metrics import append_jsonl  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MPI_N, MPI_D, MPI_K, MPI_ITERS = 200_000, 64, 256, 10


def best_time(fn, reps: int = 3) -> float:
    fn()  # warm-up
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return min(ts)


def assignment(n: int, d: int, k: int, threads: int) -> list[dict]:
    import faiss
    from sklearn.metrics import pairwise_distances_argmin_min

    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)  # faiss's OpenMP pool; its bundled OpenBLAS (OpenMP build) follows it
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, d), dtype=np.float32)
    c = rng.standard_normal((k, d), dtype=np.float32)
    flop = 2.0 * n * d * k
    xt, ct = torch.from_numpy(x), torch.from_numpy(c)
    peak = flop / best_time(lambda: xt @ ct.T) / 1e9  # the same-size matmul, no reduction
    sq = torch.randn(2048, 2048)
    peak_square = 2 * 2048**3 / best_time(lambda: sq @ sq) / 1e9
    ref = assign(x, c, backend="torch")[0]

    def faiss_flat():
        index = faiss.IndexFlatL2(d)
        index.add(c)
        return index.search(x, 1)[1][:, 0]

    paths = {
        "torch (auto on CPU)": lambda: assign(x, c, backend="torch")[0],
        "faiss IndexFlatL2": faiss_flat,
        "sklearn pairwise_distances_argmin_min": lambda: pairwise_distances_argmin_min(x, c)[0],
    }
    rows = []
    for name, fn in paths.items():
        t = best_time(fn)
        agree = float((np.asarray(fn()) == ref).mean())
        gf = flop / t / 1e9
        rows.append({"kind": "assign", "path": name, "n": n, "d": d, "k": k, "threads": threads, "seconds": t,
                     "gflops": gf, "matmul_peak_gflops": max(peak, peak_square), "same_size_matmul_gflops": peak,
                     "fraction_of_peak": gf / max(peak, peak_square), "agree_with_torch": agree})
        print(f"  assign n={n} d={d} k={k} threads={threads}: {name:38s} {gf:7.1f} GFLOP/s = "
              f"{rows[-1]['fraction_of_peak']:.0%} of peak {max(peak, peak_square):.1f}", flush=True)
    return rows


def mpi_worker() -> None:
    """Runs under mpirun: every rank builds its block of the same data set, then times k-means."""
    from moce_ds.clustering.comm import MPIComm

    comm = MPIComm()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((MPI_N, MPI_D), dtype=np.float32)
    x += 3 * rng.standard_normal((MPI_K, MPI_D)).astype(np.float32)[rng.integers(0, MPI_K, MPI_N)]
    init = x[rng.choice(MPI_N, MPI_K, replace=False)]
    mine = np.array_split(x, comm.world_size)[comm.rank]
    comm.barrier()
    t = time.perf_counter()
    res = kmeans(mine, MPI_K, iters=MPI_ITERS, tol=0, init=init, comm=comm)
    comm.barrier()
    if comm.rank == 0:
        print(json.dumps({"seconds": time.perf_counter() - t, "objective": res.objective[-1]}))


def mpi_scaling() -> list[dict]:
    rows = []
    root = ["--allow-run-as-root"] if os.geteuid() == 0 else []
    for ranks, threads in ((1, 1), (2, 1), (1, 2)):
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        cmd = ["mpirun", "-n", str(ranks), "--oversubscribe", "--bind-to", "none", *root, "-x", "OMP_NUM_THREADS",
               "-x", "MKL_NUM_THREADS", sys.executable, __file__, "--mpi-worker"]
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        line = [s for s in out.stdout.splitlines() if s.startswith("{")]
        if out.returncode or not line:
            print(f"  mpirun -n {ranks} failed: {out.stderr[-500:]}")
            continue
        r = json.loads(line[-1])
        rows.append({"kind": "mpi", "ranks": ranks, "threads_per_rank": threads, "n": MPI_N, "d": MPI_D, "k": MPI_K,
                     "iters": MPI_ITERS, **r})
        print(f"  k-means n={MPI_N} d={MPI_D} k={MPI_K} x{MPI_ITERS} iters: {ranks} rank(s) x {threads} thread(s): "
              f"{r['seconds']:.2f} s (objective {r['objective']:.4f})", flush=True)
    base = next((r["seconds"] for r in rows if r["ranks"] == 1 and r["threads_per_rank"] == 1), None)
    for r in rows:
        r["speedup_vs_1x1"] = None if base is None else base / r["seconds"]
    return rows


def balance(seeds: int = 20) -> list[dict]:
    from moce_ds.data.embedded import default_cache_dir
    from moce_ds.data.sidecar import latest_round
    from moce_ds.moe.gates import ClusterGate

    cases = []
    rnd = latest_round(default_cache_dir() / "embedded-v1" / "clusters")
    if rnd is not None:
        cases.append(("embedded round (pixel features)", np.asarray(rnd.manifest["cluster_sizes"]), 4, 128))
    rng = np.random.default_rng(0)
    cases.append(("ImageNet-scale synthetic: lognormal sizes", (rng.lognormal(0, 0.5, 256) * 5000).astype(
        np.int64), 8, 768))
    rows = []
    for name, sizes, experts, width in cases:
        cv = lambda v: float(v.std() / v.mean())  # noqa: E731
        rand = []
        for s in range(seeds):
            torch.manual_seed(s)
            gate = ClusterGate(len(sizes), width, experts).eval()  # the model's random init of table and wg
            with torch.no_grad():
                routed = gate.image_logits(torch.arange(len(sizes))).argmax(1).numpy()
            rand.append(cv(expert_images(sizes, routed, experts)))
        packed = expert_images(sizes, lpt_pack(sizes, experts), experts)
        floor = float(np.sqrt((experts - 1) / sizes.sum()))
        rows.append({"kind": "balance", "case": name, "k": len(sizes), "experts": experts, "images": int(sizes.sum()),
                     "cv_random_mean": float(np.mean(rand)), "cv_random_max": float(np.max(rand)),
                     "cv_lpt": cv(packed), "lpt_images_per_expert": packed.tolist(), "sampling_floor_cv": floor})
        print(f"  images-per-expert CV, {name} (k={len(sizes)}, E={experts}): random table {np.mean(rand):.3f} "
              f"(mean of {seeds} seeds, max {np.max(rand):.3f}) vs LPT {cv(packed):.4f}", flush=True)
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    a = [r for r in rows if r["kind"] == "assign"]
    labels = [f"{r['path']}\nd={r['d']} k={r['k']} {r['threads']} thr" for r in a]
    axes[0].barh(range(len(a)), [r["fraction_of_peak"] for r in a])
    axes[0].set_yticks(range(len(a)), labels, fontsize=6)
    axes[0].axvline(0.7, color="k", ls="--", lw=0.8)
    axes[0].set_xlabel("assignment throughput / matmul peak (same run)")
    m = [r for r in rows if r["kind"] == "mpi"]
    axes[1].bar([f"{r['ranks']} rank x {r['threads_per_rank']} thr" for r in m], [r["seconds"] for r in m])
    axes[1].set_ylabel("k-means wall time (s)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mpi-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=2, help="threads for the single-process assignment runs")
    args = p.parse_args()
    if args.mpi_worker:
        mpi_worker()
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now().isoformat(timespec="seconds")
    meta = {"time": stamp, "host": platform.node(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "load_avg_start": os.getloadavg()[0]}
    rows = []
    print("assignment throughput:")
    for threads in (1, args.threads):
        for n, d, k in ((32768, 768, 256), (65536, 64, 1024)):
            rows += assignment(n, d, k, threads)
    print("1 vs 2 ranks (mpirun):")
    rows += mpi_scaling()
    print("expert balance at step 0:")
    rows += balance()
    meta["load_avg_end"] = os.getloadavg()[0]
    append_jsonl(RESULTS / "kmeans.jsonl", ({**meta, **r} for r in rows))
    plot(rows, RESULTS / "kmeans.png")
    print(f"wrote {RESULTS / 'kmeans.jsonl'} and kmeans.png")


if __name__ == "__main__":
    main()
