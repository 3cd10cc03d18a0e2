"""The run report: ``<run>/report/report.md`` with PNG plots, built from a finished (or running) run folder.

Everything comes from files in the run folder: the curves and the expert load from ``metrics.jsonl``; the
routing heat maps and the reconstructions from the newest checkpoint, rebuilt in this process with all experts
local (:func:`moce_ds.checkpoints.run_reader.load_pretrained`), so the report needs no ranks and no GPU.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on a cluster node
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from moce_ds.metrics.jsonl import read_jsonl  # noqa: E402

__all__ = ["build_report", "reconstruct", "to_pixels"]

log = logging.getLogger("moce_ds")

_PER_DOMAIN = 4  # held-out images per embedded domain in the reconstruction grid
_MAX_PER_ROW = 6  # images shown per expert row
_USER_SAMPLE = 16  # user shards carry no held-out split: the first this many good images of the first shard


def _num(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):  # "nan"/"inf" are written as strings (JSON has neither)
        return math.nan


def _plot_curves(rows: list[dict], out: Path) -> list[Path]:
    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    axes[0].plot(steps, [_num(r["loss"]) for r in rows], label="loss")
    axes[0].plot(steps, [_num(r["recon_loss"]) for r in rows], label="recon_loss", linestyle="--")
    axes[0].set(xlabel="step", ylabel="loss", title="Training loss")
    axes[0].legend()
    axes[1].plot(steps, [_num(r["aux_loss"]) for r in rows], color="tab:red")
    axes[1].set(xlabel="step", ylabel="aux loss", title="MoE balance (auxiliary) loss")
    fig.tight_layout()
    loss_png = out / "loss.png"
    fig.savefig(loss_png, dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, [_num(r["images_per_s"]) for r in rows])
    ax.set(xlabel="step", ylabel="images/s (all ranks)", title="Throughput")
    fig.tight_layout()
    tput_png = out / "throughput.png"
    fig.savefig(tput_png, dpi=100)
    plt.close(fig)
    return [loss_png, tput_png]


def _plot_expert_load(rows: list[dict], out: Path) -> Path | None:
    """Share of kept tokens per expert over time, one panel per MoE layer (from metrics.jsonl)."""
    rows = [r for r in rows if r.get("expert_load")]
    if not rows:
        return None
    layers = sorted(rows[0]["expert_load"], key=int)
    steps = np.array([r["step"] for r in rows])
    fig, axes = plt.subplots(1, len(layers), figsize=(4.5 * len(layers), 3.5), squeeze=False)
    for ax, layer in zip(axes[0], layers):
        kept = np.array([r["expert_load"][layer]["tokens_kept"] for r in rows], dtype=np.float64)  # (T, E)
        share = kept / np.maximum(kept.sum(1, keepdims=True), 1)
        ax.stackplot(steps, share.T, labels=[f"e{e}" for e in range(share.shape[1])])
        ax.set(xlabel="step", ylabel="share of kept tokens", title=f"Expert load, block {layer}", ylim=(0, 1))
    axes[0][-1].legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")
    fig.tight_layout()
    path = out / "expert_load.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _plot_specialisation(rows: list[dict], out: Path) -> Path | None:
    """Route purity and cluster-expert NMI per MoE layer over time (cluster routing only)."""
    rows = [r for r in rows if r.get("expert_load")]
    layers = sorted((k for k, v in (rows[0]["expert_load"] if rows else {}).items() if "route_purity" in v), key=int)
    if not layers:
        return None
    steps = np.array([r["step"] for r in rows])
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5), squeeze=False)
    for ax, key, title in zip(axes[0], ("route_purity", "cluster_expert_nmi"),
                              ("route purity", "cluster-expert NMI (I / H(expert))")):
        for layer in layers:
            ax.plot(steps, [_num(r["expert_load"][layer].get(key)) for r in rows], label=f"block {layer}")
        ax.set(xlabel="step", ylabel=key, title=title, ylim=(0, 1.02))
    axes[0][1].legend(fontsize="small")
    fig.tight_layout()
    path = out / "specialisation.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _plot_routing(probs: dict[int, np.ndarray], out: Path) -> Path:
    """Cluster x expert heat map of the gate's p(e|c) per MoE layer; the top-1 expert per cluster is boxed."""
    blocks = sorted(probs)
    c, e = probs[blocks[0]].shape
    fig, axes = plt.subplots(1, len(blocks), figsize=(1.2 + 0.5 * e * len(blocks) + 1.5 * len(blocks),
                                                      1.5 + 0.25 * c), squeeze=False)
    for ax, b in zip(axes[0], blocks):
        p = probs[b]
        im = ax.imshow(p, aspect="auto", cmap="viridis", vmin=0, vmax=1)
        top = p.argmax(1)
        ax.scatter(top, np.arange(c), marker="s", facecolors="none", edgecolors="white", s=40)
        ax.set(xlabel="expert", ylabel="cluster", title=f"p(e|c), block {b}", xticks=range(e))
        fig.colorbar(im, ax=ax, fraction=0.05)
    fig.tight_layout()
    path = out / "routing.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def to_pixels(x: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) ImageNet-normalised -> (N, H, W, 3) float in [0, 1]."""
    from moce_ds.data.loader import IMAGENET_MEAN, IMAGENET_STD

    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x * std + mean).clamp(0, 1).permute(0, 2, 3, 1).numpy()


@torch.no_grad()
def reconstruct(model, x: torch.Tensor, cluster: torch.Tensor | None, seed: int = 0) -> dict[str, np.ndarray]:
    """x (N, 3, S, S) normalised -> {"original", "masked", "reconstruction"}: (N, S, S, 3) pixels in [0, 1].

    With norm_pix_loss the decoder predicts each patch normalised by its own mean and variance; like MAE's
    visualisation, the prediction is mapped back with the target patch's statistics, then the ImageNet
    normalisation is undone. The reconstruction shows the visible patches as they were (MAE's
    "reconstruction + visible"): only the removed patches are predicted.
    """
    torch.manual_seed(seed)  # the same masks every time the report is built
    out = model(x, cluster)
    target = model.patchify(x)  # (N, L, p*p*3)
    pred = out.pred.float()
    if model.norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        pred = pred * (var + 1.0e-6) ** 0.5 + mean
    mask = out.mask.unsqueeze(-1)  # (N, L, 1), 1 = removed
    masked = model.unpatchify(target * (1 - mask) + mask * _grey(target))
    recon = model.unpatchify(target * (1 - mask) + pred * mask)
    return {"original": to_pixels(x), "masked": to_pixels(masked), "reconstruction": to_pixels(recon)}


def _grey(target: torch.Tensor) -> torch.Tensor:
    """A mid-grey patch in normalised space, so removed patches read as holes (0 would be ImageNet's mean)."""
    from moce_ds.data.loader import IMAGENET_MEAN, IMAGENET_STD

    grey = (torch.full((3,), 0.5) - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    p2 = target.shape[-1] // 3
    return grey.repeat(p2).view(1, 1, -1)  # patchify's channel-last (p, p, 3) order


def _first_shard_sample(pre, n: int) -> tuple[np.ndarray, list[str]] | None:
    """The first `n` good images of the run's first shard: (N, S, S, 3) uint8 and 'shard:index' labels; the same
    images in every report of the run (and across runs on the same shards). None when the shards are unreadable."""
    from moce_ds.clustering.features import decode_shard
    from moce_ds.data.sources import resolve_shards

    path = Path(pre.cfg.data.path)
    try:
        url = resolve_shards(path).urls[0]
    except (ValueError, OSError, IndexError) as e:
        log.warning("report: no reconstruction sample from data.path=%s (%s)", path, e)
        return None
    images, labels = [], []
    for item in decode_shard(url, pre.model.spec.img_size):
        if isinstance(item, str):
            continue  # a skipped sample (its reason is the loader's business)
        labels.append(f"{Path(url).stem}:{item[0]}")
        images.append(item[1])
        if len(images) == n:
            break
    return (np.stack(images), labels) if images else None


def _heldout(pre, per_domain: int) -> tuple[np.ndarray, list[str]] | None:
    """A few held-out images per embedded domain, or a fixed sample of the first user shard: (N, S, S, 3) uint8 and
    a label per image (its domain, or shard:index)."""
    if pre.cfg.data.path:
        return _first_shard_sample(pre, _USER_SAMPLE)
    from moce_ds.data.embedded import build_embedded_dataset

    ds = build_embedded_dataset(Path(pre.cfg.data.cache_dir) if pre.cfg.data.cache_dir else None)
    images, domains = [], []
    for d in ds.domains:
        x, _ = ds.heldout(d)
        pick = np.linspace(0, len(x) - 1, min(per_domain, len(x))).astype(int)  # spread over the split
        images.append(x[pick])
        domains += [d] * len(pick)
    return np.concatenate(images), domains


def _plot_reconstructions(pre, probs: dict[int, np.ndarray], out: Path) -> tuple[Path | None, str]:
    """Original / masked / reconstruction, one row per expert (top-1 expert of the image's cluster in the first
    MoE layer). Returns the PNG (None when the run has no held-out set) and a line for the report."""
    from moce_ds.evaluation.encoders import to_tensor

    held = _heldout(pre, _PER_DOMAIN)
    if held is None:
        return None, f"Reconstructions: no readable images in data.path={pre.cfg.data.path}."
    images, domains = held
    model = pre.model
    size = model.spec.img_size
    if images.shape[1] != size:
        images = np.stack([np.asarray(_resize(im, size)) for im in images])
    x = to_tensor(images)
    cluster, rows = None, {"all images": np.arange(len(images))}
    if model.policy.needs_clusters and pre.round is not None and probs:
        from moce_ds.clustering.feature_sources import assign_to_round

        ids = assign_to_round(pre.round, images)  # held-out images have no id: nearest centroid
        cluster = torch.from_numpy(ids)
        first = min(probs)
        top1 = probs[first][ids].argmax(1)  # (N,) expert of each image's cluster in the first MoE layer
        rows = {f"expert {e} (block {first})": np.flatnonzero(top1 == e) for e in range(probs[first].shape[1])}
        rows = {k: v for k, v in rows.items() if len(v)}
    rec = reconstruct(model, x, cluster)
    path = out / "reconstructions.png"
    ncol = max(min(len(v), _MAX_PER_ROW) for v in rows.values())
    fig, axes = plt.subplots(len(rows), ncol * 3, figsize=(ncol * 3 * 0.9, len(rows) * 1.1 + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for r, (name, idx) in enumerate(rows.items()):
        for j, i in enumerate(idx[:_MAX_PER_ROW]):
            for k, key in enumerate(("original", "masked", "reconstruction")):
                ax = axes[r, 3 * j + k]
                ax.imshow(rec[key][i], interpolation="nearest")
                if r == 0 or k == 0:
                    ax.set_title({"original": domains[i], "masked": "masked", "reconstruction": "recon"}[key],
                                 fontsize=6)
        axes[r, 0].text(-0.1, 0.5, name, transform=axes[r, 0].transAxes, ha="right", va="center", fontsize=7)
    fig.subplots_adjust(left=0.12, right=0.99, wspace=0.05, hspace=0.35)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    counts = ", ".join(f"{k}: {len(v)}" for k, v in rows.items())
    which = (f"the first {len(images)} images of the first shard (user shards carry no held-out split: these are "
             f"training images)" if pre.cfg.data.path else f"{len(images)} held-out images ({_PER_DOMAIN} per domain)")
    return path, (f"Reconstructions of {which}, mask ratio {model.mask_ratio}, grouped by routing ({counts}); at "
                  f"most {_MAX_PER_ROW} shown per row.")


def _resize(img: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(img).resize((size, size), Image.BICUBIC))


def _summary(rows: list[dict], pre, run_dir: Path) -> list[str]:
    last = rows[-1] if rows else {}
    tput = [_num(r["images_per_s"]) for r in rows[1:] or rows]  # the first interval holds start-up costs
    skipped: dict[str, int] = last.get("skipped", {})
    lines = [
        "| | |", "| --- | --- |",
        f"| run folder | `{run_dir}` |",
        f"| steps / epoch reached | {last.get('step', 0)} / {last.get('epoch', 0)} |",
        f"| final loss (recon, aux) | {_num(last.get('loss')):.4f} ({_num(last.get('recon_loss')):.4f}, "
        f"{_num(last.get('aux_loss')):.4f}) |",
        f"| mean images/s (all ranks) | {np.nanmean(tput) if tput else math.nan:.1f} |",
        f"| samples skipped | {', '.join(f'{k}: {v}' for k, v in skipped.items() if v) or 'none'} |",
    ]
    if pre is not None:
        lines += [f"| model | {pre.cfg.model.size}, routing {pre.cfg.moe.routing}, {pre.cfg.moe.num_experts} "
                  f"experts, top-{pre.cfg.moe.top_k} |",
                  f"| checkpoint | `{pre.tag}` |",
                  f"| cluster round | `{None if pre.round is None else pre.round.path}` |"]
    return lines


def build_report(run_dir: Path, out_dir: Path | None = None) -> Path:
    """Write ``report.md`` and its PNGs into ``out_dir`` (default ``<run_dir>/report``); returns the markdown."""
    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir is not None else run_dir / "report"
    metrics_file = run_dir / "metrics.jsonl"
    if not metrics_file.is_file():
        raise ValueError(f"{run_dir} has no metrics.jsonl: pass a run folder written by launchers/pretrain.py.")
    out.mkdir(parents=True, exist_ok=True)
    rows = read_jsonl(metrics_file)
    sections: list[tuple[str, Path | None, str]] = []
    if rows:
        loss_png, tput_png = _plot_curves(rows, out)
        sections += [("Loss", loss_png, "Mean over ranks at each logging step; aux loss is unweighted."),
                     ("Throughput", tput_png, "Images per second over all ranks, per logging interval.")]
        load_png = _plot_expert_load(rows, out)
        if load_png:
            sections.append(("Expert load over time", load_png, "Share of the kept tokens each expert received "
                             "per logging interval, summed over ranks."))
        spec_png = _plot_specialisation(rows, out)
        if spec_png:
            sections.append(("Specialisation", spec_png, "Route purity: share of first-choice routes that went to "
                             "their cluster's preferred (noise-free top-1) expert. NMI: mutual information of "
                             "cluster and expert over the expert entropy (1: the cluster determines the expert)."))

    pre = None
    try:
        from moce_ds.checkpoints.run_reader import load_pretrained

        pre = load_pretrained(run_dir)
    except ValueError as e:  # no complete checkpoint yet: the curves still make a useful report
        sections.append(("Model", None, f"No checkpoint plots: {e}"))
    if pre is not None:
        probs: dict[int, np.ndarray] = {}
        if pre.model.policy.needs_clusters and pre.model.moe_blocks:
            from moce_ds.customize.selection import gate_probabilities

            probs = gate_probabilities(pre.model)
            sections.append(("Routing: cluster x expert", _plot_routing(probs, out),
                             "The gate's softmax p(e|c) per MoE layer (no noise); boxes mark each cluster's top-1 "
                             "expert."))
        png, note = _plot_reconstructions(pre, probs, out)
        sections.append(("Reconstructions", png, note))

    lines = [f"# Run report: {run_dir.name}", "", *_summary(rows, pre, run_dir), ""]
    for title, png, note in sections:
        lines += [f"## {title}", "", note, ""]
        if png is not None:
            lines += [f"![{title}]({png.name})", ""]
    md = out / "report.md"
    md.write_text("\n".join(lines))
    return md
