"""Expert load balance over a pre-training run, MoCE vs TokenMoE (issue text: per-expert tokens and images, CV
against the sampling floor, max/mean, dropped share). Never asserts.

    python benchmarks/load_balance.py [--steps 100] [--runs moce moce_lpt tokenmoe moce_noaux] [--out PATH]

Each run is real single-rank pre-training through the project's launcher (`deepspeed.launcher.runner`,
`ds_configs/zero2.json`, default model and data, `train.log_every=1` so every metrics.jsonl line is one step).
Per run, MoE layer and step, from `expert_load`: the CV (population std / mean over experts) of images kept per
expert and of tokens kept / requested per expert, the sampling floor sqrt((E-1)/n) (n = the step's images, or its
routed tokens for the token floor), max/mean and the dropped share. Summaries are over the second half of the run
(after warm-up, once the gate has settled). The CV compared with the floor is the RMS over steps: a perfectly
balanced multinomial draw has E[CV^2] = (E-1)/n exactly, while its mean CV is ~8 % below the floor at E=4.

Primary numbers: MoCE's image CV / image floor (cluster routing sends whole images); TokenMoE's token CV / token
floor (its "images per expert" counts an image at every expert that got any of its tokens, so not comparable).
Appends one line per (run, layer) and one summary line per run to benchmarks/results/load_balance.jsonl and
draws load_balance.png next to it. Target (reported, not asserted): MoCE image CV within 1.2x of the floor.
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
from pathlib import Path

import numpy as np
from harness import RESULTS, ROOT, cv, figure, run_deepspeed, save_figure, write_results

from moce_ds.metrics import read_jsonl

TARGET = 1.2  # MoCE image CV / sampling floor, with the auxiliary loss on

# name -> dotted overrides; everything else is the config default
RUNS = {
    "moce": ["moe.routing=cluster"],  # default init_table=centroids (falls back to random when widths differ)
    "moce_lpt": ["moe.routing=cluster", "cluster.init_table=lpt"],
    "tokenmoe": ["moe.routing=token"],
    "moce_noaux": ["moe.routing=cluster", "moe.aux_loss_weight=0"],
}


def pretrain(run: Path, overrides: list[str], steps: int, cache_dir: str) -> dict:
    """One single-rank pre-training run through the deepspeed launcher; returns its wall time and exit status."""
    if run.exists():
        shutil.rmtree(run)
    args = ["--deepspeed_config", "ds_configs/zero2.json", f"output_dir={run}", f"train.max_steps={steps}",
            "train.log_every=1", "data.num_workers=1",
            "metrics.enabled=false", "metrics.report=false",  # no exporter port, no report: the jsonl is enough
            *([f"data.cache_dir={cache_dir}"] if cache_dir else []), *overrides]
    proc, wall = run_deepspeed("launchers/pretrain.py", args, ranks=1, check=False)
    if proc.returncode != 0:
        print(f"  {run.name} failed (rc {proc.returncode}):\n{(proc.stdout + proc.stderr)[-2000:]}", flush=True)
    else:
        print(f"  pre-trained {run.name} in {wall:.0f} s", flush=True)
    return {"rc": proc.returncode, "wall_s": wall, "command": " ".join(map(str, proc.args[2:]))}


def step_stats(rec: dict, layer: str) -> dict:
    """One metrics.jsonl line, one layer -> per-step balance figures."""
    load = rec["expert_load"][layer]
    images = np.asarray(load["images"], np.float64)  # (E,) images with >= 1 token kept at that expert
    kept = np.asarray(load["tokens_kept"], np.float64)  # (E,)
    requested = np.asarray(load["tokens_requested"], np.float64)  # (E,)
    e = images.shape[0]
    return {
        "step": rec["step"],
        "cv_images": cv(images), "floor_images": float(np.sqrt((e - 1) / rec["images"])),
        "cv_tokens": cv(kept), "cv_tokens_requested": cv(requested),
        "floor_tokens": float(np.sqrt((e - 1) / requested.sum())),
        "max_mean_images": float(images.max() / images.mean()), "max_mean_tokens": float(kept.max() / kept.mean()),
        "max_mean_tokens_requested": float(requested.max() / requested.mean()),
        "dropped_share": float(load["dropped_share"]),
        "images": images, "tokens": kept,
    }


def summarise_layer(steps: list[dict], routing: str) -> dict:
    """Second-half summary of one layer; the primary CV is images for cluster routing, kept tokens otherwise."""
    half = steps[len(steps) // 2:]
    primary = "images" if routing == "cluster" else "tokens"
    col = lambda k: np.asarray([s[k] for s in half])
    rms = lambda k: float(np.sqrt(np.mean(col(k) ** 2)))
    totals = {k: np.sum([s[k] for s in half], axis=0) for k in ("images", "tokens")}  # (E,) over the half
    out = {
        "primary": primary, "steps_summarised": len(half), "first_step": half[0]["step"],
        "cv_images_mean": float(col("cv_images").mean()), "cv_images_rms": rms("cv_images"),
        "floor_images": float(col("floor_images").mean()),
        "cv_tokens_mean": float(col("cv_tokens").mean()), "cv_tokens_rms": rms("cv_tokens"),
        "cv_tokens_requested_rms": rms("cv_tokens_requested"), "floor_tokens": float(col("floor_tokens").mean()),
        "max_mean_images": float(col("max_mean_images").mean()),
        "max_mean_tokens": float(col("max_mean_tokens").mean()),
        "max_mean_tokens_requested": float(col("max_mean_tokens_requested").mean()),
        "dropped_share": float(col("dropped_share").mean()),
        # whole-half totals: separates a systematic skew (an expert always heavier) from per-step sampling noise
        "share_images": (totals["images"] / totals["images"].sum()).tolist(),
        "share_tokens": (totals["tokens"] / totals["tokens"].sum()).tolist(),
        "cv_images_total": cv(totals["images"]), "cv_tokens_total": cv(totals["tokens"]),
    }
    out["ratio_images"] = out["cv_images_rms"] / out["floor_images"]
    out["ratio_tokens"] = out["cv_tokens_rms"] / out["floor_tokens"]
    out["ratio"] = out[f"ratio_{primary}"]
    # what the gate asked for, before capacity: kept counts are capped at capacity_factor x the mean
    out["ratio_requested"] = out["cv_tokens_requested_rms"] / out[f"floor_{primary}"]
    out["max_mean"] = out[f"max_mean_{primary}"]
    return out


def analyse(metrics_path: Path, routing: str) -> tuple[dict[str, dict], dict[str, list[float]]]:
    """metrics.jsonl -> per-layer summaries and the primary CV/floor per step (mean over layers)."""
    recs = [r for r in read_jsonl(metrics_path) if r.get("expert_load")]
    layers = sorted(recs[0]["expert_load"], key=int)
    per_layer = {layer: [step_stats(r, layer) for r in recs] for layer in layers}
    key = "images" if routing == "cluster" else "tokens"
    curve = {"step": [r["step"] for r in recs],
             "ratio": [float(np.mean([per_layer[la][i][f"cv_{key}"] / per_layer[la][i][f"floor_{key}"]
                                      for la in layers])) for i in range(len(recs))]}
    return {la: summarise_layer(s, routing) for la, s in per_layer.items()}, curve


def _cluster_sizes(cache_dir: str) -> list[int] | None:
    """The newest clustering round's sizes of the embedded set (what the MoCE gate routes), if on disk."""
    from moce_ds.data.embedded import EMBEDDED_VERSION, default_cache_dir
    from moce_ds.data.sidecar import latest_round

    base = Path(cache_dir).expanduser() if cache_dir else Path(default_cache_dir())
    rnd = latest_round(base / f"embedded-{EMBEDDED_VERSION}" / "clusters")
    return None if rnd is None else rnd.manifest.get("cluster_sizes")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=100, help="pre-training steps per run (micro-batch 64, one rank)")
    p.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    p.add_argument("--out", type=Path, default=RESULTS / "load_balance.jsonl", help="JSON lines; the PNG goes beside")
    p.add_argument("--cache-dir", default="", help="data.cache_dir for the embedded set (empty: ~/.cache/moce_ds)")
    p.add_argument("--keep-runs", type=Path, default=None, help="keep run folders here instead of a temp dir")
    args = p.parse_args(argv)
    ds = json.loads((ROOT / "ds_configs" / "zero2.json").read_text())
    run = {"time": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"), "host": platform.node(),
           "cpus": os.cpu_count(), "steps": args.steps, "batch": ds["train_micro_batch_size_per_gpu"],
           "load_avg": os.getloadavg()[0]}
    records, curves, layer_recs = [], {}, {}
    sizes = _cluster_sizes(args.cache_dir)
    with tempfile.TemporaryDirectory(prefix="load_balance_") as tmp:
        base = args.keep_runs or Path(tmp)
        for name in args.runs:
            routing = "token" if "moe.routing=token" in RUNS[name] else "cluster"
            info = pretrain(base / name, RUNS[name], args.steps, args.cache_dir)
            common = dict(run, run=name, routing=routing, overrides=RUNS[name], wall_s=info["wall_s"])
            if info["rc"] != 0 or not (base / name / "metrics.jsonl").is_file():
                records.append(dict(common, kind="failed", rc=info["rc"], command=info["command"]))
                continue
            layers, curves[name] = analyse(base / name / "metrics.jsonl", routing)
            layer_recs[name] = layers
            for la, s in layers.items():
                records.append(dict(common, kind="layer", layer=int(la), **s))
            keys = ("ratio", "max_mean", "dropped_share", "ratio_images", "ratio_tokens", "cv_images_rms",
                    "floor_images", "cv_tokens_rms", "floor_tokens", "cv_tokens_requested_rms", "cv_images_total",
                    "cv_tokens_total", "max_mean_tokens_requested", "ratio_requested")
            summary = {k: float(np.mean([s[k] for s in layers.values()])) for k in keys}
            summary["primary"] = "images" if routing == "cluster" else "tokens"
            if routing == "cluster":
                summary["cluster_sizes"] = sizes
                summary["target_ratio"] = TARGET
                summary["within_target"] = summary["ratio"] <= TARGET
            records.append(dict(common, kind="summary", command=info["command"], **summary))
    write_results(records, path=args.out)
    _table(records)
    if curves:
        _plot(curves, layer_recs, run, args.out.with_suffix(".png"))
    return 0


def _table(records: list[dict]) -> None:
    print(f"\n{'run':<11} {'primary':<7} {'CV rms':>7} {'floor':>6} {'CV/floor':>8} {'max/mean':>8} "
          f"{'req CV/floor':>12} {'req max/mean':>12} {'dropped':>7} {'wall s':>6}")
    for r in records:
        if r["kind"] == "failed":
            print(f"{r['run']:<11} failed (rc {r['rc']})")
        if r["kind"] != "summary":
            continue
        k = r["primary"]
        print(f"{r['run']:<11} {k:<7} {r[f'cv_{k}_rms']:>7.3f} {r[f'floor_{k}']:>6.3f} {r['ratio']:>8.2f} "
              f"{r['max_mean']:>8.2f} "
              f"{r['ratio_requested']:>12.2f} {r['max_mean_tokens_requested']:>12.2f} {r['dropped_share']:>7.3f} "
              f"{r['wall_s']:>6.0f}")


def _plot(curves: dict[str, dict], layer_recs: dict[str, dict], run: dict, path: Path) -> None:
    fig, (a, b) = figure(2, panel=(5.5, 3.8))
    for i, (name, c) in enumerate(curves.items()):
        r = np.asarray(c["ratio"])
        w = min(10, len(r))
        smooth = np.convolve(r, np.ones(w) / w, mode="valid")
        a.plot(c["step"], r, color=f"C{i}", alpha=0.25, lw=0.8)
        a.plot(c["step"][w - 1:], smooth, color=f"C{i}", label=f"{name} ({'tokens' if 'token' in name else 'images'})")
    a.axhline(1.0, color="k", lw=0.8, ls=":", label="sampling floor")
    a.axhline(TARGET, color="tab:red", lw=0.8, ls="--", label=f"{TARGET}x target")
    a.set_xlabel("step")
    a.set_ylabel("CV / sqrt((E-1)/n)   (mean over layers)")
    a.set_yscale("log")
    a.set_title(f"balance per step (batch {run['batch']}, 1 rank; thick: {10}-step mean)", fontsize=9)
    a.legend(fontsize=7, loc="center right")
    names = list(layer_recs)
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        key = "share_tokens" if "token" in name else "share_images"
        shares = np.asarray([s[key] for s in layer_recs[name].values()])  # (L, E)
        x = np.arange(shares.shape[1]) + (i - (len(names) - 1) / 2) * width
        mean = shares.mean(0)
        b.bar(x, mean, width, color=f"C{i}", label=name,
              yerr=[mean - shares.min(0), shares.max(0) - mean], capsize=2, error_kw={"lw": 0.7})
        e = shares.shape[1]
    b.axhline(1 / e, color="k", lw=0.8, ls=":")
    b.set_xticks(range(e))
    b.set_xlabel("expert")
    b.set_ylabel("share of the second half")
    b.set_title("kept share: MoCE images, TokenMoE tokens (whisker: layer min-max)", fontsize=9)
    b.legend(fontsize=7)
    save_figure(fig, path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
