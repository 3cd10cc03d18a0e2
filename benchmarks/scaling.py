"""Expert-parallel scaling of MoCE: measured at 1..R ranks, and a documented model of 8 to 1024 GPUs.

    python benchmarks/scaling.py                  # ~2-3 min on 2 cores; appends results/scaling.jsonl, scaling.png
    python benchmarks/scaling.py --ranks 1 2 4 8  # on a GPU node (ranks should divide --experts: see below)
    python benchmarks/scaling.py --skip-measure   # model + re-plot from the latest measured rows (no launch)
    python benchmarks/scaling.py --skip-measure --from-jsonl benchmarks/results/throughput.jsonl

Part 1, measured (weak scaling). For every R in --ranks, one `deepspeed --num_gpus R` launch of
benchmarks/throughput.py's worker (`throughput.run_ranks`) trains the MoCE model only (width 384, 6 blocks of which
3 are MoE with E=8 experts, top-1, capacity 1.25, ZeRO-2, 65 tokens per image) at a fixed micro-batch per rank, so
ep_size = R (the worker falls back to ep_size 1 when R does not divide E). Reported per R: images/s over all ranks
and per rank, scaling efficiency = images/s(R) / (R * images/s(1)), all-to-all share = split_s.alltoall / step_s
(DeepSpeed's `_AllToAll`, forward and backward, rank 0), and the experts' achieved GFLOP/s (expert FLOPs per step /
split_s.experts). With --skip-measure nothing is launched: the latest MoCE rows per rank count are read from
--from-jsonl (default: results/throughput.jsonl and results/scaling.jsonl) and are not written again.

Part 2, modelled (pure arithmetic; every row carries its inputs and these formulas in `formulas`). N GPUs in
--gpus (8..1024), G = 8 GPUs per node, E experts in --model-experts (8 and 16), model geometry --model-size
(ViT-B/16 at 224: d=768, 12 blocks, MoE in every other block -> L=6 MoE layers; decoder 512 wide, 8 blocks),
mask 75 % -> T = 1 + 196/4 = 50 encoder tokens per image, B = 128 images per GPU, bf16 (2 bytes per element).

  ep = min(N, E) GPUs per expert group (E/ep experts per GPU); above E GPUs the N/ep = R groups are data-parallel
  replicas of each other.
  All-to-all, per GPU per MoE layer per step: dispatch and combine in the forward and both again in the backward
  = 4 all-to-alls, each sending the (ep-1)/ep of its capacity buffer that belongs to other GPUs (the same amount
  arrives over the other link direction at the same time):
      a2a_bytes = 4 * (ep-1)/ep * cf * B * T * d * 2 bytes          cf = 1.25 (the buffer DeepSpeed sends: MoCE's
                                                                     packed experts skip padding rows in compute,
                                                                     not on the wire); cf = 1.0: packed lower bound
      a2a_s     = L * (a2a_bytes / bw + 4 * alpha * (ep-1))
  with bw, alpha = NVLink 450 GB/s per direction per GPU (H100/H200 NVLink 4), 10 us when the group fits in a node
  (ep <= G), else InfiniBand 50 GB/s per GPU (400 Gb/s NDR, one NIC per GPU), 20 us: every byte is charged at the
  inter-node speed (conservative; `a2a_s_two_tier` charges only the off-node share (ep-G)/ep at IB speed while the
  on-node share (G-1)/ep goes over NVLink concurrently: max of the two, plus the same latency).
  Gradient all-reduce (ring, bandwidth term only: bucketed all-reduces of tens of MB are bandwidth bound and NCCL
  uses tree algorithms whose latency grows with log N):
      ar_shared_s = 2 (N-1)/N * P_shared * 2 bytes / bw_ar                      over all N GPUs
      ar_expert_s = 2 (R-1)/R * P_expert_per_gpu * 2 bytes / bw_ar              over the R replicas of a group
  bw_ar = IB when N > G (the ring crosses nodes), else NVLink. P_shared: every non-expert trainable parameter
  (patch embedding, attention, dense MLPs, norms, the cluster gates' tables C x d and projections d x E, decoder);
  P_expert_per_gpu = E/ep * L * (2 d h + h + d), h = 4 d. Not overlapped with the backward (worst case);
  `step_s_ar_overlapped` is the best case, max(0, all-reduce - backward compute) exposed, backward = 2/3 of compute.
  Compute per step = F * B / rate, where F is the training FLOPs per image, counted as
      F = 6 * sum over linear layers of (weights * tokens through them)        forward 2, backward 4 per weight-token
          - 2 * (3 p^2 d) * P                        the patch embedding's input needs no gradient (4, not 6)
          + 12 * sum over blocks of (T_block^2 * width)         attention QK^T and AV: 2 T^2 width each forward
  (encoder blocks on T tokens, the one active expert per MoE layer (top-1), decoder embedding on T, decoder blocks
  and prediction on 1 + P tokens; gates, norms, softmax and the loss are neglected). When measured rows exist, F is
  the measured `useful_gflop_per_image` scaled to the modelled geometry: F = F(model) * k, k = counter / F(measured)
  (`flop_counter_vs_formula`), where torch's FlopCounterMode is compared with the whole formula when it counts
  attention (CUDA's SDPA kernels) and with its linear part when it does not (CPU's SDPA kernel is not counted;
  on the measured shape the linear part reproduces the counter exactly: k = 1.000).
  rate: --compute gpu (default) = 989 TFLOP/s (H200 bf16 dense) * 40 % MFU; --compute measured = the experts'
  achieved FLOP/s in the measured 1-rank row (meaningful when Part 1 ran on the GPU node: a CPU rate next to GPU
  links makes communication vanish), applied to all of the step's FLOPs.
      step_s = compute_s + a2a_s + ar_shared_s + ar_expert_s       (the all-to-all is on the critical path)
      efficiency(N) = step_s(8) / step_s(N)      (weak scaling: images/s per GPU relative to 8 GPUs)
      a2a_share = a2a_s / step_s
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import throughput  # benchmarks/throughput.py: the launcher and geometry of the measured runs
from harness import RESULTS, figure, save_figure, write_results

GB = 1e9

FORMULAS = {
    "ep": "min(N, E); replicas R = N / ep",
    "a2a_bytes_per_gpu": "L * 4 * (ep-1)/ep * cf * B * T * d * bytes_per_elem",
    "a2a_s": "L * (4 * (ep-1)/ep * cf * B * T * d * bytes_per_elem / bw + 4 * alpha * (ep-1)); "
             "bw, alpha = NVLink, alpha_intra if ep <= G else IB, alpha_inter",
    "a2a_s_two_tier": "L * (max(4*(G-1)/ep*buf / NVLink, 4*(ep-G)/ep*buf / IB) + 4 * alpha * (ep-1)) for ep > G",
    "ar_shared_s": "2 (N-1)/N * P_shared * bytes_per_elem / bw_ar; bw_ar = IB if N > G else NVLink",
    "ar_expert_s": "2 (R-1)/R * P_expert_per_gpu * bytes_per_elem / bw_ar",
    "flops_per_image": "6 * sum(linear weights * tokens) - 2 * 3p^2 d * P + 12 * sum_blocks(T^2 * width)",
    "compute_s": "flops_per_image * B / rate; rate = peak * mfu (gpu) or measured expert FLOP/s (measured)",
    "step_s": "compute_s + a2a_s + ar_shared_s + ar_expert_s (no overlap)",
    "step_s_ar_overlapped": "compute_s + a2a_s + max(0, ar_shared_s + ar_expert_s - 2/3 compute_s)",
    "efficiency": "step_s(N_min) / step_s(N)",
    "a2a_share": "a2a_s / step_s",
}


# ---------------------------------------------------------------------------------------------- geometry
@dataclass(frozen=True)
class Geometry:
    """An MAE ViT as the model counts it: T encoder tokens of width d, 1 + P decoder tokens of width dd."""

    img_size: int
    patch_size: int
    width: int
    depth: int
    dec_width: int
    dec_depth: int
    mlp_ratio: float
    moe_layers: int
    experts: int
    clusters: int
    tokens: int  # encoder tokens per image after masking, cls included

    @property
    def patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    @classmethod
    def of(cls, spec, experts: int, clusters: int, tokens: int, moe_layers: int | None = None) -> Geometry:
        """From a `MAESpec`; MoE in every other block (1, 3, 5, ...) unless moe_layers says otherwise."""
        return cls(spec.img_size, spec.patch_size, spec.embed_dim, spec.depth, spec.decoder_embed_dim,
                   spec.decoder_depth, spec.mlp_ratio, spec.depth // 2 if moe_layers is None else moe_layers,
                   experts, clusters, tokens)


def _block_params(w: int, h: int) -> int:
    """Attention + norms of one pre-norm block (qkv and proj with biases, two LayerNorms); the MLP is apart."""
    return 3 * w * w + 3 * w + w * w + w + 4 * w


def _mlp_params(w: int, h: int) -> int:
    return 2 * w * h + h + w


def param_counts(g: Geometry) -> dict[str, int]:
    """Trainable parameters: shared (all but experts), one expert's MLP, the gates. Sin-cos positions are buffers."""
    d, dd, p2 = g.width, g.dec_width, 3 * g.patch_size**2
    h, hd = int(g.mlp_ratio * d), int(g.mlp_ratio * dd)
    encoder = p2 * d + d + d + g.depth * _block_params(d, h) + (g.depth - g.moe_layers) * _mlp_params(d, h) + 2 * d
    gates = g.moe_layers * (g.clusters * d + d * g.experts)  # cluster table C x d and projection d x E per layer
    decoder = d * dd + dd + dd + g.dec_depth * (_block_params(dd, hd) + _mlp_params(dd, hd)) + 2 * dd + dd * p2 + p2
    return {"shared": encoder + gates + decoder, "expert": _mlp_params(d, h), "gates": gates}


def train_flops_per_image(g: Geometry) -> dict[str, float]:
    """Forward + backward FLOPs of one image (top-1: one expert MLP per MoE layer), see the module docstring."""
    d, dd, p2, t, td = g.width, g.dec_width, 3 * g.patch_size**2, g.tokens, 1 + g.patches
    h, hd = int(g.mlp_ratio * d), int(g.mlp_ratio * dd)
    attn_w, attn_dw = 4 * d * d, 4 * dd * dd  # qkv + proj weights
    linear = (g.depth * (attn_w + 2 * d * h) * t  # encoder blocks; a MoE block's active expert has a dense MLP's size
              + d * dd * t  # decoder embedding, on the visible tokens
              + g.dec_depth * (attn_dw + 2 * dd * hd) * td + dd * p2 * td)  # decoder blocks and pixel prediction
    patch = 4 * p2 * d * g.patches  # forward 2 + weight gradient 2 on every patch (masking comes after)
    attention = 12 * (g.depth * t * t * d + g.dec_depth * td * td * dd)
    expert = 6 * g.moe_layers * 2 * d * h * t
    return {"total": 6 * linear + patch + attention, "expert": expert, "attention": attention}


def counter_calibration(row: dict, clusters: int) -> tuple[float, bool]:
    """Measured FlopCounterMode FLOPs / the formula's, and whether the counter saw attention (CUDA SDPA only)."""
    f = train_flops_per_image(measured_geometry(row, clusters))
    counter, linear = row["useful_gflop_per_image"] * GB, f["total"] - f["attention"]
    with_attention = abs(counter / f["total"] - 1) < abs(counter / linear - 1)
    return counter / (f["total"] if with_attention else linear), with_attention


def measured_geometry(row: dict, clusters: int) -> Geometry:
    """The geometry throughput.py trained for a row (its private spec helper is the one owner of that shape)."""
    return Geometry.of(throughput._spec(row["width"], row["depth"]), row["experts"], clusters, row["tokens_per_image"])


# ---------------------------------------------------------------------------------------------- part 1: measured
def measure(args: argparse.Namespace, stamp: str) -> list[dict]:
    rows = []
    for r in args.ranks:
        if args.experts % r:
            print(f"note: {r} ranks do not divide {args.experts} experts: the worker runs ep_size 1", flush=True)
        extra = ["--warmup", str(args.warmup), "--depth", str(args.depth), "--clusters", str(args.clusters)]
        t0 = time.perf_counter()
        got = throughput.run_ranks(r, ["moce"], args.steps, args.width, args.micro_batch, args.experts, args.threads,
                                   extra)
        row = next(x for x in got if x["variant"] == "moce")
        row.update(bench="scaling", time=stamp, launch_s=time.perf_counter() - t0, source="launched")
        rows.append(row)
        print(f"{r} rank(s): {row['images_per_s']:.1f} images/s ({row['step_s'] * 1e3:.0f} ms/step), "
              f"launch {row['launch_s']:.0f} s", flush=True)
    return rows


def reuse(paths: list[Path], ranks: list[int]) -> list[dict]:
    """The latest MoCE row per rank count (by its time stamp, then file order) from throughput/scaling JSON lines."""
    from moce_ds.metrics.jsonl import read_jsonl

    found: list[tuple[str, int, dict]] = []
    for path in paths:
        if not path.exists():
            continue
        for i, row in enumerate(read_jsonl(path)):
            if row.get("variant") == "moce" and "images_per_s" in row and row.get("kind", "measured") == "measured":
                found.append((row.get("time", ""), i, {**row, "source": str(path)}))
    latest: dict[int, dict] = {}
    for _, _, row in sorted(found, key=lambda x: (x[0], x[1])):
        latest[row["ranks"]] = row
    rows = [latest[r] for r in ranks if r in latest]
    if len({r.get("time") for r in rows}) > 1:
        print("note: the reused rows come from different runs: "
              + ", ".join(f"{r['ranks']}r {r['time']}" for r in rows))
    return rows


def annotate(rows: list[dict], clusters: int) -> list[dict]:
    """Adds weak-scaling efficiency, all-to-all share and the experts' achieved rate to measured rows."""
    base = next((r for r in rows if r["ranks"] == 1), None)
    for r in rows:
        g = measured_geometry(r, clusters)
        # Packed experts compute the kept tokens only: B * T * (1 - dropped) per rank on average.
        expert_flop = train_flops_per_image(g)["expert"] * r["micro_batch"] * (1 - r.get("dropped_share", 0.0))
        rate = expert_flop / r["split_s"]["experts"] if r["split_s"]["experts"] > 0 else float("nan")
        r.update(kind="measured", images_per_s_per_rank=r["images_per_s"] / r["ranks"],
                 efficiency=r["images_per_s"] / (r["ranks"] * base["images_per_s"]) if base else None,
                 a2a_share=r["split_s"]["alltoall"] / r["step_s"], expert_flop_per_step=expert_flop,
                 expert_gflop_per_s=rate / GB, expert_mfu=rate / (r["peak_gflops"] * GB),
                 **dict(zip(("flop_counter_vs_formula", "counter_counts_attention"), counter_calibration(r, clusters))))
    return rows


# ---------------------------------------------------------------------------------------------- part 2: model
@dataclass(frozen=True)
class Links:
    gpus_per_node: int
    nvlink_gbs: float  # per direction per GPU
    ib_gbs: float  # per GPU (one NIC each)
    alpha_intra_us: float
    alpha_inter_us: float
    bytes_per_elem: int


def model_rows(gpus: list[int], g: Geometry, links: Links, batch: int, cf: float, flops_per_image: float,
               rate: float) -> list[dict]:
    """One row per GPU count: communication volume and times, compute, predicted step and efficiency (docstring)."""
    if any(n % min(n, g.experts) or g.experts % min(n, g.experts) for n in gpus):
        raise ValueError(f"every GPU count in {gpus} must divide or be a multiple of E={g.experts}")
    params = param_counts(g)
    gpn, nvl, ib, bpe = links.gpus_per_node, links.nvlink_gbs * GB, links.ib_gbs * GB, links.bytes_per_elem
    compute = flops_per_image * batch / rate
    rows = []
    for n in gpus:
        ep = min(n, g.experts)
        replicas = n // ep
        intra = ep <= gpn
        bw, alpha = (nvl, links.alpha_intra_us * 1e-6) if intra else (ib, links.alpha_inter_us * 1e-6)
        buffer = g.tokens * batch * g.width * bpe  # one all-to-all's input at cf = 1: (B * T, d) per GPU
        latency = 4 * alpha * (ep - 1)
        layer_bytes = 4 * (ep - 1) / ep * cf * buffer
        a2a = g.moe_layers * (layer_bytes / bw + latency)
        a2a_packed = g.moe_layers * (4 * (ep - 1) / ep * buffer / bw + latency)
        if intra:
            a2a_two_tier = a2a
        else:
            on, off = 4 * (gpn - 1) / ep * cf * buffer, 4 * (ep - gpn) / ep * cf * buffer
            a2a_two_tier = g.moe_layers * (max(on / nvl, off / ib) + latency)
        bw_ar = ib if n > gpn else nvl
        expert_per_gpu = g.experts // ep * g.moe_layers * params["expert"]
        ar_shared = 2 * (n - 1) / n * params["shared"] * bpe / bw_ar
        ar_expert = 2 * (replicas - 1) / replicas * expert_per_gpu * bpe / bw_ar
        step = compute + a2a + ar_shared + ar_expert
        step_overlap = compute + a2a + max(0.0, ar_shared + ar_expert - 2 / 3 * compute)
        rows.append({
            "gpus": n, "experts": g.experts, "ep_size": ep, "replicas": replicas, "nodes": math.ceil(n / gpn),
            "a2a_link": "nvlink" if intra else "infiniband", "a2a_bw_gbs": bw / GB, "a2a_alpha_us": alpha * 1e6,
            "allreduce_link": "infiniband" if n > gpn else "nvlink", "allreduce_bw_gbs": bw_ar / GB,
            "a2a_bytes_per_gpu": g.moe_layers * layer_bytes,
            "a2a_bytes_per_gpu_packed": g.moe_layers * layer_bytes / cf,
            "a2a_s": a2a, "a2a_latency_s": g.moe_layers * latency, "a2a_bandwidth_s": a2a - g.moe_layers * latency,
            "a2a_s_packed": a2a_packed, "a2a_s_two_tier": a2a_two_tier,
            "shared_params": params["shared"], "expert_params_per_gpu": expert_per_gpu,
            "allreduce_shared_s": ar_shared, "allreduce_expert_s": ar_expert, "compute_s": compute,
            "step_s": step, "step_s_ar_overlapped": step_overlap,
            "images_per_s": n * batch / step, "images_per_s_per_gpu": batch / step,
            "a2a_share": a2a / step, "allreduce_share": (ar_shared + ar_expert) / step,
        })
    for r in rows:
        r["efficiency"] = rows[0]["step_s"] / r["step_s"]
        r["efficiency_ar_overlapped"] = rows[0]["step_s_ar_overlapped"] / r["step_s_ar_overlapped"]
        r["efficiency_vs_gpus"] = rows[0]["gpus"]
    return rows


def compute_rate(args: argparse.Namespace, source: str, measured: list[dict]) -> tuple[float, dict]:
    """FLOP/s per GPU for the model and where it came from."""
    if source == "gpu":
        return args.peak_tflops * 1e12 * args.mfu, {"peak_tflops": args.peak_tflops, "mfu": args.mfu}
    row = next((r for r in measured if r["ranks"] == 1), measured[0] if measured else None)
    if row is None:
        raise SystemExit("--compute measured needs measured rows (run Part 1 or point --from-jsonl at them)")
    return row["expert_gflop_per_s"] * GB, {"rate_from_ranks": row["ranks"], "rate_from_time": row["time"],
                                            "rate_device": row["device"], "expert_mfu": row["expert_mfu"]}


def modelled(args: argparse.Namespace, measured: list[dict], stamp: str) -> list[dict]:
    from moce_ds.model.registry import get_spec

    spec = get_spec(args.model_size)
    tokens = 1 + int(spec.num_patches * (1 - args.mask_ratio))  # cls + kept patches, as MAE's random_masking
    links = Links(args.gpus_per_node, args.nvlink_gbs, args.ib_gbs, args.alpha_intra_us, args.alpha_inter_us,
                  args.bytes_per_elem)
    ref = next((r for r in measured if r["ranks"] == 1), measured[0] if measured else None)
    rows = []
    for e in args.model_experts:
        g = Geometry.of(spec, e, args.clusters, tokens)
        formula = train_flops_per_image(g)["total"]
        # The counter's FLOPs on the measured shape, scaled by the formula to the modelled one.
        flops = formula * (ref["flop_counter_vs_formula"] if ref is not None else 1.0)
        for source in args.compute:
            rate, rate_info = compute_rate(args, source, measured)
            for r in model_rows(args.gpus, g, links, args.model_batch, args.capacity_factor, flops, rate):
                rows.append({
                    "bench": "scaling", "time": stamp, "kind": "model", "compute_source": source, **r,
                    "model_size": args.model_size, "geometry": asdict(g), "micro_batch": args.model_batch,
                    "capacity_factor": args.capacity_factor, "links": asdict(links),
                    "flops_per_image": flops, "flops_per_image_formula": formula,
                    "flops_scaled_from_counter": ref is not None, "compute_flop_per_s": rate, **rate_info,
                    "measured_source": f"{ref['source']} {ref['time']}" if ref else None, "formulas": FORMULAS,
                })
    return rows


# ---------------------------------------------------------------------------------------------- report
def print_tables(measured: list[dict], model: list[dict]) -> None:
    if measured:
        print("\nmeasured (weak scaling, MoCE, micro-batch per rank fixed)")
        print(f"{'ranks':>5} {'ep':>3} {'images/s':>9} {'per rank':>9} {'efficiency':>10} {'a2a share':>9} "
              f"{'MoE share':>9} {'expert GFLOP/s':>14}")
        for r in measured:
            eff = f"{r['efficiency']:.2f}" if r["efficiency"] is not None else "-"
            print(f"{r['ranks']:>5} {r['ep_size']:>3} {r['images_per_s']:>9.1f} {r['images_per_s_per_rank']:>9.1f} "
                  f"{eff:>10} {100 * r['a2a_share']:>8.1f}% {100 * r['moe_share']:>8.1f}% "
                  f"{r['expert_gflop_per_s']:>14.1f}")
        r0 = measured[0]
        print(f"FlopCounterMode / FLOP formula on the measured shape: {r0['flop_counter_vs_formula']:.3f} "
              f"({'with' if r0['counter_counts_attention'] else 'without'} attention)")
    for source in dict.fromkeys(r["compute_source"] for r in model):
        rs = [r for r in model if r["compute_source"] == source]
        r0 = rs[0]
        print(f"\nmodel ({source} compute {r0['compute_flop_per_s'] / 1e12:.1f} TFLOP/s per GPU, "
              f"{r0['flops_per_image'] / GB:.1f} GFLOP per image, B={r0['micro_batch']}, cf={r0['capacity_factor']})")
        print(f"{'E':>3} {'GPUs':>5} {'ep':>3} {'link':>10} {'a2a MB':>8} {'a2a ms':>7} {'AR ms':>7} {'comp ms':>8} "
              f"{'step ms':>8} {'eff':>5} {'a2a %':>6} {'eff(AR ovl)':>11}")
        for r in rs:
            print(f"{r['experts']:>3} {r['gpus']:>5} {r['ep_size']:>3} {r['a2a_link']:>10} "
                  f"{r['a2a_bytes_per_gpu'] / 1e6:>8.1f} {1e3 * r['a2a_s']:>7.2f} "
                  f"{1e3 * (r['allreduce_shared_s'] + r['allreduce_expert_s']):>7.2f} {1e3 * r['compute_s']:>8.2f} "
                  f"{1e3 * r['step_s']:>8.2f} {r['efficiency']:>5.2f} {100 * r['a2a_share']:>5.1f}% "
                  f"{r['efficiency_ar_overlapped']:>11.2f}")


def plot(measured: list[dict], model: list[dict], path: Path) -> None:
    fig, (ax1, ax2) = figure(2, panel=(6.5, 5.2))
    if measured:
        xs = [r["ranks"] for r in measured]
        ax1.plot(xs, [r["images_per_s"] for r in measured], "o-", label="measured (MoCE)")
        base = next((r for r in measured if r["ranks"] == 1), None)
        if base:
            ax1.plot(xs, [x * base["images_per_s"] for x in xs], "k--", lw=1, label="ideal (R x 1 rank)")
        for r in measured:
            eff = f"eff {r['efficiency']:.2f}, " if r["efficiency"] is not None else ""
            ax1.annotate(f"{eff}a2a {100 * r['a2a_share']:.1f}%", (r["ranks"], r["images_per_s"]),
                         textcoords="offset points", xytext=(6, -12), fontsize=8)
        ax1.set_xticks(xs, [str(x) for x in xs])
        r0 = measured[0]
        ax1.set_title(f"measured: width {r0['width']}, {r0['depth']} blocks, E={r0['experts']}, "
                      f"micro-batch {r0['micro_batch']}/rank, {r0['device']}", fontsize=9)
        ax1.legend(fontsize=8)
    else:
        ax1.text(0.5, 0.5, "no measured rows", ha="center", va="center", transform=ax1.transAxes)
    ax1.set_xlabel("ranks (ep_size = ranks)")
    ax1.set_ylabel("train images/s (all ranks)")
    ax1.set_ylim(bottom=0)

    source = model[0]["compute_source"]
    for i, e in enumerate(dict.fromkeys(r["experts"] for r in model)):
        rs = [r for r in model if r["experts"] == e and r["compute_source"] == source]
        xs = [r["gpus"] for r in rs]
        color = f"C{i}"
        ax2.plot(xs, [100 * r["efficiency"] for r in rs], "o-", color=color, label=f"E={e} efficiency vs {xs[0]}")
        ax2.plot(xs, [100 * r["efficiency_ar_overlapped"] for r in rs], ":", color=color, lw=1,
                 label=f"E={e} efficiency, all-reduce overlapped")
        ax2.plot(xs, [100 * r["a2a_share"] for r in rs], "s--", color=color, label=f"E={e} all-to-all share")
    xs = sorted({r["gpus"] for r in model})
    ax2.set_xscale("log", base=2)
    ax2.set_xticks(xs, [str(x) for x in xs])
    ax2.set_xlabel("GPUs (8 per node)")
    ax2.set_ylabel("%")
    ax2.set_ylim(0, 105)
    ax2.legend(fontsize=7, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.14))
    m0 = model[0]
    lk = m0["links"]
    ax2.set_title(f"model: {m0['model_size']}, {m0['geometry']['moe_layers']} MoE layers, B={m0['micro_batch']}/GPU, "
                  f"{m0['geometry']['tokens']} tokens, cf {m0['capacity_factor']}\n"
                  f"{m0['compute_flop_per_s'] / 1e12:.0f} TFLOP/s ({source}), NVLink {lk['nvlink_gbs']:.0f} GB/s, "
                  f"IB {lk['ib_gbs']:.0f} GB/s, alpha {lk['alpha_intra_us']:.0f}/{lk['alpha_inter_us']:.0f} us",
                  fontsize=9)
    save_figure(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=RESULTS)
    m = ap.add_argument_group("measured (benchmarks/throughput.py's worker, MoCE only)")
    m.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    m.add_argument("--steps", type=int, default=4, help="timed steps per launch")
    m.add_argument("--warmup", type=int, default=1)
    m.add_argument("--width", type=int, default=384)
    m.add_argument("--depth", type=int, default=6)
    m.add_argument("--experts", type=int, default=8)
    m.add_argument("--clusters", type=int, default=256, help="cluster ids (gate table rows), measured and modelled")
    m.add_argument("--micro-batch", type=int, default=32, help="images per rank (weak scaling)")
    m.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    m.add_argument("--skip-measure", action="store_true", help="launch nothing; reuse rows from --from-jsonl")
    m.add_argument("--from-jsonl", type=Path, nargs="+",
                   default=[RESULTS / "throughput.jsonl", RESULTS / "scaling.jsonl"])
    p = ap.add_argument_group("model (stated assumptions)")
    p.add_argument("--gpus", type=int, nargs="+", default=[8, 16, 32, 64, 128, 256, 512, 1024])
    p.add_argument("--model-experts", type=int, nargs="+", default=[8, 16])
    p.add_argument("--model-size", default="vit_base_patch16_224")
    p.add_argument("--mask-ratio", type=float, default=0.75)
    p.add_argument("--model-batch", type=int, default=128, help="images per GPU")
    p.add_argument("--capacity-factor", type=float, default=1.25)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--nvlink-gbs", type=float, default=450.0, help="GB/s per direction per GPU (NVLink 4)")
    p.add_argument("--ib-gbs", type=float, default=50.0, help="GB/s per GPU (400 Gb/s NDR, one NIC per GPU)")
    p.add_argument("--alpha-intra-us", type=float, default=10.0)
    p.add_argument("--alpha-inter-us", type=float, default=20.0)
    p.add_argument("--bytes-per-elem", type=int, default=2, help="bf16 activations and gradients")
    p.add_argument("--compute", nargs="+", default=["gpu"], choices=["gpu", "measured"])
    p.add_argument("--peak-tflops", type=float, default=989.0, help="H200 bf16 dense")
    p.add_argument("--mfu", type=float, default=0.40)
    args = ap.parse_args()
    t0 = time.perf_counter()
    stamp = time.strftime("%Y-%m-%d %H:%M")
    if args.skip_measure:
        measured = reuse(args.from_jsonl, args.ranks)
        print(f"reusing {len(measured)} measured row(s): "
              + ", ".join(f"{r['ranks']}r {r['time']} ({r['source']})" for r in measured))
    else:
        measured = measure(args, stamp)
    annotate(measured, args.clusters)
    model = modelled(args, measured, stamp)
    print_tables(measured, model)
    # reused rows are already on disk where they came from
    write_results(path=args.out / "scaling.jsonl", records= ([] if args.skip_measure else measured) + model)
    plot(measured, model, args.out / "scaling.png")
    print(f"\nwrote {args.out / 'scaling.jsonl'} and scaling.png in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
