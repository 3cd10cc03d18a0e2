"""Train-step throughput of dense MAE, TokenMoE and MoCE at equal active parameters, ep_size 1 and 2.

Each rank count is one `deepspeed --num_gpus R` launch of this file's worker, which builds the three models
(width 384, 6 blocks of which 3 are MoE with 8 experts, top-1, capacity 1.25; 128 px images in 8 px patches,
75 % masked: 65 encoder tokens per image), one DeepSpeed engine each (ds_configs/zero2.json, ZeRO-2), and runs
their train steps in interleaved rounds on the same synthetic batch. With 2 ranks the experts are split
(ep_size=2); the dense model is plain data parallel.

The MoE layers' time (for dense: the MLPs of the same blocks, as "experts") is split by hooks into gate (MoCE:
the step's route plan and its expansion; TokenMoE: the token gate incl. its backward), all-to-all (DeepSpeed's
`_AllToAll`, forward and backward), experts (forward and backward) and dispatch (the rest of the MoE layer:
encode/decode gathers and their backward); `engine.step()` (ZeRO-2's partition update and the optimizer, whose
cost follows all parameters, not the active ones) is timed as "optimizer", ZeRO-2's gradient bucketing in the
backward's parameter hooks as "zero_grads" (taken out of the module spans it runs in), and the rest of the step
(attention, the other MLPs, decoder, loss) as "rest". `compute_vs_dense` compares the steps without the two
parameter-proportional parts: the model's own forward + backward. MFU counts the dense model's
FLOPs (torch's FlopCounterMode, forward + backward; it does not count CPU attention kernels, a few % here) for
every variant, against the best matmul
GFLOP/s measured in the same worker at the same thread count.

    python benchmarks/throughput.py   # ~4 min on 2 cores; appends to results/throughput.jsonl, draws throughput.png
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from harness import RESULTS, ROOT, figure, run_deepspeed, save_figure, write_results

VARIANTS = ("dense", "token", "moce")
ROUTING = {"dense": "dense", "token": "token", "moce": "cluster"}
PARTS = ("gate", "dispatch", "alltoall", "experts")


# ---------------------------------------------------------------------------------------------- worker side
class SplitClock:
    """Accumulates wall time per MoE part over a step, forward and backward, via module hooks.

    A module's backward time is the span between its full-backward pre-hook (output grads ready) and its
    full-backward hook (input grads done). The accelerator is synchronised at every mark so GPU times are real.
    """

    def __init__(self) -> None:
        from deepspeed.accelerator import get_accelerator

        self.sync = get_accelerator().synchronize
        self.totals: dict[str, float] = defaultdict(float)
        self._open: dict[tuple[str, int, str], float] = {}

    def _start(self, part: str, key: int, phase: str) -> None:
        self.sync()
        self._open[(part, key, phase)] = time.perf_counter()

    def _stop(self, part: str, key: int, phase: str) -> None:
        self.sync()
        t0 = self._open.pop((part, key, phase), None)
        if t0 is not None:
            self.totals[part] += time.perf_counter() - t0

    def watch(self, module: torch.nn.Module, part: str, forward: bool = True, backward: bool = True) -> None:
        key = id(module)
        if forward:
            module.register_forward_pre_hook(lambda m, a: self._start(part, key, "f"))
            module.register_forward_hook(lambda m, a, o: self._stop(part, key, "f"))
        if backward:
            module.register_full_backward_pre_hook(lambda m, g: self._start(part, key, "b"))
            module.register_full_backward_hook(lambda m, gi, go: self._stop(part, key, "b"))

    def wrap(self, fn, part: str, exclusive: bool = False):
        """Time every call of fn as `part`; exclusive: also take its time out of the spans open around it."""
        def timed(*args, **kwargs):
            self.sync()
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.sync()
                dt = time.perf_counter() - t0
                self.totals[part] += dt
                if exclusive:
                    for k in self._open:
                        self._open[k] += dt
        return timed

    def take(self) -> dict[str, float]:
        out, self.totals = dict(self.totals), defaultdict(float)
        return out


def _timed_all_to_all(clock: SplitClock):
    """DeepSpeed's all-to-all autograd function with both directions timed (the module-level name is patched)."""
    from deepspeed.moe import sharded_moe

    base = sharded_moe._AllToAll

    class TimedAllToAll(base):
        @staticmethod
        def forward(ctx, group, input):  # noqa: A002 - DeepSpeed's signature
            clock._start("alltoall", 1, "f")
            out = base.forward(ctx, group, input)
            clock._stop("alltoall", 1, "f")
            return out

        @staticmethod
        def backward(ctx, *grad_output):
            clock._start("alltoall", 1, "b")
            out = (None, base.apply(ctx.group, *grad_output))  # untimed inside: no double count
            clock._stop("alltoall", 1, "b")
            return out

    sharded_moe._AllToAll = TimedAllToAll


def matmul_peak_gflops(n: int = 2048, reps: int = 3) -> float:
    """Best GFLOP/s of an n x n x n float32 matmul on this rank's device and threads."""
    from deepspeed.accelerator import get_accelerator

    dev = get_accelerator().current_device_name()
    a, b = torch.randn(n, n, device=dev), torch.randn(n, n, device=dev)
    a @ b
    best = float("inf")
    for _ in range(reps):
        get_accelerator().synchronize()
        t0 = time.perf_counter()
        a @ b
        get_accelerator().synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def _spec(width: int, depth: int):
    from moce_ds.model.registry import MAESpec

    return MAESpec(img_size=128, patch_size=8, embed_dim=width, depth=depth, num_heads=width // 64,
                   decoder_embed_dim=128, decoder_depth=1, decoder_num_heads=4)


def worker(args: argparse.Namespace) -> None:
    import deepspeed
    from torch.utils.flop_counter import FlopCounterMode

    from moce_ds.config import load_config
    from moce_ds.engine.distributed import init_distributed
    from moce_ds.engine.ds_config import load_ds_config
    from moce_ds.engine.schedule import build_optimizer
    from moce_ds.model import build_model
    from moce_ds.moe import MoEMlp

    torch.set_num_threads(args.threads)
    info = init_distributed()
    dev = torch.device(deepspeed.get_accelerator().current_device_name())
    ep = info.world_size if args.experts % info.world_size == 0 else 1
    spec = _spec(args.width, args.depth)
    ds = load_ds_config(args.ds_config)
    ds["train_micro_batch_size_per_gpu"] = args.micro_batch
    ds["gradient_accumulation_steps"] = 1
    clock = SplitClock()
    _timed_all_to_all(clock)

    gen = torch.Generator().manual_seed(info.rank)
    images = torch.randn(args.micro_batch, 3, spec.img_size, spec.img_size, generator=gen).to(dev)
    clusters = torch.randint(0, args.clusters, (args.micro_batch,), generator=gen).to(dev)
    engines, models = {}, {}
    for variant in args.variants:
        cfg = load_config([], [f"moe.routing={ROUTING[variant]}", f"moe.num_experts={args.experts}",
                               f"moe.num_clusters={args.clusters}", "moe.top_k=1", "moe.capacity_factor=1.25",
                               f"moe.ep_size={ep}"])
        model = build_model(cfg, ep if variant != "dense" else 1, info.rank % ep, spec=spec)
        opt, sched = build_optimizer(model, 1e-4, 1e-5, 0.05, (0.9, 0.95), 1, 1000)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=ds)
        if variant == "dense":  # the MLPs where the MoE models have MoE layers: the like-for-like "experts" time
            from moce_ds.model.mae import moe_block_ids

            for i in moe_block_ids(spec.depth, load_config([], ["moe.routing=cluster"]).moe):
                clock.watch(model.blocks[i].mlp, "moe_total")
                clock.watch(model.blocks[i].mlp, "experts")
        else:
            for _, moe in model.moe_layers():
                clock.watch(moe, "moe_total")
                clock.watch(moe.deepspeed_moe.experts, "experts")
                if variant == "token":
                    clock.watch(moe.gate, "gate", backward=False)
                    clock.watch(moe.gate.wg, "gate", forward=False)  # the token gate's backward: its projection
                else:
                    clock.watch(moe.gate, "gate", backward=False)  # expansion of planned routes to tokens
            if variant == "moce":
                model.route_images = clock.wrap(model.route_images, "plan")  # the step's one route plan
        # ZeRO-2's gradient bucketing (copy into the bucket, flatten, all-reduce, copy back, copy into the
        # partition) runs in parameter hooks during backward, i.e. inside the module spans above; time it on its
        # own and out of those spans. Its cost follows all parameters, not the active ones.
        zero = engine.optimizer
        for name in ("reduce_ready_partitions_and_remove_grads", "overlapping_partition_gradients_reduce_epilogue",
                     "reduce_gradients"):
            if hasattr(zero, name):
                setattr(zero, name, clock.wrap(getattr(zero, name), "zero_grads", exclusive=True))
        engines[variant], models[variant] = engine, model
    if not all(isinstance(m, MoEMlp) for _, m in models.get("moce", models[args.variants[0]]).moe_layers()):
        raise RuntimeError("the MoE variant built no MoEMlp blocks: the split timings would measure nothing")

    with FlopCounterMode(display=False) as counter:  # useful work: the dense model's forward + backward
        dense_probe = build_model(load_config([], ["moe.routing=dense"]), spec=spec).to(dev)
        torch.manual_seed(0)
        dense_probe(images[:1]).loss.backward()
    flops_per_image = counter.get_total_flops()
    peak = matmul_peak_gflops()

    step_s: dict[str, list[float]] = defaultdict(list)
    parts: dict[str, list[dict[str, float]]] = defaultdict(list)
    dropped: dict[str, list[float]] = defaultdict(list)
    for r in range(args.warmup + args.steps):
        order = list(args.variants)
        order = order[r % len(order):] + order[:r % len(order)]
        for variant in order:
            engine = engines[variant]
            torch.manual_seed(1000 + r)  # same masks for every variant in a round
            clock.take()
            deepspeed.get_accelerator().synchronize()
            t0 = time.perf_counter()
            out = engine(images, clusters)
            engine.backward(out.loss)
            deepspeed.get_accelerator().synchronize()
            t_opt = time.perf_counter()
            engine.step()  # ZeRO-2 gradient reduction + optimizer: scales with all parameters, not active ones
            deepspeed.get_accelerator().synchronize()
            elapsed = time.perf_counter() - t0
            split = clock.take()
            split["optimizer"] = time.perf_counter() - t_opt
            if r >= args.warmup:
                step_s[variant].append(elapsed)
                parts[variant].append(split)
                loads = [m.last_load for _, m in models[variant].moe_layers() if m.last_load is not None]
                if loads:
                    req = sum(float(x["tokens_requested"].sum()) for x in loads)
                    dropped[variant].append(1 - sum(float(x["tokens_kept"].sum()) for x in loads) / req)

    results = []
    for variant in args.variants:
        med = statistics.median(step_s[variant])
        split = {p: statistics.median(s.get(p, 0.0) for s in parts[variant])
                 for p in (*PARTS, "moe_total", "plan", "optimizer", "zero_grads")}
        # The route plan runs before the first block, outside the layers' hooks: it is gate time of the MoE layers.
        split["gate"] += split["plan"]
        split["moe_total"] += split.pop("plan")
        split["dispatch"] = max(0.0, split["moe_total"] - split["gate"] - split["alltoall"] - split["experts"])
        split["rest"] = med - split["moe_total"] - split["optimizer"] - split["zero_grads"]  # attention, MLPs, decoder
        compute = med - split["optimizer"] - split["zero_grads"]  # the model's own forward + backward
        results.append({
            "variant": variant, "ranks": info.world_size, "ep_size": ep if variant != "dense" else 1,
            "step_s": med, "images_per_s": info.world_size * args.micro_batch / med, "compute_s": compute,
            "split_s": split, "moe_share": split["moe_total"] / med,
            "gate_share_of_moe": split["gate"] / split["moe_total"] if split["moe_total"] else 0.0,
            "mfu": flops_per_image * args.micro_batch / med / (peak * 1e9),
            "dropped_share": statistics.mean(dropped[variant]) if dropped[variant] else 0.0,
        })
    if info.is_main:
        meta = {"width": args.width, "depth": args.depth, "experts": args.experts, "micro_batch": args.micro_batch,
                "tokens_per_image": 1 + int(spec.num_patches * 0.25), "threads_per_rank": args.threads,
                "peak_gflops": peak, "useful_gflop_per_image": flops_per_image / 1e9, "steps": args.steps,
                "device": dev.type}
        Path(args.out).write_text(json.dumps([{**meta, **r} for r in results]))


# ---------------------------------------------------------------------------------------------- driver side
def run_ranks(ranks: int, variants: list[str], steps: int, width: int = 384, micro_batch: int = 32,
              experts: int = 8, threads: int = 1, extra: list[str] | None = None) -> list[dict]:
    """Launch the worker on `ranks` ranks under the deepspeed launcher; returns rank 0's rows."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        args = ["--worker", "--out", str(out), "--steps", str(steps), "--width", str(width), "--micro-batch",
                str(micro_batch), "--experts", str(experts), "--threads", str(threads), "--variants", *variants,
                *(extra or [])]
        run_deepspeed(Path(__file__).resolve(), args, ranks)
        if not out.exists():
            raise RuntimeError(f"the {ranks}-rank worker exited 0 but wrote no {out}")
        return json.loads(out.read_text())


def plot(rows: list[dict], path: Path) -> None:
    ranks = sorted({r["ranks"] for r in rows})
    fig, (ax1, ax2) = figure(2)
    width = 0.8 / len(VARIANTS)
    for i, variant in enumerate(VARIANTS):
        ys = [next((r["images_per_s"] for r in rows if r["ranks"] == n and r["variant"] == variant), 0) for n in ranks]
        ax1.bar([x + i * width for x in range(len(ranks))], ys, width, label=variant)
    ax1.set_xticks([x + width for x in range(len(ranks))], [f"{n} rank(s), ep_size {min(n, 8)}" for n in ranks])
    ax1.set_ylabel("train images/s (all ranks)")
    ax1.legend()
    labels, bottoms = [], []
    moe_rows = sorted(rows, key=lambda r: (r["ranks"], VARIANTS.index(r["variant"])))
    for j, r in enumerate(moe_rows):
        labels.append(f"{r['variant']}\n{r['ranks']}r")
        bottom = 0.0
        for part, color in zip(PARTS, ("tab:red", "tab:orange", "tab:purple", "tab:green")):
            v = 1e3 * r["split_s"][part]
            ax2.bar(j, v, bottom=bottom, color=color, label=part if j == 0 else None)
            bottom += v
        for part, color, label in (("zero_grads", "tab:cyan", "ZeRO-2 gradient copies"),
                                   ("optimizer", "tab:blue", "optimizer step")):
            v = 1e3 * r["split_s"].get(part, 0.0)
            ax2.bar(j, v, bottom=bottom, color=color, label=label if j == 0 else None)
            bottom += v
        rest = 1e3 * r["step_s"] - bottom
        ax2.bar(j, rest, bottom=bottom, color="lightgrey", label="rest of step" if j == 0 else None)
        bottoms.append(bottom)
    ax2.set_xticks(range(len(labels)), labels)
    ax2.set_ylabel("ms per step (rank 0)")
    ax2.legend(fontsize=8)
    r0 = rows[0]
    fig.suptitle(f"width {r0['width']}, {r0['depth']} blocks (half MoE, E={r0['experts']}, top-1, cf 1.25), "
                 f"micro-batch {r0['micro_batch']}, {r0['tokens_per_image']} tokens/image, "
                 f"{r0['threads_per_rank']} thread(s)/rank, {r0['device']}")
    save_figure(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--steps", type=int, default=8, help="timed rounds (each runs every variant once)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--width", type=int, default=384)
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--clusters", type=int, default=256)
    ap.add_argument("--micro-batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--ds-config", type=Path, default=ROOT / "ds_configs" / "zero2.json",
                    help="DeepSpeed JSON (its micro-batch is replaced by --micro-batch)")
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    stamp = time.strftime("%Y-%m-%d %H:%M")
    rows = []
    for n in args.ranks:
        extra = ["--warmup", str(args.warmup), "--depth", str(args.depth), "--clusters", str(args.clusters),
                 "--ds-config", str(args.ds_config)]
        got = run_ranks(n, args.variants, args.steps, args.width, args.micro_batch, args.experts, args.threads, extra)
        dense = next((r for r in got if r["variant"] == "dense"), None)
        for r in got:
            r.update(bench="throughput", time=stamp,
                     vs_dense=r["images_per_s"] / dense["images_per_s"] if dense else None,
                     compute_vs_dense=dense["compute_s"] / r["compute_s"] if dense else None)
            rows.append(r)
            print(f"{n} rank(s) {r['variant']:5s}: {r['images_per_s']:7.1f} images/s ({r['step_s']*1e3:.0f} ms/step)"
                  f"  vs dense {r['vs_dense'] or 0:.2f}x  MFU {100 * r['mfu']:.1f}%"
                  f"  MoE {100 * r['moe_share']:.0f}% of step"
                  f"  gate {100 * r['gate_share_of_moe']:.1f}% of MoE  dropped {100 * r['dropped_share']:.1f}%  "
                  + " ".join(f"{p} {1e3 * r['split_s'][p]:.1f}" for p in (*PARTS, "optimizer", "zero_grads"))
                  + f"  fwd+bwd without ZeRO's copies vs dense {r['compute_vs_dense'] or 0:.2f}x", flush=True)
    write_results(rows, path=args.out / "throughput.jsonl")
    plot(rows, args.out / "throughput.png")
    print(f"wrote {args.out / 'throughput.jsonl'} and throughput.png")


if __name__ == "__main__":
    main()
