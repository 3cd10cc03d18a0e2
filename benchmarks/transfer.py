"""The paper's comparison in miniature: MAE vs TokenMoE vs MoCE (customised per task), same pre-training budget.

    python benchmarks/transfer.py [--steps 156] [--seeds 0 1 2] [--out benchmarks/results]

For each seed: pre-train plain MAE (moe.routing=dense), TokenMoE (token) and MoCE (cluster) on the embedded set
for the same number of steps; then per embedded task a linear probe on frozen features: MAE's and TokenMoE's
encoders as they are, MoCE's dense ViT customised for that task (launchers/customize.py's code). The
negative-transfer check pre-trains MAE on each task's own domain(s) only, same number of steps, and probes it
on that task. Writes transfer.jsonl (one line per measurement), transfer.md (table, mean +- std) and
transfer.png. Finished pre-training runs are reused on a rerun (the sweep is long), so it resumes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moce_ds.customize import customize  # noqa: E402
from moce_ds.customize.task_data import load_task_data  # noqa: E402
from moce_ds.data.embedded import build_embedded_dataset, default_cache_dir, embedded_tasks, png_bytes  # noqa: E402
from moce_ds.data.keys import make_key  # noqa: E402
from moce_ds.data.shard_writer import write_shards  # noqa: E402
from moce_ds.engine.distributed import free_port  # noqa: E402
from moce_ds.evaluation import extract_features, linear_probe, load_encoder  # noqa: E402

METHODS = {"mae": "dense", "tokenmoe": "token", "moce": "cluster"}


def pretrain(run: Path, overrides: list[str], steps: int) -> Path:
    """One single-rank pre-training run through the real launcher; reused when already finished."""
    latest = run / "checkpoints" / "latest"
    if latest.is_file() and latest.read_text().strip() == f"step{steps:08d}":
        return run
    if run.exists():
        import shutil

        shutil.rmtree(run)  # an unfinished run from an interrupted sweep
    env = dict(os.environ, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()))
    cmd = [sys.executable, str(ROOT / "launchers" / "pretrain.py"), f"output_dir={run}", f"train.max_steps={steps}",
           "train.log_every=50", *overrides]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    print(f"  pre-trained {run.name} in {time.time() - t0:.0f} s", flush=True)
    return run


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


def probe(encoder_path, task: str, cache: Path) -> float:
    enc = load_encoder(encoder_path)
    data = load_task_data(task, enc.img_size, cache)
    return linear_probe(extract_features(enc, data.train_x), data.train_y, extract_features(enc, data.test_x),
                        data.test_y)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=156, help="pre-training steps per run (78 = one epoch)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "transfer")
    args = ap.parse_args()
    cache = default_cache_dir()
    ds = build_embedded_dataset(cache)
    tasks = embedded_tasks()
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    epochs = math.ceil(args.steps / (ds.num_train // 64)) + 1  # the schedule spans a bit more than the budget
    common = [f"train.epochs={epochs}", "train.save_every_epochs=1000", "train.keep_checkpoints=1"]
    for seed in args.seeds:
        print(f"seed {seed}", flush=True)
        runs = {m: pretrain(args.work / f"{m}_s{seed}", [f"moe.routing={r}", f"train.seed={seed}", *common],
                            args.steps) for m, r in METHODS.items()}
        for task, spec in tasks.items():
            accs = {"mae": probe(runs["mae"], task, cache), "tokenmoe": probe(runs["tokenmoe"], task, cache)}
            # only the timm export is probed: no Hugging Face folder
            custom = customize(runs["moce"], task, args.work / f"moce_s{seed}" / "custom" / task, cache_dir=cache,
                               hf=False)
            accs["moce"] = probe(custom.checkpoint, task, cache)
            own_data = domain_shards(ds, spec.domains, args.work / "domain_data" / task)
            n_own = json.loads((own_data / "manifest.json").read_text())["total"]
            own_epochs = math.ceil(args.steps / max(1, n_own // 64)) + 1
            own = pretrain(args.work / f"mae_own_{task}_s{seed}",
                           ["moe.routing=dense", f"train.seed={seed}", f"data.path={own_data}",
                            f"train.epochs={own_epochs}", "train.save_every_epochs=1000", "train.keep_checkpoints=1"],
                           args.steps)
            accs["mae_own_domain"] = probe(own, task, cache)
            chosen = {str(b): e for b, e in custom.selection.chosen.items()}
            for method, acc in accs.items():
                rows.append({"seed": seed, "task": task, "method": method, "linear_probe_top1": acc,
                             "steps": args.steps, "moce_experts": chosen if method == "moce" else None})
            print(f"  {task}: " + ", ".join(f"{m} {a:.3f}" for m, a in accs.items()), flush=True)
    with (args.out / "transfer.jsonl").open("w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    write_table_and_plot(rows, list(tasks), args.out, args.steps, args.seeds)


def write_table_and_plot(rows: list[dict], tasks: list[str], out: Path, steps: int, seeds: list[int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = ["mae", "tokenmoe", "moce", "mae_own_domain"]
    table = {}
    for m in methods:
        per_seed = {s: [r["linear_probe_top1"] for r in rows if r["method"] == m and r["seed"] == s] for s in seeds}
        for t in tasks:
            v = [r["linear_probe_top1"] for r in rows if r["method"] == m and r["task"] == t]
            table[m, t] = (np.mean(v), np.std(v))
        avg = [np.mean(v) for v in per_seed.values()]
        table[m, "average"] = (np.mean(avg), np.std(avg))
    cols = [*tasks, "average"]
    lines = [f"Linear-probe top-1 (%), mean +- std over seeds {seeds}, {steps} pre-training steps each.", "",
             "| method | " + " | ".join(cols) + " |", "| --- |" + " --- |" * len(cols)]
    for m in methods:
        lines.append(f"| {m} | " + " | ".join(f"{100 * table[m, c][0]:.1f} +- {100 * table[m, c][1]:.1f}"
                                             for c in cols) + " |")
    (out / "transfer.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.2
    for i, m in enumerate(methods):
        ax.bar(np.arange(len(cols)) + (i - 1.5) * width, [100 * table[m, c][0] for c in cols], width,
               yerr=[100 * table[m, c][1] for c in cols], label=m, capsize=2)
    ax.set_xticks(range(len(cols)), cols)
    ax.set_ylabel("linear-probe top-1 (%)")
    ax.set_title(f"transfer after {steps} pre-training steps ({len(seeds)} seeds)")
    ax.legend(ncol=4, fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "transfer.png", dpi=120)


if __name__ == "__main__":
    main()
