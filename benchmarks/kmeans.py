"""k-means benchmark (issues 4, 15): moce-ds's k-means against faiss.Kmeans at ImageNet shape; assignment
throughput; 1 vs 2 MPI ranks; LPT balance.

    python benchmarks/kmeans.py                    # ImageNet shape (issue 15), ~5 min on 2 cores, 4 GB of /tmp
    python benchmarks/kmeans.py --parts assign,mpi,balance   # the issue-4 parts (~1-2 min)

0. Scale (``--parts scale``, the default): ``--rows`` x ``--dim`` synthetic clustered unit-norm float32 rows
   (1,281,167 x 768 = 3.9 GB, ImageNet-1K) generated into a memory-mapped .npy under /tmp (deleted after), one
   k-means++ start, then in separate processes from that same start and the same memmap: ``faiss.Kmeans`` (all
   rows: ``max_points_per_centroid`` raised), moce-ds ``kmeans`` at 1 rank and under ``mpirun -n 2``. Time per
   iteration, peak RSS per rank (ru_maxrss: resident memmap pages count) and the objective (mean squared distance)
   of the centroids after ``--iters`` updates, scored exactly by both (faiss.Kmeans's own ``obj`` sums 1.28 M
   float32 terms in float32 and reads ~1 % high at this size; it is kept in the record as ``objectives``).

1. Assignment (nearest centroid for N rows) through each path -- our torch path (blocked addmm + argmin, what
   ``backend=auto`` picks on CPU), faiss-cpu's IndexFlatL2 with its default OpenMP threads and with 1 thread,
   scikit-learn's ``pairwise_distances_argmin_min`` -- as GFLOP/s of the 2*N*d*k distance matmul and as a
   fraction of the peak of a plain torch matmul measured in the same run.
2. The same k-means (fixed start, fixed iterations) under ``mpirun -n 1`` and ``-n 2``, 1 torch thread per rank,
   plus 1 rank with 2 threads; wall time of the k-means itself (rank 0, after a barrier).
3. Images per expert at step 0 for a random cluster table vs ``cluster.init_table=lpt`` (CV over experts).
4. ``--parts featurize``: images/s of the ``timm:vit_base_patch16_224`` feature source at 224 px per rank.
Never asserts.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from harness import RESULTS, cv, figure, run_command, save_figure, write_results

from moce_ds.clustering.kmeans import assign, import_faiss, kmeans, set_threads, unit_rows

MPI_N, MPI_D, MPI_K, MPI_ITERS = 200_000, 64, 256, 10



def _run_json(cmd: list[str], env: dict, timeout: int, label: str) -> dict | None:
    """Run a worker command; its last stdout line starting with '{' is its result (None, reported, on failure)."""
    out, _ = run_command(cmd, env=env, timeout=timeout, check=False)
    line = [s for s in out.stdout.splitlines() if s.startswith("{")]
    if out.returncode or not line:
        print(f"  {label} failed: {out.stderr[-800:]}")
        return None
    return json.loads(line[-1])

def make_rows(path: Path, n: int, d: int, k: int, seed: int = 0) -> np.ndarray:
    """Clustered unit rows float32 [n, d] written chunk by chunk into a .npy memmap: k directions + noise of
    norm ~1 (clusters overlap as real image features do)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((k, d)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, d))
    for s in range(0, n, 65536):
        b = min(65536, n - s)
        x = centres[rng.integers(0, k, b)] + rng.standard_normal((b, d), dtype=np.float32) / np.sqrt(d)
        out[s : s + b] = x / np.linalg.norm(x, axis=1, keepdims=True)
    out.flush()
    return out


def _peak_rss_gb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class _AnonPeak:
    """Peak anonymous memory (RssAnon: heap, arrays, not the memmap's file pages, which the kernel may drop) of
    this process, sampled every 20 ms in a thread: what a memory-mapped k-means really holds."""

    def __init__(self) -> None:
        import threading

        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def _now() -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
        return 0

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._now())

    def stop_gb(self) -> float:
        self._stop.set()
        self._thread.join()
        return max(self.peak, self._now()) / 2**30


def engine_worker(engine: str, data: Path, init_path: Path, iters: int, threads: int) -> None:
    """One engine on the memmap from the given start; prints one JSON line (rank 0 under mpirun)."""
    from moce_ds.clustering.kmeans import import_faiss, set_threads

    set_threads(threads)
    anon = _AnonPeak()
    x = np.load(data, mmap_mode="r")
    init = np.load(init_path)
    n, d = x.shape
    k = init.shape[0]
    if engine == "faiss.Kmeans":
        faiss = import_faiss()
        km = faiss.Kmeans(d, k, niter=iters, spherical=True, seed=0, max_points_per_centroid=n // k + 1)
        t = time.perf_counter()
        km.train(x, init_centroids=init)
        seconds = time.perf_counter() - t
        own = (2.0 - 2.0 * np.asarray(km.obj) / n).tolist()  # its obj: float32 sum of inner products per iteration
        exact = float(assign(x, unit_rows(km.centroids), spherical=True)[1].mean(dtype=np.float64))  # untimed
        print(json.dumps({"seconds": seconds, "iterations": iters, "objective": exact, "faiss_obj": own,
                          "peak_rss_gb": [_peak_rss_gb()], "peak_anon_gb": [anon.stop_gb()], "ranks": 1}))
        return
    from moce_ds.clustering.comm import LocalComm, MPIComm

    comm = MPIComm() if engine == "mpi" else LocalComm()
    lo, hi = (np.array_split(np.arange(n + 1), comm.world_size)[comm.rank][[0, -1]] if comm.world_size > 1
              else (0, n))
    comm.barrier()
    t = time.perf_counter()
    # iters + 1 passes: the last one scores the centroids after ``iters`` updates, as faiss.Kmeans's are scored
    res = kmeans(x[lo:hi], k, iters=iters + 1, tol=0, spherical=True, init=init, comm=comm)
    comm.barrier()
    seconds = time.perf_counter() - t
    rss, anon_gb = comm.gather(_peak_rss_gb()), comm.gather(anon.stop_gb())
    if comm.rank == 0:
        print(json.dumps({"seconds": seconds, "iterations": iters + 1, "objective": res.objective[-1],
                          "objectives": res.objective, "peak_rss_gb": rss, "peak_anon_gb": anon_gb,
                          "ranks": comm.world_size, "backend": res.backend, "reseeded": res.reseeded}))


def scale(n: int, d: int, k: int, iters: int, threads: int, ranks: list[int], with_faiss: bool = True,
          tmp_root: str = "/tmp", one_thread_base: bool = True) -> list[dict]:
    """faiss.Kmeans (all rows in RAM; skipped when ``with_faiss`` is off, e.g. rows larger than the machine's
    memory), moce-ds at 1 rank x ``threads`` threads, 1 rank x 1 thread (the base of the rank speedup: each rank
    of an MPI run has one thread of the same cores) and each of ``ranks`` ranks x threads // ranks threads."""
    from moce_ds.clustering.kmeans import kmeans_plus_plus

    tmp = Path(tempfile.mkdtemp(prefix="moce_kmeans_bench_", dir=tmp_root))
    rows = []
    try:
        t = time.perf_counter()
        x = make_rows(tmp / "rows.npy", n, d, k)
        sample = np.asarray(x[np.sort(np.random.default_rng(1).choice(n, min(n, 20 * k), replace=False))])
        np.save(tmp / "init.npy", kmeans_plus_plus(sample, k, np.random.default_rng(0)))
        del x, sample
        print(f"  {n} x {d} rows ({n * d * 4 / 2**30:.2f} GiB) and a k-means++ start in "
              f"{time.perf_counter() - t:.0f} s", flush=True)
        root = ["--allow-run-as-root"] if os.geteuid() == 0 else []
        runs = [("faiss.Kmeans", 1, threads)] if with_faiss else []
        runs += [("moce-ds kmeans", 1, t) for t in sorted({threads, 1} if one_thread_base else {threads}, reverse=True)]
        runs += [("moce-ds kmeans", r, max(1, threads // r)) for r in ranks if r > 1]
        for engine, r, thr in runs:
            worker = [sys.executable, __file__, "--engine-worker",
                      "faiss.Kmeans" if engine == "faiss.Kmeans" else "mpi" if r > 1 else "local",
                      str(tmp / "rows.npy"), str(tmp / "init.npy"), str(iters), str(thr)]
            env = dict(os.environ, OMP_NUM_THREADS=str(thr), MKL_NUM_THREADS=str(thr))
            cmd = worker if r == 1 else ["mpirun", "-n", str(r), "--oversubscribe", "--bind-to", "none", *root,
                                         "-x", "OMP_NUM_THREADS", "-x", "MKL_NUM_THREADS", *worker]
            res = _run_json(cmd, env, 1800, f"{engine} x{r}")
            if res is None:
                continue
            rows.append({"kind": "scale", "engine": engine, "ranks": r, "threads_per_rank": thr, "n": n, "d": d,
                         "k": k, "iters": res["iterations"], "seconds": res["seconds"],
                         "seconds_per_iter": res["seconds"] / res["iterations"],
                         "objective": res["objective"], "objectives": res.get("objectives", res.get("faiss_obj")),
                         "peak_rss_gb_per_rank": res["peak_rss_gb"], "rows_gb": n * d * 4 / 2**30,
                         "peak_anon_gb_per_rank": res.get("peak_anon_gb"),
                         "reseeded": res.get("reseeded"),  # empty clusters re-seeded (faiss.Kmeans splits instead)
                         "backend": res.get("backend", "")})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ref = next((r for r in rows if r["engine"] == "faiss.Kmeans"), None)
    one = next((r for r in rows if r["engine"] != "faiss.Kmeans" and r["ranks"] == 1 and r["threads_per_rank"] == 1),
               None)
    for r in rows:
        r["time_vs_faiss"] = None if ref is None else r["seconds_per_iter"] / ref["seconds_per_iter"]
        r["objective_vs_faiss"] = None if ref is None else r["objective"] / ref["objective"] - 1.0
        r["speedup_vs_1_rank"] = None if one is None else one["seconds_per_iter"] / r["seconds_per_iter"]
        vs = "" if ref is None else (f" ({r['time_vs_faiss']:.2f}x faiss.Kmeans; objective "
                                     f"{100 * r['objective_vs_faiss']:+.3f} % vs faiss)")
        anon = max(r["peak_anon_gb_per_rank"] or [float("nan")])
        print(f"  {r['engine']:15s} {r['ranks']} rank(s) x {r['threads_per_rank']} thr: "
              f"{r['seconds_per_iter']:.2f} s/iter{vs}, speedup vs 1x1 {r['speedup_vs_1_rank'] or float('nan'):.2f}, "
              f"peak RSS {max(r['peak_rss_gb_per_rank']):.2f} GiB / anonymous {anon:.2f} GiB per rank (rows "
              f"{r['rows_gb']:.2f} GiB), objective {r['objective']:.6f}", flush=True)
    return rows


def featurize(threads: int, batch: int = 32, reps: int = 3) -> list[dict]:
    """What an in-training refresh or ``cluster.py --features`` costs per rank at ImageNet scale: images/s of the
    ``timm:vit_base_patch16_224`` feature source (our extractor: resize/crop, normalise, encoder, mean token, unit
    rows) on 224 px uint8 images, random weights (no download; the cost does not depend on them)."""
    import timm
    from safetensors.torch import save_file

    from moce_ds.clustering.feature_sources import make_extractor

    set_threads(threads)
    tmp = Path(tempfile.mkdtemp(prefix="moce_feat_bench_"))
    try:
        weights = tmp / "vit_base.safetensors"
        save_file(timm.create_model("vit_base_patch16_224", pretrained=False).state_dict(), str(weights))
        extractor = make_extractor("timm:vit_base_patch16_224", str(weights), image_size=224)
        images = np.random.default_rng(0).integers(0, 256, (batch, 224, 224, 3), dtype=np.uint8)
        t = best_time(lambda: extractor(images), reps)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rate = batch / t
    rec = {"kind": "featurize", "source": "timm:vit_base_patch16_224", "image_size": 224, "batch": batch,
           "threads": threads, "images_per_s": rate, "hours_for_1281167_images_per_rank": 1_281_167 / rate / 3600}
    print(f"  featurise vit_base_patch16_224 at 224 px, {threads} thread(s): {rate:.1f} images/s per rank "
          f"({rec['hours_for_1281167_images_per_rank']:.1f} h for ImageNet-1K on one such rank)", flush=True)
    return [rec]


def best_time(fn, reps: int = 3) -> float:
    fn()  # warm-up
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return min(ts)


def assignment(n: int, d: int, k: int, threads: int) -> list[dict]:
    from sklearn.metrics import pairwise_distances_argmin_min

    faiss = import_faiss()
    set_threads(threads)  # torch's and faiss's OpenMP pools
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
        "moce-ds assign (faiss, chunked)": lambda: assign(x, c)[0],
        "torch": lambda: assign(x, c, backend="torch")[0],
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
    res = kmeans(mine, MPI_K, iters=MPI_ITERS, tol=0, init=init, comm=comm, spherical=False)  # Gaussian blobs
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
        r = _run_json(cmd, env, 300, f"mpirun -n {ranks}")
        if r is None:
            continue
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
    from moce_ds.moe.packing import expert_images, lpt_pack  # moved there from clustering/ (another change)

    cases = []
    rnd = latest_round(default_cache_dir() / "embedded-v1" / "clusters")
    if rnd is not None:
        cases.append(("embedded round (pixel features)", np.asarray(rnd.manifest["cluster_sizes"]), 4, 128))
    rng = np.random.default_rng(0)
    cases.append(("ImageNet-scale synthetic: lognormal sizes", (rng.lognormal(0, 0.5, 256) * 5000).astype(
        np.int64), 8, 768))
    rows = []
    for name, sizes, experts, width in cases:
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
    panels = [kind for kind in ("scale", "assign", "mpi") if any(r["kind"] == kind for r in rows)]
    if not panels:
        return
    fig, axes = figure(len(panels), squeeze=False)
    for ax, kind in zip(axes[0], panels):
        a = [r for r in rows if r["kind"] == kind]
        if kind == "scale":
            ax.bar([f"{r['engine']}\n{r['ranks']} rank x {r['threads_per_rank']} thr" for r in a],
                   [r["seconds_per_iter"] for r in a])
            ax.set_ylabel(f"s / iteration ({a[0]['n']} x {a[0]['d']} -> {a[0]['k']})")
        elif kind == "assign":
            ax.barh(range(len(a)), [r["fraction_of_peak"] for r in a])
            ax.set_yticks(range(len(a)), [f"{r['path']}\nd={r['d']} k={r['k']} {r['threads']} thr" for r in a],
                          fontsize=6)
            ax.set_xlabel("assignment throughput / matmul peak (same run)")
        else:
            ax.bar([f"{r['ranks']} rank x {r['threads_per_rank']} thr" for r in a], [r["seconds"] for r in a])
            ax.set_ylabel("k-means wall time (s)")
    save_figure(fig, path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mpi-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--engine-worker", nargs=5, default=None, help=argparse.SUPPRESS)
    p.add_argument("--parts", default="scale", help="comma list of scale, assign, mpi, balance, featurize")
    p.add_argument("--threads", type=int, default=2, help="threads per process (split over ranks under mpirun)")
    p.add_argument("--rows", type=int, default=1_281_167)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--k", type=int, default=256)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--ranks", default="1,2", help="moce-ds k-means rank counts for the scale part")
    p.add_argument("--no-faiss", action="store_true",
                   help="scale: skip faiss.Kmeans (it holds all rows in RAM; for out-of-core sizes)")
    p.add_argument("--no-1x1", action="store_true", help="scale: skip the 1 rank x 1 thread base (saves time)")
    p.add_argument("--tmp", default="/tmp", help="scale: where the memory-mapped rows are written (rows x dim x 4 B)")
    args = p.parse_args()
    if args.mpi_worker:
        mpi_worker()
        return
    if args.engine_worker:
        engine, data, init, iters, threads = args.engine_worker
        engine_worker(engine, Path(data), Path(init), int(iters), int(threads))
        return
    parts = set(args.parts.split(","))
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now().isoformat(timespec="seconds")
    meta = {"time": stamp, "host": platform.node(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "faiss": import_faiss().__version__, "load_avg_start": os.getloadavg()[0],
            "command": "python benchmarks/kmeans.py " + " ".join(sys.argv[1:])}
    rows = []
    if "scale" in parts:
        print(f"moce-ds kmeans vs faiss.Kmeans, {args.rows} x {args.dim} -> {args.k}, {args.iters} iterations:")
        rows += scale(args.rows, args.dim, args.k, args.iters, args.threads, [int(r) for r in args.ranks.split(",")],
                      with_faiss=not args.no_faiss, tmp_root=args.tmp, one_thread_base=not args.no_1x1)
    if "assign" in parts:
        print("assignment throughput:")
        for threads in (1, args.threads):
            for n, d, k in ((32768, 768, 256), (65536, 64, 1024)):
                rows += assignment(n, d, k, threads)
    if "mpi" in parts:
        print("1 vs 2 ranks (mpirun):")
        rows += mpi_scaling()
    if "featurize" in parts:
        print("featurisation throughput per rank:")
        rows += featurize(args.threads)
    if "balance" in parts:
        print("expert balance at step 0:")
        rows += balance()
    meta["load_avg_end"] = os.getloadavg()[0]
    write_results(({**meta, **r} for r in rows), "kmeans")
    plot(rows, RESULTS / "kmeans.png")
    print(f"wrote {RESULTS / 'kmeans.jsonl'} and kmeans.png")


if __name__ == "__main__":
    main()
