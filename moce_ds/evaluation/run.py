"""evaluate(): one encoder on one task -> top-1 accuracies (linear probe, k-NN, optional fine-tune)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from moce_ds.customize.task_data import TaskData, load_task_data
from moce_ds.evaluation.encoders import extract_features, load_encoder
from moce_ds.evaluation.probes import finetune, knn, linear_probe

__all__ = ["check_task", "evaluate"]


def check_task(data: TaskData) -> None:
    """Refuse a task no probe can learn, in one line, before any feature is extracted."""
    present = np.unique(data.train_y)
    if present.size < 2:
        only = ", ".join(repr(data.classes[int(c)]) if int(c) < len(data.classes) else str(c) for c in present)
        raise ValueError(f"task {data.name} has only one class ({only or 'none'}) among its {len(data.train_y)} "
                         f"training images: a probe needs at least two; give it two or more classes with training "
                         f"images (class subfolders of two or more images each, or 'cls' labels in shards).")


def evaluate(model: str | Path, task: str, checkpoint: Path | None = None, do_finetune: bool = False,
             finetune_epochs: int = 30, out: Path | None = None, cache_dir: Path | None = None,
             device: str | torch.device | None = None, batch_size: int | None = None) -> dict:
    """``device``: where features are extracted and the fine-tune runs (None/"cpu", "cuda[:N]", "auto");
    ``batch_size``: images per batch for both (None: 256 for features, 64 for the fine-tune)."""
    enc = load_encoder(model, checkpoint)
    data = load_task_data(task, enc.img_size, cache_dir)
    check_task(data)
    batch = {} if batch_size is None else {"batch_size": batch_size}
    ftr = extract_features(enc, data.train_x, device=device, **batch)
    fte = extract_features(enc, data.test_x, device=device, **batch)
    result = {"model": enc.name, "task": data.name, "num_train": len(ftr), "num_test": len(fte),
              "linear_probe_top1": linear_probe(ftr, data.train_y, fte, data.test_y),
              "knn_top1": knn(ftr, data.train_y, fte, data.test_y)}
    if do_finetune:
        if enc.vit is None:
            raise ValueError("fine-tuning needs a timm ViT (a dense export or a timm checkpoint), not a run folder.")
        result["finetune_top1"] = finetune(enc.vit, data.train_x, data.train_y, data.test_x, data.test_y,
                                           epochs=finetune_epochs, device=device, **batch)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
    return result
