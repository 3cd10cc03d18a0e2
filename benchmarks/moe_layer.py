"""One MoE layer's forward + backward against width, experts and tokens: MoCE's cluster gate vs DeepSpeed's token gate.

Every configuration times three layers side by side, in interleaved rounds (median of the rounds), on the same
input: a dense timm `Mlp` (the active parameters of one expert), MoCE's `MoEMlp` (cluster gate: routes planned
from the images' cluster ids, whole images per expert, packed expert compute; with capacity 1.25 and dropless)
and the token-routed `MoEMlp` (DeepSpeed's TopKGate). MoCE with capacity drops some images, so it computes
fewer FLOPs than dense; the dropless layer computes exactly the dense FLOPs and is the like-for-like figure.
Top-1, capacity factor 1.25, one rank. The gates are also timed alone (forward and backward of the routes they
produce) to give their share of the MoE layer's time.

    python benchmarks/moe_layer.py   # ~2 min on 2 cores; appends to results/moe_layer.jsonl, draws moe_layer.png
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from harness import RESULTS, figure, save_figure, write_results
from timm.layers import Mlp

from moce_ds.moe import MoEMlp

BASE = dict(width=384, experts=8, images=64)
SWEEPS = {"width": [192, 384, 768], "experts": [4, 8, 16], "images": [16, 64, 128]}
NUM_CLUSTERS = 256


def _moe(routing: str, width: int, experts: int, drop: bool = True) -> MoEMlp:
    return MoEMlp(width, 4 * width, routing=routing, num_experts=experts, ep_size=1, top_k=1,
                  num_clusters=NUM_CLUSTERS, capacity_factor=1.25, eval_capacity_factor=1.25, min_capacity=4,
                  drop_tokens=drop, gate_noise_std=0.0, use_rts=False)


def layer_steps(width: int, experts: int, images: int, tokens: int, seed: int = 0) -> dict[str, Callable[[], None]]:
    """One forward + backward per call for each variant, on the same (B, T, d) input and output gradient."""
    torch.manual_seed(seed)
    x = torch.randn(images, tokens, width, requires_grad=True)
    grad = torch.randn(images, tokens, width)
    clusters = torch.randint(0, NUM_CLUSTERS, (images,))
    dense, moce, token = Mlp(width, 4 * width), _moe("cluster", width, experts), _moe("token", width, experts)
    dropless = _moe("cluster", width, experts, drop=False)  # computes every token: exactly the dense FLOPs

    def run_dense() -> None:
        dense(x).backward(grad)

    def run_moce() -> None:
        moce(x, moce.plan_alone(clusters, tokens)).backward(grad)

    def run_dropless() -> None:
        dropless(x, dropless.plan_alone(clusters, tokens)).backward(grad)

    def run_token() -> None:
        token(x).backward(grad)

    def run_cluster_gate() -> None:  # plan + expansion to DeepSpeed's token routes, and their backward
        routes = moce.gate(x.detach().reshape(-1, width), moce.plan_alone(clusters, tokens))
        (routes[0] + routes[5].sum()).backward()

    def run_token_gate() -> None:
        routes = token.gate(x.detach().reshape(-1, width))
        (routes[0] + routes[5].sum()).backward()

    def moce_kept() -> float:  # share of images the capacity kept (same routes as every timed MoCE call)
        return float(moce.plan_alone(clusters, tokens).kept.float().mean())

    run_moce.kept_share = moce_kept  # type: ignore[attr-defined]
    return {"dense": run_dense, "moce": run_moce, "moce_dropless": run_dropless, "token": run_token,
            "cluster_gate": run_cluster_gate, "token_gate": run_token_gate}


def time_interleaved(fns: dict[str, Callable[[], None]], rounds: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds per call; every round runs every variant once, so load changes hit all of them alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(rounds):
        names = list(fns)
        names = names[r % len(names):] + names[:r % len(names)]  # rotate the order: no variant always runs first
        for name in names:
            t0 = time.perf_counter()
            fns[name]()
            samples[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in samples.items()}


def measure(tokens: int, rounds: int, threads: int) -> list[dict]:
    torch.set_num_threads(threads)
    stamp = time.strftime("%Y-%m-%d %H:%M")
    rows, done = [], {}
    for sweep, values in SWEEPS.items():
        for v in values:
            cfg = {**BASE, sweep: v}
            key = tuple(cfg.values())
            if key not in done:
                fns = layer_steps(cfg["width"], cfg["experts"], cfg["images"], tokens)
                done[key] = (time_interleaved(fns, rounds), fns["moce"].kept_share())
            t, kept = done[key]
            row = {
                "bench": "moe_layer", "time": stamp, "sweep": sweep, **cfg, "tokens_per_image": tokens,
                "threads": threads, "rounds": rounds, **{f"{k}_s": v for k, v in t.items()},
                "moce_vs_dense": t["moce"] / t["dense"], "token_vs_dense": t["token"] / t["dense"],
                "moce_dropless_vs_dense": t["moce_dropless"] / t["dense"], "moce_dropped_share": 1.0 - kept,
                "cluster_gate_share": t["cluster_gate"] / t["moce"], "token_gate_share": t["token_gate"] / t["token"],
            }
            rows.append(row)
            print(f"{sweep:8s} d={cfg['width']:4d} E={cfg['experts']:2d} B={cfg['images']:3d}: "
                  f"dense {t['dense']*1e3:7.1f} ms"
                  f"  moce {row['moce_vs_dense']:.2f}x (dropped {100 * row['moce_dropped_share']:.0f}%)"
                  f"  dropless {row['moce_dropless_vs_dense']:.2f}x  token {row['token_vs_dense']:.2f}x"
                  f"  cluster gate {100 * row['cluster_gate_share']:.1f}% ({t['cluster_gate']*1e3:.2f} ms)"
                  f"  token gate {100 * row['token_gate_share']:.1f}%", flush=True)
    return rows


def plot(rows: list[dict], path: Path) -> None:
    fig, axes = figure(4, panel=(4.25, 3.8))
    for ax, sweep in zip(axes[:3], SWEEPS):
        rs = [r for r in rows if r["sweep"] == sweep]
        xs = [r[sweep] for r in rs]
        ax.plot(xs, [r["moce_vs_dense"] for r in rs], "o-", label="MoCE (cluster gate, capacity 1.25)")
        ax.plot(xs, [r["moce_dropless_vs_dense"] for r in rs], "^-", label="MoCE dropless")
        ax.plot(xs, [r["token_vs_dense"] for r in rs], "s-", label="TokenMoE (DeepSpeed gate)")
        ax.axhline(1.15, color="grey", ls="--", lw=1, label="target 1.15x")
        ax.axhline(1.0, color="black", lw=0.5)
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_xlabel({"width": "width d", "experts": "experts E", "images": "images per batch"}[sweep])
        ax.set_ylabel("fwd+bwd time / dense MLP")
        ax.set_ylim(bottom=0)
    axes[0].legend(fontsize=8)
    rs = [r for r in rows if r["sweep"] == "width"]
    xs = [r["width"] for r in rs]
    axes[3].plot(xs, [100 * r["cluster_gate_share"] for r in rs], "o-", label="cluster gate")
    axes[3].plot(xs, [100 * r["token_gate_share"] for r in rs], "s-", label="token gate")
    axes[3].axhline(5, color="grey", ls="--", lw=1, label="target 5 %")
    axes[3].set_xscale("log", base=2)
    axes[3].set_xticks(xs, [str(x) for x in xs])
    axes[3].set_xlabel("width d")
    axes[3].set_ylabel("gate share of MoE layer time (%)")
    axes[3].legend(fontsize=8)
    fig.suptitle(f"One MoE layer, top-1, capacity 1.25, {rows[0]['tokens_per_image']} tokens per image, "
                 f"{rows[0]['threads']} thread(s); base d={BASE['width']}, E={BASE['experts']}, B={BASE['images']}")
    save_figure(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=50, help="tokens per image (ViT-*/16 at 224 with 75%% masking: 50)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    rows = measure(args.tokens, args.rounds, args.threads)
    write_results(rows, path=args.out / "moe_layer.jsonl")
    plot(rows, args.out / "moe_layer.png")
    print(f"wrote {args.out / 'moe_layer.jsonl'} and moe_layer.png")


if __name__ == "__main__":
    main()
