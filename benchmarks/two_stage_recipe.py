"""The two-stage MoCE recipe, end to end through the real command-line tools (README, "The two-stage recipe").

    python benchmarks/two_stage_recipe.py [--ranks 2] [--dense-epochs 10] [--moce-epochs 10] [--refresh]

(a) dense MAE pre-training; (b) ``launchers/cluster.py --features <(a)>``: semantic clusters from (a)'s encoder;
(c) MoCE pre-training with ``model.init_from=<(a)>`` (sparse upcycling) on that round; (d) ``launchers/customize.py``
per task, the task's images featurised by (a)'s encoder through the round's manifest; (e) ``launchers/evaluate.py``
on each customised model and on the dense MAE of (a). ``--refresh`` runs the variant where (b) is replaced by
``cluster.refresh_every=1`` inside (c) (starting from the embedded set's pixel round), in its own data cache.

Writes ``<out>/recipe.jsonl`` (one line per stage with its wall time, one per evaluation) and ``<out>/recipe.md``
(stage times, the round's cluster sizes, linear-probe / k-NN accuracy of customised MoCE next to the dense MAE).
Each stage is skipped when its output is already there, so an interrupted recipe resumes.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
from pathlib import Path

from harness import RESULTS, ROOT, deepspeed_command, run_command, write_results

from moce_ds.data.sidecar import latest_round

TASKS = ("digits", "faces", "texture_photo", "microscopy")


def _run(cmd: list[str], log: Path) -> float:
    """Run one stage's command; its output goes to ``log``. Returns the wall time."""
    print("$ " + " ".join(cmd), flush=True)
    return run_command(cmd, log=log)[1]


def _deepspeed(ranks: int, ds_config: Path, overrides: list[str]) -> list[str]:
    return deepspeed_command("launchers/pretrain.py", ["--deepspeed_config", str(ds_config), *overrides], ranks)


def _done(run: Path) -> bool:
    return (run / "checkpoints" / "latest").is_file()


def run_recipe(out: Path, ranks: int = 2, dense_epochs: int = 10, moce_epochs: int = 10, max_steps: int = 0,
               k: int = 16, tasks: tuple[str, ...] = TASKS, refresh: bool = False,
               ds_config: Path = ROOT / "ds_configs" / "zero2.json", extra: tuple[str, ...] = (),
               results: Path | None = None) -> list[dict]:
    """Run (a)-(e) into ``out``; returns the JSON-lines records (also appended to ``results`` when given).
    ``max_steps`` > 0 caps every pre-training run."""
    out = Path(out).resolve()
    cache = out / ("cache_refresh" if refresh else "cache")  # the embedded set and its rounds, for this recipe only
    cap = [f"train.max_steps={max_steps}"] if max_steps else []
    common = [f"data.cache_dir={cache}", "metrics.enabled=false", *cap, *extra]
    records: list[dict] = []

    def stage(name: str, cmd: list[str] | None, seconds: float | None = None, **info) -> None:
        rec = {"stage": name, "seconds": None if seconds is None else round(seconds, 1), **info}
        if cmd is not None:
            rec["command"] = " ".join(cmd)
        records.append(rec)

    dense = out / "dense"
    cmd = _deepspeed(ranks, ds_config, [f"output_dir={dense}", "moe.routing=dense", f"train.epochs={dense_epochs}",
                                        *common])
    stage("a_dense_mae", cmd, None if _done(dense) else _run(cmd, out / "logs" / "a_dense.log"))

    moce = out / ("moce_refresh" if refresh else "moce")
    if not refresh:
        clusters = cache / "embedded-v1" / "clusters"
        cmd = [sys.executable, "launchers/cluster.py", "--data", "embedded", "--cache-dir", str(cache), "--k", str(k),
               "--features", str(dense)]
        rnd = latest_round(clusters)
        made_by_dense = rnd is not None and rnd.manifest.get("feature_extractor", {}).get("run") == str(dense)
        stage("b_cluster", cmd, None if made_by_dense else _run(cmd, out / "logs" / "b_cluster.log"))
        rnd = latest_round(clusters)
        records[-1].update(round=str(rnd.path), feature_source=rnd.manifest["feature_source"], dim=rnd.manifest["dim"],
                           cluster_sizes=rnd.manifest["cluster_sizes"])
    variant = ["cluster.refresh_every=1"] if refresh else []
    cmd = _deepspeed(ranks, ds_config, [f"output_dir={moce}", f"model.init_from={dense}", f"moe.num_clusters={k}",
                                        f"train.epochs={moce_epochs}", *variant, *common])
    stage("c_moce_upcycled", cmd, None if _done(moce) else _run(cmd, out / "logs" / "c_moce.log"))
    if refresh:
        rnd = latest_round(cache / "embedded-v1" / "clusters")
        records[-1].update(round=str(rnd.path), feature_source=rnd.manifest["feature_source"], dim=rnd.manifest["dim"],
                           cluster_sizes=rnd.manifest["cluster_sizes"])

    for task in tasks:
        custom = moce / "custom" / task
        cmd = [sys.executable, "launchers/customize.py", "--checkpoint", str(moce), "--task", task, "--out",
               str(custom), "--cache-dir", str(cache)]
        selection = custom / "selection.json"
        stage("d_customize", cmd, None if selection.is_file() else _run(cmd, out / "logs" / f"d_{task}.log"), task=task)
        sel = json.loads(selection.read_text())
        records[-1].update(feature_source=sel.get("feature_source"), chosen={
            str(layer["block"]): layer["chosen_expert"] for layer in sel["layers"]})
        for method, model in (("moce_customised", sel["dense_checkpoint"]), ("dense_mae", str(dense))):
            result = out / "eval" / f"{method}_{task}.json"
            cmd = [sys.executable, "launchers/evaluate.py", "--model", model, "--task", task, "--out", str(result),
                   "--cache-dir", str(cache)]
            seconds = None if result.is_file() else _run(cmd, out / "logs" / f"e_{method}_{task}.log")
            acc = json.loads(result.read_text())
            stage("e_evaluate", cmd, seconds, task=task, method=method,
                  linear_probe_top1=acc["linear_probe_top1"], knn_top1=acc["knn_top1"])
    stamp = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    variant = "refresh" if refresh else "cluster_job"
    records = [{"time": stamp, "variant": variant, "ranks": ranks, "dense_epochs": dense_epochs,
                "moce_epochs": moce_epochs, "max_steps": max_steps, **r} for r in records]
    name = "recipe_refresh" if refresh else "recipe"
    write_results(records, path=out / f"{name}.jsonl")
    if results is not None:
        write_results(records, path=results)
    (out / f"{name}.md").write_text("\n".join(recipe_table(records)) + "\n")
    return records


def recipe_table(records: list[dict]) -> list[str]:
    """Markdown lines: stage times, the round, and the accuracies (also used by benchmarks/results_table.py)."""
    r0 = records[0]
    budget = f"dense {r0['dense_epochs']} / MoCE {r0['moce_epochs']} epochs"
    if r0["max_steps"]:
        budget += f", at most {r0['max_steps']} steps"
    lines = [f"Two-stage recipe ({r0['variant']}), run of {r0['time']}: {r0['ranks']} ranks, {budget}",
             "", "| stage | seconds |", "| --- | --- |"]
    for r in records:
        if r["stage"] in ("a_dense_mae", "b_cluster", "c_moce_upcycled"):
            lines.append(f"| {r['stage']} | {r['seconds'] if r['seconds'] is not None else 'reused'} |")
    rnd = next((r for r in records if "cluster_sizes" in r), None)
    if rnd:
        lines += ["", f"Round `{rnd['round']}` from `{rnd['feature_source']}` ({rnd['dim']}-wide features); "
                      f"cluster sizes: {sorted(rnd['cluster_sizes'], reverse=True)}"]
    evals = [r for r in records if r["stage"] == "e_evaluate"]
    tasks = list(dict.fromkeys(r["task"] for r in evals))
    lines += ["", "| task | dense MAE (a) linear / k-NN | customised MoCE linear / k-NN |", "| --- | --- | --- |"]
    for t in tasks:
        by = {r["method"]: r for r in evals if r["task"] == t}
        cells = [f"{100 * by[m]['linear_probe_top1']:.1f} / {100 * by[m]['knn_top1']:.1f}"
                 for m in ("dense_mae", "moce_customised")]
        lines.append(f"| {t} | {cells[0]} | {cells[1]} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "two_stage")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--dense-epochs", type=int, default=10)
    ap.add_argument("--moce-epochs", type=int, default=10)
    ap.add_argument("--max-steps", type=int, default=0, help="cap every pre-training run (0: the epochs)")
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--tasks", nargs="+", default=list(TASKS))
    ap.add_argument("--refresh", action="store_true", help="the variant: cluster.refresh_every=1 instead of (b)")
    ap.add_argument("--deepspeed_config", type=Path, default=ROOT / "ds_configs" / "zero2.json")
    args = ap.parse_args()
    run_recipe(args.out, args.ranks, args.dense_epochs, args.moce_epochs, args.max_steps, args.k, tuple(args.tasks),
               args.refresh, args.deepspeed_config, results=RESULTS / "two_stage_recipe.jsonl")
    name = "recipe_refresh" if args.refresh else "recipe"
    print((args.out / f"{name}.md").read_text())


if __name__ == "__main__":
    main()
