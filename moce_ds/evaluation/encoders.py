"""Frozen feature extractors for evaluation: a timm ViT checkpoint, or an encoder from one of our runs."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from tqdm import tqdm

from moce_ds.checkpoints.run_reader import load_pretrained
from moce_ds.customize.export import dense_sidecar, load_dense
from moce_ds.data.loader import to_tensor
from moce_ds.model.device import inference, resolve_device

__all__ = ["Encoder", "load_encoder", "to_tensor", "extract_features"]


@dataclass
class Encoder:
    name: str
    img_size: int
    tokens: Callable[[torch.Tensor], torch.Tensor]  # (N, 3, S, S) normalised -> (N, 1+L, D) final-norm tokens
    vit: VisionTransformer | None  # set when the encoder is a timm ViT (fine-tunable)
    module: torch.nn.Module | None = None  # what `tokens` runs (moved to the extraction device)


def load_encoder(model: str | Path, checkpoint: Path | None = None) -> Encoder:
    """`model`: a dense export (.safetensors with its <stem>.json; an older .pth with its .pth.json), a timm model
    name (+ `checkpoint`), or a pre-training run."""
    path = Path(model)
    if path.suffix in (".safetensors", ".pth") and path.is_file():
        if not dense_sidecar(path).is_file():
            raise ValueError(f"{path} has no {dense_sidecar(path).name} beside it; pass a timm model name with "
                             f"--checkpoint {path}.")
        vit = load_dense(path)
        return Encoder(path.stem, vit.patch_embed.img_size[0], vit.forward_features, vit.eval(), vit)
    if path.is_dir():
        pre = load_pretrained(path)
        if pre.model.policy.needs_clusters:
            raise ValueError(f"{path} is a MoCE run: customise it for the task first (launchers/customize.py) and "
                             f"evaluate the dense export it writes.")
        mae = pre.model

        def tokens(x: torch.Tensor) -> torch.Tensor:
            with mae.policy.inference(mae):  # evaluation routes every token: no capacity drop, no noise
                return mae.forward_features(x)

        return Encoder(f"{path.name}:{pre.tag}", mae.spec.img_size, tokens, None, mae.eval())
    if checkpoint is None:
        raise ValueError(f"'{model}' is neither a dense export nor a run folder; with a timm model name also pass "
                         f"--checkpoint <weights file> (nothing is downloaded).")
    vit = timm.create_model(str(model), checkpoint_path=str(checkpoint), num_classes=0)
    return Encoder(str(model), vit.patch_embed.img_size[0], vit.forward_features, vit.eval(), vit)


def extract_features(encoder: Encoder, images: np.ndarray, batch_size: int = 256,
                     device: str | torch.device | None = None) -> np.ndarray:
    """Mean of the patch tokens after the final norm (MAE's global-pool feature): (N, D) float32.

    ``device`` (default CPU; "auto": the GPU when there is one): the encoder moves there, uint8 batches are copied
    there and normalised there; on CUDA under bf16 autocast and inference mode."""
    dev = resolve_device(device)
    if encoder.module is not None:
        encoder.module.to(dev)
    out = []
    bar = tqdm(range(0, len(images), batch_size), desc=f"features {encoder.name}", unit="batch", leave=False,
               disable=not sys.stderr.isatty())  # quiet in logs and CI
    with inference(dev):
        for i in bar:
            tokens = encoder.tokens(to_tensor(images[i: i + batch_size], device=dev))
            out.append(tokens[:, 1:, :].float().mean(dim=1).cpu())
    return torch.cat(out).numpy()
