"""A transfer study that can tell the methods apart: floors, three protocols, the same pre-training budget, seeds.

    python benchmarks/transfer.py [--epochs 5] [--seeds 0 1 2] [--methods ...] [--finetune-epochs 15]

Per seed, on the embedded set, every pre-training run gets ``--epochs`` epochs (the same number of steps):

- floors: ``pixels`` (the flattened 32x32x3 image in [0, 1]) and ``random_init`` (the MAE encoder at its init);
- ``mae`` (moe.routing=dense) and ``tokenmoe`` (DeepSpeed's token gate) as they are;
- ``moce`` (today's defaults: pixel clusters, learned gates with noise) and ``moce_lpt_frozen`` (pixel clusters,
  gates frozen at the LPT packing, no noise), each customised per task (``--rule path``);
- ``moce_semantic``: the two-stage recipe: clusters from this seed's ``mae`` encoder, MoCE upcycled from it
  (``model.init_from``) with the ``moce_lpt_frozen`` settings, customised per task; its budget is the MAE's plus
  its own, twice the others' (stated in every row);
- ``moce_semantic_equal``: the same recipe at the others' budget: a dense MAE of half the steps gives the clusters
  and the upcycling start, MoCE trains the other half (each half on its own schedule, shaped like the full runs');
- ``mae_own_domain``: MAE pre-trained on the task's own domain(s) only, same steps (the negative-transfer control).

Protocols: linear probe and k-NN on frozen features (``moce_ds.evaluation``), and a short full fine-tune of the
dense ViT (not for ``tokenmoe``, whose MoE blocks are not a timm ViT, nor for ``pixels``). Writes
results/transfer.jsonl (one line per seed, task, method and protocol), results/transfer.png, and the generated table
in benchmarks/README.md (mean and 95 % t-interval over seeds). Finished runs are reused on a rerun.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from harness import RESULTS, ROOT, figure, run_command, run_single_process, save_figure, write_results

from moce_ds.checkpoints import load_pretrained
from moce_ds.config import load_config
from moce_ds.customize import customize
from moce_ds.customize.export import dense_state_dict, timm_vit
from moce_ds.customize.task_data import TaskData, load_task_data
from moce_ds.data.embedded import build_embedded_dataset, embedded_tasks
from moce_ds.data.images import png_bytes
from moce_ds.data.keys import make_key
from moce_ds.data.shard_writer import write_shards
from moce_ds.evaluation import extract_features, knn, linear_probe, load_encoder
from moce_ds.evaluation.probes import finetune
from moce_ds.model import build_model

LPT_FROZEN = ["moe.gate_noise_std=0", "cluster.init_table=lpt", "moe.gate_trainable=false"]
PRETRAINED = {"mae": ["moe.routing=dense"], "tokenmoe": ["moe.routing=token"], "moce": [],
              "moce_lpt_frozen": LPT_FROZEN}
METHODS = ["pixels", "random_init", "mae", "tokenmoe", "moce", "moce_lpt_frozen", "moce_semantic",
           "moce_semantic_equal", "mae_own_domain"]
PROTOCOLS = ["linear", "knn", "finetune"]
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}  # t_{0.975, n-1}


def pretrain(run: Path, overrides: list[str], steps: int) -> Path:
    """One single-rank pre-training run through the real launcher; reused when already finished."""
    latest = run / "checkpoints" / "latest"
    if latest.is_file() and latest.read_text().strip() == f"step{steps:08d}":
        return run
    if run.exists():
        shutil.rmtree(run)  # an unfinished run from an interrupted sweep
    _, seconds = run_single_process(ROOT / "launchers" / "pretrain.py", [
        f"output_dir={run}", f"train.max_steps={steps}", "train.log_every=50", "metrics.enabled=false",
        "metrics.report=false", *overrides])
    print(f"  pre-trained {run.name} in {seconds:.0f} s", flush=True)
    return run


def cluster_with(features: Path, cache: Path, k: int = 16) -> None:
    """``launchers/cluster.py --features <run>`` into ``cache``'s embedded set (skipped when already done)."""
    from moce_ds.data.sidecar import latest_round

    rnd = latest_round(cache / "embedded-v1" / "clusters")
    if rnd is not None and (rnd.manifest.get("feature_extractor") or {}).get("run") == str(features.resolve()):
        return
    run_command([sys.executable, str(ROOT / "launchers" / "cluster.py"), "--data", "embedded", "--cache-dir",
                 str(cache), "--k", str(k), "--features", str(features)])


def domain_shards(ds, domains: tuple[str, ...], out: Path) -> Path:
    """The embedded training images of some domains only, as a shard folder (no clustering needed for MAE)."""
    if (out / "manifest.json").is_file():
        return out
    images, index, domain_id = ds.train_images()
    names = ds.domains
    keep = np.isin(domain_id, [names.index(d) for d in domains])
    samples = ((make_key(int(i), names[int(d)]), png_bytes(img), int(d))
               for img, i, d in zip(images[keep], index[keep], domain_id[keep]))
    write_shards(samples, out, max_per_shard=500)
    return out


def dense_vit_of_run(run: Path):
    """A dense run's encoder as a timm ViT (for fine-tuning)."""
    pre = load_pretrained(run)
    vit = timm_vit(pre.model.spec)
    vit.load_state_dict(dense_state_dict(pre.model, {}, {}), strict=True)
    return vit.eval()


def random_init_vit(seed: int):
    model = build_model(load_config([], ["moe.routing=dense", f"train.seed={seed}"]))
    vit = timm_vit(model.spec)
    vit.load_state_dict(dense_state_dict(model, {}, {}), strict=True)
    return vit.eval()


def evaluate(encoder, vit, data: TaskData, protocols: list[str], ft_epochs: int, seed: int) -> dict[str, float]:
    """encoder: an Encoder or None (raw pixels); vit: a timm ViT to fine-tune, or None."""
    if encoder is None:
        ftr, fte = (x.reshape(len(x), -1).astype(np.float32) / 255.0 for x in (data.train_x, data.test_x))
    else:
        ftr, fte = extract_features(encoder, data.train_x), extract_features(encoder, data.test_x)
    out = {}
    if "linear" in protocols:
        out["linear"] = linear_probe(ftr, data.train_y, fte, data.test_y)
    if "knn" in protocols:
        out["knn"] = knn(ftr, data.train_y, fte, data.test_y)
    if "finetune" in protocols and vit is not None:
        out["finetune"] = finetune(vit, data.train_x, data.train_y, data.test_x, data.test_y, epochs=ft_epochs,
                                   seed=seed)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=5, help="pre-training epochs per run (78 steps each)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    ap.add_argument("--protocols", nargs="+", default=PROTOCOLS, choices=PROTOCOLS)
    ap.add_argument("--finetune-epochs", type=int, default=15)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "transfer")
    ap.add_argument("--name", default="transfer", help="results/<name>.jsonl and .png (e.g. transfer_budget for a "
                    "second study that must not replace the main table)")
    args = ap.parse_args()
    cache = args.work / "cache"  # the study's own embedded set: its only round is the pixel round
    ds = build_embedded_dataset(cache)
    tasks = embedded_tasks()
    steps = args.epochs * (ds.num_train // 64)
    epochs = args.epochs + 1  # the schedule spans a bit more than the budget, as in every run here
    common = [f"train.epochs={epochs}", "train.save_every_epochs=1000", "train.keep_checkpoints=1",
              f"data.cache_dir={cache}"]
    stamp = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    t_start = time.time()
    for seed in args.seeds:
        print(f"seed {seed}", flush=True)
        runs = {m: pretrain(args.work / f"{m}_s{seed}", [*o, f"train.seed={seed}", *common], steps)
                for m, o in PRETRAINED.items() if m in args.methods or (m == "mae" and "moce_semantic" in args.methods)}
        if "moce_semantic_equal" in args.methods:  # half the budget for each stage: the others' total
            half, half_epochs = steps // 2, args.epochs // 2 + 1
            half_common = [f"train.epochs={half_epochs}", *common[1:-1]]
            mae_half = pretrain(args.work / f"mae_half_s{seed}", ["moe.routing=dense", f"train.seed={seed}",
                                                                  *half_common, f"data.cache_dir={cache}"], half)
            eq_cache = args.work / f"cache_semantic_equal_s{seed}"
            build_embedded_dataset(eq_cache)
            cluster_with(mae_half, eq_cache)
            runs["moce_semantic_equal"] = pretrain(
                args.work / f"moce_semantic_equal_s{seed}",
                [*LPT_FROZEN, f"model.init_from={mae_half}", f"train.seed={seed}", *half_common,
                 f"data.cache_dir={eq_cache}"], steps - half)
        if "moce_semantic" in args.methods:
            sem_cache = args.work / f"cache_semantic_s{seed}"  # its round must not reach the other runs
            build_embedded_dataset(sem_cache)
            cluster_with(runs["mae"], sem_cache)
            runs["moce_semantic"] = pretrain(
                args.work / f"moce_semantic_s{seed}",
                [*LPT_FROZEN, f"model.init_from={runs['mae']}", f"train.seed={seed}", *common[:-1],
                 f"data.cache_dir={sem_cache}"], steps)
        rows = []
        for task, spec in tasks.items():
            data = load_task_data(task, 32, cache)
            encoders: dict[str, tuple] = {}
            if "pixels" in args.methods:
                encoders["pixels"] = (None, None)
            if "random_init" in args.methods:
                vit = random_init_vit(seed)
                encoders["random_init"] = (load_encoder_from_vit(vit, "random_init"), vit)
            for m in ("mae", "tokenmoe"):
                if m in args.methods:
                    encoders[m] = (load_encoder(runs[m]), dense_vit_of_run(runs[m]) if m == "mae" else None)
            for m in ("moce", "moce_lpt_frozen", "moce_semantic", "moce_semantic_equal"):
                if m in args.methods:
                    res = customize(runs[m], task, runs[m] / "custom" / task, cache_dir=cache, hf=False)
                    enc = load_encoder(res.checkpoint)
                    encoders[m] = (enc, enc.vit)
            if "mae_own_domain" in args.methods:
                own = domain_shards(ds, spec.domains, args.work / "domain_data" / task)
                run = pretrain(args.work / f"mae_own_{task}_s{seed}",
                               ["moe.routing=dense", f"train.seed={seed}", f"data.path={own}", *common], steps)
                encoders["mae_own_domain"] = (load_encoder(run), dense_vit_of_run(run))
            for method, (enc, vit) in encoders.items():
                accs = evaluate(enc, vit, data, args.protocols, args.finetune_epochs, seed)
                budget = 2 * steps if method == "moce_semantic" else (0 if method in ("pixels", "random_init")
                                                                      else steps)
                rows += [{"time": stamp, "seed": seed, "task": task, "method": method, "protocol": p, "top1": a,
                          "epochs": args.epochs, "pretrain_steps": budget, "num_test": len(data.test_y)}
                         for p, a in accs.items()]
                print(f"  {task} {method}: " + ", ".join(f"{p} {100 * a:.1f}" for p, a in accs.items()), flush=True)
        write_results(rows, path=args.out / f"{args.name}.jsonl")  # per seed: an interrupted study keeps its rows
    print(f"study took {time.time() - t_start:.0f} s", flush=True)
    plot(args.out / f"{args.name}.jsonl", stamp, args.out / f"{args.name}.png")


def load_encoder_from_vit(vit, name: str):
    from moce_ds.evaluation.encoders import Encoder

    return Encoder(name, vit.patch_embed.img_size[0], vit.forward_features, vit)


def summarize(rows: list[dict]) -> dict[tuple[str, str, str], tuple[float, float, int]]:
    """(method, protocol, task or 'average') -> (mean, 95 % half-interval, seeds); the average is taken per seed
    over the tasks first, so its interval reflects seed noise of the average."""
    out = {}
    keys = {(r["method"], r["protocol"]) for r in rows}
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    for m, p in keys:
        sel = [r for r in rows if r["method"] == m and r["protocol"] == p]
        per_seed: dict[int, list[float]] = {}
        for t in tasks:
            v = [r["top1"] for r in sel if r["task"] == t]
            if v:
                out[m, p, t] = _mean_ci(v)
        for r in sel:
            per_seed.setdefault(r["seed"], []).append(r["top1"])
        avg = [np.mean(v) for v in per_seed.values() if len(v) == len(tasks)]
        if avg:
            out[m, p, "average"] = _mean_ci(avg)
    return out


def _mean_ci(v: list[float]) -> tuple[float, float, int]:
    n = len(v)
    half = T975.get(n - 1, 1.96) * float(np.std(v, ddof=1)) / math.sqrt(n) if n > 1 else float("nan")
    return float(np.mean(v)), half, n


def plot(results: Path, stamp: str, path: Path) -> None:
    from moce_ds.metrics import read_jsonl

    rows = [r for r in read_jsonl(results) if r.get("time") == stamp]
    s = summarize(rows)
    methods = [m for m in METHODS if any(k[0] == m for k in s)]
    protocols = [p for p in PROTOCOLS if any(k[1] == p for k in s)]
    fig, axes = figure(len(protocols), panel=(5, 3.8), squeeze=False)
    for ax, p in zip(axes[0], protocols):
        vals = [s.get((m, p, "average"), (np.nan, np.nan, 0)) for m in methods]
        ax.bar(range(len(methods)), [100 * v[0] for v in vals], yerr=[100 * v[1] for v in vals], capsize=3)
        ax.set_xticks(range(len(methods)), methods, rotation=35, ha="right", fontsize=8)
        ax.set(title=f"{p}: mean over tasks, 95 % interval", ylabel="top-1 (%)")
    save_figure(fig, path)


if __name__ == "__main__":
    main()
