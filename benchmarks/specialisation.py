"""Do the experts specialise? Short MoCE runs under routing variants, measured by route purity, cluster-expert NMI,
gate sharpness, balance and the coverage of a customised export on each embedded task.

    python benchmarks/specialisation.py [--epochs 5] [--seed 0] [--variants default noise0 ...]

Per variant (single rank, the `mini` default otherwise): the last logging interval's route purity and NMI per MoE
layer (from metrics.jsonl), the CV of images per expert over the run's second half, the final reconstruction loss,
the gate's sharpness (mean over clusters of max_e p(e|c)), and per embedded task the coverage (share of the task's
images whose route the export reproduces) of the per-layer rule and of the path rule. Writes
results/specialisation.jsonl and results/specialisation.png. Runs are reused on a rerun.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
from pathlib import Path

import numpy as np
from harness import RESULTS, ROOT, figure, save_figure, write_results
from harness import cv as images_cv
from transfer import pretrain

from moce_ds.checkpoints import load_pretrained
from moce_ds.clustering.feature_sources import assign_to_round
from moce_ds.customize.selection import cluster_histogram, gate_probabilities, select_experts
from moce_ds.customize.task_data import load_task_data
from moce_ds.data.embedded import build_embedded_dataset, default_cache_dir, embedded_tasks
from moce_ds.metrics import read_jsonl

VARIANTS: dict[str, list[str]] = {
    "default": [],
    "noise0": ["moe.gate_noise_std=0"],
    "noise0_lpt": ["moe.gate_noise_std=0", "cluster.init_table=lpt"],
    "noise0_lpt_aux0": ["moe.gate_noise_std=0", "cluster.init_table=lpt", "moe.aux_loss_weight=0"],
    # balance by the cluster -> expert packing, gates kept sharp: every layer routes a cluster to its packed expert
    "lpt_frozen": ["moe.gate_noise_std=0", "cluster.init_table=lpt", "moe.gate_trainable=false"],
}


def measure(run: Path, cache: Path) -> dict:
    rows = [r for r in read_jsonl(run / "metrics.jsonl") if r.get("expert_load")]
    last = rows[-1]["expert_load"]
    half = rows[len(rows) // 2:]
    cv = {}
    for layer in last:
        imgs = np.array([r["expert_load"][layer]["images"] for r in half], np.float64)  # (T, E)
        cv[layer] = float(np.nanmean(images_cv(imgs, axis=1)))
    pre = load_pretrained(run)
    probs = gate_probabilities(pre.model)
    sharp = {str(b): float(p.max(1).mean()) for b, p in probs.items()}
    coverage = {}
    for task in embedded_tasks():
        data = load_task_data(task, pre.model.spec.img_size, cache)
        hist = cluster_histogram(assign_to_round(pre.round, data.all_images), pre.round.k)
        coverage[task] = {rule: select_experts(pre.model, hist, rule).coverage for rule in ("per_layer", "path")}
    return {"route_purity": {k: v.get("route_purity") for k, v in last.items()},
            "cluster_expert_nmi": {k: v.get("cluster_expert_nmi") for k, v in last.items()},
            "image_cv": cv, "gate_sharpness": sharp, "recon_loss": rows[-1]["recon_loss"], "coverage": coverage}


def plot(records: list[dict], out: Path) -> None:
    names = [r["variant"] for r in records]
    panels = [("route purity", lambda r: np.mean(list(r["route_purity"].values()))),
              ("cluster-expert NMI", lambda r: np.mean(list(r["cluster_expert_nmi"].values()))),
              ("gate sharpness max p(e|c)", lambda r: np.mean(list(r["gate_sharpness"].values()))),
              ("coverage, path rule (mean over tasks)", lambda r: np.mean([c["path"] for c in r["coverage"].values()])),
              ("coverage, per-layer rule", lambda r: np.mean([c["per_layer"] for c in r["coverage"].values()]))]
    fig, axes = figure(len(panels), panel=(3.2, 3.4))
    for ax, (title, f) in zip(axes, panels):
        ax.bar(range(len(names)), [f(r) for r in records])
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=7)
        ax.set(title=title, ylim=(0, 1.02))
    save_figure(fig, out / "specialisation.png")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "specialisation")
    args = ap.parse_args()
    cache = default_cache_dir()
    ds = build_embedded_dataset(cache)
    steps = args.epochs * (ds.num_train // 64)
    args.out.mkdir(parents=True, exist_ok=True)
    records = []
    stamp = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    for name in args.variants:
        run = pretrain(args.work / f"{name}_s{args.seed}",
                       [*VARIANTS[name], f"train.epochs={args.epochs}", f"train.seed={args.seed}",
                        "train.log_every=10", "metrics.enabled=false", "metrics.report=false"], steps)
        rec = {"time": stamp, "variant": name, "overrides": VARIANTS[name], "epochs": args.epochs, "steps": steps,
               "seed": args.seed, **measure(run, cache)}
        records.append(rec)
        print(json.dumps(rec), flush=True)
    write_results(records, path=args.out / "specialisation.jsonl")
    plot(records, args.out)


if __name__ == "__main__":
    main()
