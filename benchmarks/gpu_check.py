"""The prepared first-GPU check (issue 17 item 7): a few minutes on one CUDA machine, JSON lines out.

    python benchmarks/gpu_check.py [--steps 20] [--batch 64] [--out benchmarks/results/gpu_check.jsonl]

On CUDA: (1) one rank, bf16 autocast, forward + backward + AdamW steps of the vit_base_patch16_224-sized MAE,
dense vs MoCE E=8 (images/s, peak memory); (2) our faiss-gpu k-means at 1.28 M x 768 -> 256 (a few Lloyd
iterations on random unit rows) against faiss.Kmeans(gpu=True) with the same iterations; (3) the real launcher
(``deepspeed launchers/pretrain.py`` with ds_configs/zero2_bf16.json, NCCL, the embedded set upscaled to 224 px)
for MoCE E=8 on one GPU with ZeRO-2's ``overlap_comm`` on and off (the side stream that has never run on CPU),
and on 2 GPUs (expert parallel, ep_size=2) when two are visible: median images/s over the steps after warm-up
from the run's metrics.jsonl, and the exit code. Every record is one JSON line on stdout and in --out. On a
machine without CUDA it says so and exits 0. Never asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _emit(rec: dict, out: Path | None) -> None:
    line = json.dumps(rec)
    print(line, flush=True)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a") as f:
            f.write(line + "\n")


def _one_rank_group() -> None:
    import torch.distributed as dist

    if not dist.is_initialized():  # DeepSpeed's MoE layers build their expert groups on a process group
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29531")
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("LOCAL_RANK", "0")
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl", verbose=False)


def model_steps(routing: str, experts: int, steps: int, batch: int) -> dict:
    import torch

    from moce_ds.config import load_config
    from moce_ds.model import build_model

    over = ["model.size=vit_base_patch16_224", f"moe.routing={routing}", f"moe.num_experts={experts}",
            "moe.num_clusters=256"]
    model = build_model(load_config([], over)).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    imgs = torch.randint(0, 256, (batch, 3, 224, 224), dtype=torch.uint8, device="cuda")  # the loader's format
    cluster = torch.randint(0, 256, (batch,), device="cuda")
    torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(steps + 3):
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(imgs, cluster)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i >= 3:  # warm-up: kernels chosen, allocator settled
            times.append(time.perf_counter() - t)
    step = sorted(times)[len(times) // 2]
    return {"check": "model_step", "routing": routing, "experts": experts if routing != "dense" else 0,
            "batch": batch, "precision": "bf16 autocast, fp32 weights", "step_s_median": step,
            "images_per_s": batch / step, "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30,
            "loss": float(out.loss)}


def kmeans_check(n: int, d: int, k: int, iters: int) -> list[dict]:
    import numpy as np

    from moce_ds.clustering.kmeans import import_faiss, kmeans, unit_rows

    faiss = import_faiss()
    rng = np.random.default_rng(0)
    x = unit_rows(rng.standard_normal((n, d), dtype=np.float32))
    init = x[rng.choice(n, k, replace=False)]
    recs = []
    t = time.perf_counter()
    ours = kmeans(x, k, iters=iters, tol=0.0, spherical=True, init=init)
    recs.append({"check": "kmeans", "impl": f"moce_ds ({ours.backend}, gpus={faiss.get_num_gpus()})", "n": n,
                 "d": d, "k": k, "iters": len(ours.objective), "s_per_iter": (time.perf_counter() - t) / iters,
                 "objective": ours.objective[-1]})
    km = faiss.Kmeans(d, k, niter=iters, spherical=True, gpu=True, max_points_per_centroid=n // k + 1, seed=0)
    t = time.perf_counter()
    km.train(x, init_centroids=init)
    recs.append({"check": "kmeans", "impl": "faiss.Kmeans(gpu=True)", "n": n, "d": d, "k": k, "iters": iters,
                 "s_per_iter": (time.perf_counter() - t) / iters, "objective": float(km.obj[-1]) / n
                 if len(km.obj) else None})
    return recs


def engine_steps(num_gpus: int, overlap_comm: bool, steps: int, batch: int, tmp: Path,
                 size: str = "vit_base_patch16_224", extra: list[str] = ()) -> dict:
    """MoCE E=8 through the real launcher and DeepSpeed engine (ZeRO-2, bf16; NCCL on GPUs). `size`, `extra`
    (more overrides): for the CPU test of this function."""
    from moce_ds.engine.launch_command import deepspeed_command

    ds = json.loads((ROOT / "ds_configs" / "zero2_bf16.json").read_text())
    ds["train_micro_batch_size_per_gpu"] = batch
    ds.setdefault("zero_optimization", {})["overlap_comm"] = overlap_comm
    name = f"gpus{num_gpus}_overlap{int(overlap_comm)}"
    ds_path, run = tmp / f"{name}.json", tmp / name
    ds_path.write_text(json.dumps(ds))
    over = [f"output_dir={run}", f"model.size={size}", "moe.num_experts=8", f"train.max_steps={steps}",
            "train.log_every=1", "train.warmup_steps=2", "metrics.enabled=false", "metrics.report=false",
            "data.num_workers=6", "train.peer_timeout_s=600", *extra]
    t = time.perf_counter()
    proc = subprocess.run(deepspeed_command(ROOT / "launchers" / "pretrain.py",
                                            ["--deepspeed_config", str(ds_path), *over], num_gpus),
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    rec = {"check": "engine_step", "gpus": num_gpus, "ep_size": num_gpus, "overlap_comm": overlap_comm,
           "batch_per_gpu": batch, "rc": proc.returncode, "wall_s": time.perf_counter() - t}
    metrics = run / "metrics.jsonl"
    if proc.returncode or not metrics.is_file():
        rec["error"] = (proc.stderr or proc.stdout)[-1500:]
        return rec
    log = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    rates = sorted(r["images_per_s"] for r in log[3:] if "images_per_s" in r)  # after warm-up
    rec.update(steps=len(log), images_per_s_median=rates[len(rates) // 2] if rates else None,
               last_loss=log[-1].get("loss") if log else None)
    return rec


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--kmeans-n", type=int, default=1_280_000)
    p.add_argument("--kmeans-iters", type=int, default=5)
    p.add_argument("--engine-steps", type=int, default=30, help="launcher runs: optimizer steps each")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "gpu_check.jsonl")
    args = p.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: needs CUDA (torch sees no GPU); nothing to measure on this machine.")
        return 0
    out = args.out
    _emit({"check": "device", "name": torch.cuda.get_device_name(0), "count": torch.cuda.device_count(),
           "torch": torch.__version__, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, out)
    _one_rank_group()
    for routing, experts in (("dense", 8), ("cluster", 8)):
        try:
            _emit(model_steps(routing, experts, args.steps, args.batch), out)
        except Exception as e:  # noqa: BLE001 - a check that fails is a record, the others still run
            _emit({"check": "model_step", "routing": routing, "error": f"{type(e).__name__}: {e}"}, out)
        torch.cuda.empty_cache()
    try:
        for rec in kmeans_check(args.kmeans_n, 768, 256, args.kmeans_iters):
            _emit(rec, out)
    except Exception as e:  # noqa: BLE001
        _emit({"check": "kmeans", "error": f"{type(e).__name__}: {e}"}, out)
    with tempfile.TemporaryDirectory(prefix="moce_gpu_check_") as tmp:
        runs = [(1, True), (1, False)] + ([(2, True)] if torch.cuda.device_count() >= 2 else [])
        for gpus, overlap in runs:
            try:
                _emit(engine_steps(gpus, overlap, args.engine_steps, args.batch, Path(tmp)), out)
            except Exception as e:  # noqa: BLE001
                _emit({"check": "engine_step", "gpus": gpus, "overlap_comm": overlap,
                       "error": f"{type(e).__name__}: {e}"}, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
