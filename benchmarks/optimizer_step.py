"""AdamW step time on one flat parameter tensor: torch's default, foreach and fused implementations.

Why it matters: a MoE model carries E x the MLP parameters of its dense twin with the same active parameters, so
its optimizer step costs several times more; `moce_ds/engine/schedule.py` uses the fused AdamW. ZeRO-2 hands the
optimizer flat partitions, which is what this times (10 M parameters ~ the dense model of benchmarks/throughput.py,
38 M ~ its MoE model).

    python benchmarks/optimizer_step.py   # ~30 s; appends to results/optimizer_step.jsonl, draws optimizer_step.png
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from harness import RESULTS, figure, save_figure, write_results

MODES = ("default", "foreach", "fused")


def step_seconds(numel: int, mode: str, reps: int) -> float:
    """Median seconds of one AdamW step over a flat fp32 parameter of `numel` elements."""
    p = torch.nn.Parameter(torch.randn(numel))
    p.grad = torch.randn(numel)
    opt = torch.optim.AdamW([p], lr=1e-3, **({} if mode == "default" else {mode: True}))
    opt.step()  # the first step allocates the moments
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000_000, 38_000_000])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    stamp = time.strftime("%Y-%m-%d %H:%M")
    rows = []
    for n in args.sizes:
        t = {m: step_seconds(n, m, args.reps) for m in MODES}
        row = {"bench": "optimizer_step", "time": stamp, "params": n, "threads": args.threads,
               **{f"{m}_s": v for m, v in t.items()}, "fused_speedup": t["default"] / t["fused"]}
        rows.append(row)
        print(f"{n / 1e6:.0f} M params: " + "  ".join(f"{m} {1e3 * v:.0f} ms" for m, v in t.items())
              + f"  fused {row['fused_speedup']:.1f}x faster than default", flush=True)
    write_results(rows, path=args.out / "optimizer_step.jsonl")

    fig, ax = figure(panel=(6, 3.5))
    width = 0.8 / len(MODES)
    for i, m in enumerate(MODES):
        ax.bar([x + i * width for x in range(len(rows))], [1e3 * r[f"{m}_s"] for r in rows], width, label=m)
    ax.set_xticks([x + width for x in range(len(rows))], [f"{r['params'] / 1e6:.0f} M params" for r in rows])
    ax.set_ylabel("ms per AdamW step")
    ax.set_title(f"torch.optim.AdamW on one flat fp32 tensor, {args.threads} thread(s)")
    ax.legend()
    save_figure(fig, args.out / "optimizer_step.png")
    print(f"wrote {args.out / 'optimizer_step.jsonl'} and optimizer_step.png")


if __name__ == "__main__":
    main()
