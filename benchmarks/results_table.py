"""Regenerate the results tables in benchmarks/README.md from the latest run in each results/*.jsonl.

    python benchmarks/results_table.py           # rewrites the block between the results markers in README.md

Only the block between `<!-- results:begin -->` and `<!-- results:end -->` is rewritten; the prose around it is
kept. A benchmark without results yet is listed with the command that produces them.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from moce_ds.metrics import read_jsonl

HERE = Path(__file__).resolve().parent
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def latest_run(path: Path, bench: str | None = None) -> list[dict]:
    """The rows of the newest run (largest "time" stamp) in a JSON-lines file; [] when there is none."""
    if not path.exists():
        return []
    rows = [r for r in read_jsonl(path) if bench is None or r.get("bench", bench) == bench]
    if not rows:
        return []
    newest = max(r.get("time", "") for r in rows)
    return [r for r in rows if r.get("time", "") == newest]


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |",
            *("| " + " | ".join(r) + " |" for r in rows)]


def moe_layer_section(rows: list[dict]) -> list[str]:
    seen, body = set(), []
    for r in rows:
        key = (r["width"], r["experts"], r["images"])
        if key in seen:
            continue
        seen.add(key)
        body.append([str(r["width"]), str(r["experts"]), str(r["images"]), f"{1e3 * r['dense_s']:.1f}",
                     f"{r['moce_vs_dense']:.2f}x ({100 * r['moce_dropped_share']:.0f} % dropped)",
                     f"**{r['moce_dropless_vs_dense']:.2f}x**", f"{r['token_vs_dense']:.2f}x",
                     f"{100 * r['cluster_gate_share']:.2f} % ({1e3 * r['cluster_gate_s']:.2f} ms)",
                     f"{100 * r['token_gate_share']:.2f} %"])
    r0 = rows[0]
    return [f"MoE layer forward + backward, run of {r0['time']} ({r0['tokens_per_image']} tokens per image, "
            f"{r0['threads']} thread, median of {r0['rounds']} interleaved rounds; targets: MoCE <= 1.15x dense at "
            "width 384, cluster gate < 5 % and flat in width):", "",
            *_table(["width", "experts", "images", "dense MLP ms", "MoCE / dense", "MoCE dropless / dense",
                     "TokenMoE / dense",
                     "cluster gate share", "token gate share"], body)]


def throughput_section(rows: list[dict]) -> list[str]:
    body = []
    for r in sorted(rows, key=lambda r: (r["ranks"], ["dense", "token", "moce"].index(r["variant"]))):
        s = r["split_s"]
        body.append([str(r["ranks"]), str(r["ep_size"]), r["variant"], f"{r['images_per_s']:.1f}",
                     f"{r['vs_dense']:.2f}x" if r.get("vs_dense") else "", f"{100 * r['mfu']:.1f} %",
                     f"{100 * r['moe_share']:.0f} %",
                     " / ".join(f"{1e3 * s[p]:.0f}" for p in ("gate", "dispatch", "alltoall", "experts")),
                     f"{1e3 * s.get('zero_grads', float('nan')):.0f} / {1e3 * s.get('optimizer', float('nan')):.0f}",
                     f"{1e3 * s.get('rest', float('nan')):.0f}",
                     f"{r['compute_vs_dense']:.2f}x" if r.get("compute_vs_dense") else "",
                     f"{100 * r['dropped_share']:.1f} %"])
    r0 = rows[0]
    return [f"Train step, run of {r0['time']} (width {r0['width']}, {r0['depth']} blocks, E={r0['experts']}, "
            f"micro-batch {r0['micro_batch']}, {r0['tokens_per_image']} tokens per image, "
            f"{r0['threads_per_rank']} thread per rank, matmul peak {r0['peak_gflops']:.0f} GFLOP/s; "
            "target: MoCE >= 0.9x dense):", "",
            *_table(["ranks", "ep_size", "model", "images/s", "vs dense", "MFU", "MoE share of step",
                     "gate / dispatch / all-to-all / experts ms (dense: its MLPs in those blocks)",
                     "ZeRO-2 grad copies / optimizer step ms", "rest of step ms",
                     "vs dense without the ZeRO and optimizer parts", "dropped"], body)]


def load_balance_section(rows: list[dict]) -> list[str]:
    summary = [r for r in rows if r.get("kind") == "summary"]
    body = []
    for r in summary:
        unit = r.get("primary", "images")
        body.append([r["run"], " ".join(r.get("overrides", [])), unit, f"{r[f'cv_{unit}_rms']:.3f}",
                     f"{r[f'floor_{unit}']:.3f}", f"**{r['ratio']:.2f}x**", f"{r.get('ratio_requested', 0):.2f}x",
                     f"{r['max_mean']:.2f}", f"{100 * r['dropped_share']:.1f} %"])
    r0 = summary[0] if summary else rows[0]
    return [f"Expert balance over pre-training, run of {r0['time']} ({r0.get('steps')} steps of {r0.get('batch')} "
            "images, second half; CV = RMS over steps of std/mean over experts, floor = sqrt((E-1)/n); target: "
            "MoCE's image CV within 1.2x the floor with the aux loss on):", "",
            *_table(["run", "overrides", "unit", "CV", "floor", "CV / floor", "CV / floor before capacity",
                     "max / mean", "dropped"], body)]


def scaling_section(rows: list[dict]) -> list[str]:
    measured = sorted((r for r in rows if r.get("kind") == "measured"), key=lambda r: r["ranks"])
    modelled = [r for r in rows if r.get("kind") == "model" and r["gpus"] in (8, 16, 64, 256, 1024)]
    out = [f"Expert-parallel scaling, run of {rows[0]['time']}.", ""]
    if measured:
        out += [f"Measured, MoCE train step (weak scaling, micro-batch {measured[0]['micro_batch']} per rank, "
                f"{measured[0]['device']}):", ""]
        out += _table(["ranks", "ep_size", "images/s", "per rank", "efficiency", "all-to-all share of step"],
                      [[str(r["ranks"]), str(r["ep_size"]), f"{r['images_per_s']:.1f}",
                        f"{r['images_per_s_per_rank']:.1f}", f"{r['efficiency']:.2f}",
                        f"{100 * r['a2a_share']:.1f} %"]
                       for r in measured]) + [""]
    if modelled:
        out += [f"Modelled ({modelled[0]['model_size']}, {modelled[0]['micro_batch']} images per GPU, "
                "formulas and link speeds in `benchmarks/scaling.py`):", ""]
        out += _table(["experts", "GPUs", "ep_size", "all-to-all link", "all-to-all MB / GPU / step",
                       "all-to-all ms", "compute ms", "efficiency vs 8 GPUs", "(all-reduce overlapped)",
                       "all-to-all share"],
                      [[str(r["experts"]), str(r["gpus"]), str(r["ep_size"]), str(r["a2a_link"]),
                        f"{r['a2a_bytes_per_gpu'] / 1e6:.0f}", f"{1e3 * r['a2a_s']:.2f}",
                        f"{1e3 * r['compute_s']:.1f}", f"{r['efficiency']:.2f}", f"{r['efficiency_ar_overlapped']:.2f}",
                        f"{100 * r['a2a_share']:.1f} %"]
                       for r in modelled])
    return out


def optimizer_step_section(rows: list[dict]) -> list[str]:
    return [f"AdamW step on one flat fp32 tensor, run of {rows[0]['time']} ({rows[0]['threads']} thread):", "",
            *_table(["parameters", "default ms", "foreach ms", "fused ms", "fused vs default"],
                    [[f"{r['params'] / 1e6:.0f} M", f"{1e3 * r['default_s']:.0f}", f"{1e3 * r['foreach_s']:.0f}",
                      f"{1e3 * r['fused_s']:.0f}", f"{r['fused_speedup']:.1f}x faster"] for r in rows])]


def specialisation_section(rows: list[dict]) -> list[str]:
    r0 = rows[0]
    body = []
    for r in rows:
        mean = lambda d: sum(d.values()) / len(d)  # noqa: E731 - over the MoE layers
        cov = r["coverage"]
        body.append([r["variant"], " ".join(r["overrides"]) or "(defaults)", f"{mean(r['route_purity']):.2f}",
                     f"{mean(r['cluster_expert_nmi']):.2f}", f"{mean(r['gate_sharpness']):.2f}",
                     f"{mean(r['image_cv']):.2f}", f"{r['recon_loss']:.4f}",
                     " / ".join(f"{100 * cov[t]['per_layer']:.0f}" for t in cov),
                     " / ".join(f"{100 * cov[t]['path']:.0f}" for t in cov)])
    tasks = " / ".join(rows[0]["coverage"])
    return [f"Specialisation after {r0['epochs']} epochs ({r0['steps']} steps, seed {r0['seed']}), run of "
            f"{r0['time']}; means over the MoE layers; coverage in % per task ({tasks}):", "",
            *_table(["variant", "overrides", "route purity", "NMI", "max p(e|c)", "image CV", "recon loss",
                     "coverage per-layer rule", "coverage path rule"], body)]


def two_stage_recipe_section(rows: list[dict]) -> list[str]:
    if str(HERE) not in sys.path:  # the recipe script's own table, imported as a sibling module
        sys.path.insert(0, str(HERE))
    from two_stage_recipe import recipe_table

    out: list[str] = []
    for variant in dict.fromkeys(r["variant"] for r in rows):
        out += [*recipe_table([r for r in rows if r["variant"] == variant]), ""]
    return out[:-1]


def transfer_section(rows: list[dict]) -> list[str]:
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    from transfer import METHODS, PROTOCOLS, summarize

    s = summarize(rows)
    tasks = [*dict.fromkeys(r["task"] for r in rows), "average"]
    seeds = sorted({r["seed"] for r in rows})
    r0 = rows[0]
    steps = max(r["pretrain_steps"] for r in rows if r["method"] == "mae") if any(
        r["method"] == "mae" for r in rows) else "?"
    out = [f"Transfer, run of {r0['time']}: {r0['epochs']} pre-training epochs ({steps} steps) per run, "
           f"moce_semantic twice that (the MAE's and its own), moce_semantic_equal the same (half each); "
           f"seeds {seeds}; top-1 % as mean +- 95 % t-interval "
           f"over seeds (average: of the per-seed task means):"]
    for p in PROTOCOLS:
        body = [[m, *(f"{100 * s[m, p, t][0]:.1f} +- {100 * s[m, p, t][1]:.1f}" if (m, p, t) in s else "-"
                      for t in tasks)] for m in METHODS if any((m, p, t) in s for t in tasks)]
        if body:
            out += ["", f"**{p}**", "", *_table(["method", *tasks], body)]
    return out


SECTIONS: list[tuple[str, str, str, Callable[[list[dict]], list[str]]]] = [
    ("moe_layer", "moe_layer", "python benchmarks/moe_layer.py", moe_layer_section),
    ("throughput", "throughput", "python benchmarks/throughput.py", throughput_section),
    ("load_balance", "load_balance", "python benchmarks/load_balance.py", load_balance_section),
    ("scaling", "scaling", "python benchmarks/scaling.py", scaling_section),
    ("optimizer_step", "optimizer_step", "python benchmarks/optimizer_step.py", optimizer_step_section),
    ("specialisation", "specialisation", "python benchmarks/specialisation.py", specialisation_section),
    ("transfer", "transfer", "python benchmarks/transfer.py", transfer_section),
    ("transfer_budget", "transfer_budget",
     "python benchmarks/transfer.py --methods mae moce_semantic moce_semantic_equal --name transfer_budget",
     transfer_section),
    ("two_stage_recipe", "two_stage_recipe", "python benchmarks/two_stage_recipe.py [--refresh]",
     two_stage_recipe_section),
]


def render(results: Path) -> str:
    lines = [BEGIN, "", "_Generated by `python benchmarks/results_table.py` from the newest run in each "
             "`results/*.jsonl`; edit the prose outside this block._", ""]
    for name, bench, command, section in SECTIONS:
        rows = latest_run(results / f"{name}.jsonl", bench)
        lines += [f"### {name}", ""]
        lines += section(rows) if rows else [f"No results yet: run `{command}`."]
        lines.append("")
    return "\n".join([*lines, END])


def rewrite(readme: Path, results: Path) -> None:
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        raise ValueError(f"{readme} has no '{BEGIN}' ... '{END}' block to rewrite; add the two markers where the "
                         "tables should go.")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(head + render(results) + tail)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--readme", type=Path, default=HERE / "README.md")
    ap.add_argument("--results", type=Path, default=HERE / "results")
    args = ap.parse_args()
    rewrite(args.readme, args.results)
    print(f"rewrote the results block of {args.readme}")


if __name__ == "__main__":
    main()
