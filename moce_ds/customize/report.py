"""The selection report: JSON, a short markdown table and a PNG heat map of expert scores per layer."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from moce_ds.customize.selection import Selection  # noqa: E402

__all__ = ["write_report"]

_NAMED_IN_MARKDOWN = 20  # selection.json lists every skipped image; the table names the first few


def _skipped_line(skipped: Sequence[str]) -> str:
    names = ", ".join(f"`{s}`" for s in skipped[:_NAMED_IN_MARKDOWN])
    more = f" and {len(skipped) - _NAMED_IN_MARKDOWN} more" if len(skipped) > _NAMED_IN_MARKDOWN else ""
    return f"- skipped images (do not decode): {len(skipped)}" + (f": {names}{more}" if skipped else "")


def _markdown(task: str, sel: Selection, extra: dict, skipped: Sequence[str]) -> str:
    experts = len(next(iter(sel.scores.values())))
    top = np.argsort(-sel.histogram)[:5]
    lines = [
        f"# Expert selection for task `{task}`",
        "",
        "Top clusters of the task: " + ", ".join(f"c{c} ({sel.histogram[c]:.0%})" for c in top if sel.histogram[c]),
        "",
        "| MoE block | " + " | ".join(f"e{e}" for e in range(experts)) + " | chosen | gate value |",
        "| --- | " + " | ".join("---" for _ in range(experts)) + " | --- | --- |",
    ]
    for b in sorted(sel.chosen):
        cells = " | ".join(f"**{s:.3f}**" if e == sel.chosen[b] else f"{s:.3f}" for e, s in enumerate(sel.scores[b]))
        lines.append(f"| {b} | {cells} | e{sel.chosen[b]} | {sel.scales[b]:.3f} |")
    exact = "" if sel.exact_search else " (search budget reached: the best path found, maybe not the maximum)"
    dev = "n/a" if sel.gate_deviation != sel.gate_deviation else f"{sel.gate_deviation:.3f}"
    lines += ["", "Score s_e = sum_c q(c) p(e|c); the gate value is folded into the exported MLP"
              + (" (merge: the experts' average weighted by s_e)." if sel.rule == "merge" else "."), "",
              f"- rule: `{sel.rule}`{exact}",
              f"- coverage: {sel.coverage:.1%} of the task's images route (top-1 expert of their cluster) to the "
              f"exported expert in every MoE layer; routing mass of the exported path {sel.mass:.3f}",
              f"- folded gate values: those of cluster {sel.dominant_cluster} (exact for its images); largest gate "
              f"difference over covered images, mean: {dev}", ""]
    lines += [f"- {k}: `{v}`" for k, v in extra.items()] + [_skipped_line(skipped), ""]
    return "\n".join(lines)


def _heatmap(task: str, sel: Selection, path: Path) -> None:
    blocks = sorted(sel.chosen)
    scores = np.stack([sel.scores[b] for b in blocks])  # (L, E)
    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * scores.shape[1], 1.0 + 0.5 * len(blocks)))
    im = ax.imshow(scores, cmap="viridis", vmin=0, vmax=max(1e-6, scores.max()), aspect="auto")
    for i, b in enumerate(blocks):
        for e in range(scores.shape[1]):
            ax.text(e, i, f"{scores[i, e]:.2f}", ha="center", va="center",
                    color="white" if scores[i, e] < scores.max() * 0.6 else "black", fontsize=8,
                    fontweight="bold" if e == sel.chosen[b] else "normal")
    ax.set_xticks(range(scores.shape[1]), [f"e{e}" for e in range(scores.shape[1])])
    ax.set_yticks(range(len(blocks)), [f"block {b}" for b in blocks])
    ax.set_title(f"expert scores for {task}")
    fig.colorbar(im, ax=ax, fraction=0.05)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(out_dir: Path, task: str, sel: Selection, extra: dict,
                 skipped: Sequence[str] = ()) -> dict[str, Path]:
    """`skipped`: task images left out because they do not decode (all in the JSON, the first few in the table)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "selection.json", "markdown": out_dir / "selection.md",
             "heatmap": out_dir / "expert_scores.png"}
    record = {"task": task, **sel.to_json(), **extra, "num_skipped_images": len(skipped),
              "skipped_images": list(skipped)}
    paths["json"].write_text(json.dumps(record, indent=1))
    paths["markdown"].write_text(_markdown(task, sel, extra, skipped))
    _heatmap(task, sel, paths["heatmap"])
    return paths
