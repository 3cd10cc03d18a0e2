"""customize(): checkpoint + centroids + downstream task -> dense timm ViT + selection report."""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from moce_ds.checkpoints.run_reader import load_pretrained
from moce_ds.clustering.feature_sources import assign_to_round, round_extractor
from moce_ds.customize.export import dense_state_dict, save_dense, timm_kwargs, timm_vit
from moce_ds.customize.hf_export import hf_unavailable, save_hf_folder
from moce_ds.customize.report import write_report
from moce_ds.customize.selection import Selection, cluster_histogram, select_experts
from moce_ds.customize.task_data import load_task_data

__all__ = ["CustomizeResult", "customize"]

log = logging.getLogger("moce_ds")


@dataclass
class CustomizeResult:
    checkpoint: Path  # the dense timm checkpoint (.safetensors)
    selection: Selection
    report: dict[str, Path]
    timm_call: str
    hf_folder: Path | None = None  # the same weights for transformers.ViTModel; None when skipped


def customize(checkpoint: Path, task: str, out_dir: Path, centroids: Path | None = None,
              num_classes: int | None = None, cache_dir: Path | None = None,
              features: str | None = None, hf: bool = True, rule: str = "path") -> CustomizeResult:
    """A MoCE checkpoint + a task -> a dense timm ViT (and a Hugging Face folder) + the selection report.

    ``rule``: how experts are chosen (:func:`moce_ds.customize.selection.select_experts`): ``path``, ``per_layer``
    or ``merge``. ``features``: featurise the task with this ``--features`` source instead of the round's own
    (e.g. when the round's source checkpoint was deleted); it must give features of the centroids' width.
    ``hf``: also write ``<out_dir>/hf/`` for transformers.ViTModel (skipped, with the reason in the report,
    without transformers)."""
    pre = load_pretrained(checkpoint, centroids=centroids)
    if pre.round is None:
        raise ValueError(f"no clustering round found for {checkpoint}: pass --centroids <round folder>.")
    if not pre.model.policy.needs_clusters:
        raise ValueError(f"task customisation needs a MoCE checkpoint (moe.routing=cluster); {checkpoint} is "
                         f"'{pre.cfg.moe.routing}': evaluate it directly with launchers/evaluate.py.")
    spec = pre.model.spec
    if cache_dir is None and pre.cfg.data.cache_dir:
        cache_dir = Path(pre.cfg.data.cache_dir)  # the embedded set the checkpoint was trained on
    # Rebuild the round's feature source first: a deleted source fails here, before any task image is read.
    extractor = round_extractor(pre.round, features)
    data = load_task_data(task, spec.img_size, cache_dir)
    ids = assign_to_round(pre.round, data.all_images, extractor)  # task images featurised like the round's
    hist = cluster_histogram(ids, pre.round.k)
    sel = select_experts(pre.model, hist, rule)
    log.info("task %s: %d images featurised by %s; %s rule: experts %s, coverage %.1f%%", data.name, len(ids),
             extractor.source, rule, sel.chosen, 100 * sel.coverage)

    n_cls = (1000 if spec.timm_name else 0) if num_classes is None else num_classes
    vit_kwargs = timm_kwargs(spec, n_cls)
    state = dense_state_dict(pre.model, sel.mix, sel.scales, n_cls)
    timm_vit(spec, n_cls).load_state_dict(state, strict=True)  # refuse to write anything timm would not load
    name = spec.timm_name or f"vit_{pre.cfg.model.size}"
    path = save_dense(state, out_dir / f"{name}_{data.name}.safetensors", vit_kwargs)
    if spec.timm_name:
        call = f'timm.create_model("{spec.timm_name}", checkpoint_path="{path}")'
    else:
        args = ", ".join(f"{k}={v!r}" for k, v in vit_kwargs.items())
        call = f'm = VisionTransformer({args}); timm.models.load_checkpoint(m, "{path}", strict=True)'
    why_not = hf_unavailable() if hf else "not asked for (--no-hf)"
    if why_not is None:
        hf_folder = save_hf_folder(state, vit_kwargs, out_dir / "hf")
        hf_call = f'ViTModel.from_pretrained("{hf_folder}", add_pooling_layer=False)'
    else:
        hf_folder, hf_call = None, f"skipped: {why_not}"
        shutil.rmtree(out_dir / "hf", ignore_errors=True)  # an older export's folder would hold other weights
        log.info("no Hugging Face folder: %s", why_not)
    extra = {"checkpoint": str(pre.ckpt_dir / pre.tag), "cluster_round": str(pre.round.path),
             "dense_checkpoint": str(path), "load_in_timm": call, "load_in_transformers": hf_call,
             "num_images": int(len(ids)), "feature_source": extractor.source}
    report = write_report(out_dir, data.name, sel, extra, data.skipped)
    return CustomizeResult(path, sel, report, call, hf_folder)

