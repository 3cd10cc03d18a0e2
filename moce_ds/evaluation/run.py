"""evaluate(): one encoder on one task -> top-1 accuracies (linear probe, k-NN, optional fine-tune)."""

from __future__ import annotations

import json
from pathlib import Path

from moce_ds.customize.task_data import load_task_data
from moce_ds.evaluation.encoders import extract_features, load_encoder
from moce_ds.evaluation.probes import finetune, knn, linear_probe

__all__ = ["evaluate"]


def evaluate(model: str | Path, task: str, checkpoint: Path | None = None, do_finetune: bool = False,
             finetune_epochs: int = 30, out: Path | None = None, cache_dir: Path | None = None) -> dict:
    enc = load_encoder(model, checkpoint)
    data = load_task_data(task, enc.img_size, cache_dir)
    ftr, fte = extract_features(enc, data.train_x), extract_features(enc, data.test_x)
    result = {"model": enc.name, "task": data.name, "num_train": len(ftr), "num_test": len(fte),
              "linear_probe_top1": linear_probe(ftr, data.train_y, fte, data.test_y),
              "knn_top1": knn(ftr, data.train_y, fte, data.test_y)}
    if do_finetune:
        if enc.vit is None:
            raise ValueError("fine-tuning needs a timm ViT (a dense export or a timm checkpoint), not a run folder.")
        result["finetune_top1"] = finetune(enc.vit, data.train_x, data.train_y, data.test_x, data.test_y,
                                           epochs=finetune_epochs)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
    return result
