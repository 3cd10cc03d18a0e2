"""A MoCE encoder + one chosen expert per MoE layer -> a dense ViT state dict in timm's format.

Key names are timm's VisionTransformer's (patch_embed, cls_token, pos_embed, blocks.i.{norm1,attn,norm2,mlp},
norm, head), so `timm.create_model(name, checkpoint_path=...)` loads it with no missing or unexpected keys.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from timm.models.vision_transformer import VisionTransformer

from moce_ds.model import MAESpec, MaskedAutoencoderViT

__all__ = ["dense_state_dict", "timm_vit", "timm_kwargs", "save_dense"]

_DECODER_PREFIXES = ("decoder_", "mask_token")


def timm_kwargs(spec: MAESpec, num_classes: int) -> dict:
    """The VisionTransformer(...) arguments that match `spec` (also printed in the report)."""
    return dict(img_size=spec.img_size, patch_size=spec.patch_size, embed_dim=spec.embed_dim, depth=spec.depth,
                num_heads=spec.num_heads, mlp_ratio=spec.mlp_ratio, qkv_bias=True, num_classes=num_classes)


def timm_vit(spec: MAESpec, num_classes: int = 0) -> VisionTransformer:
    return VisionTransformer(**timm_kwargs(spec, num_classes))


@torch.no_grad()
def dense_state_dict(model: MaskedAutoencoderViT, chosen: dict[int, int], scales: dict[int, float],
                     num_classes: int = 0) -> dict[str, torch.Tensor]:
    """Shared encoder weights + chosen expert MLPs (fc2 scaled by the folded gate value) [+ a zero head]."""
    if set(chosen) != set(model.moe_blocks):
        raise ValueError(f"choose one expert for each MoE block {model.moe_blocks}, got {sorted(chosen)}.")
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if key.startswith(_DECODER_PREFIXES) or ".mlp.deepspeed_moe." in key:
            continue
        out[key] = value.detach().clone().float()
    for block, expert in chosen.items():
        mlp = model.blocks[block].mlp.deepspeed_moe.experts.deepspeed_experts[expert]
        scale = scales.get(block, 1.0)
        out[f"blocks.{block}.mlp.fc1.weight"] = mlp.fc1.weight.detach().clone().float()
        out[f"blocks.{block}.mlp.fc1.bias"] = mlp.fc1.bias.detach().clone().float()
        # gate x (W2 h + b2) == (gate W2) h + gate b2: the gate value folds into fc2
        out[f"blocks.{block}.mlp.fc2.weight"] = mlp.fc2.weight.detach().float() * scale
        out[f"blocks.{block}.mlp.fc2.bias"] = mlp.fc2.bias.detach().float() * scale
    if num_classes:  # timm's default models carry a classifier; MAE trains none, so it starts at zero
        out["head.weight"] = torch.zeros(num_classes, model.spec.embed_dim)
        out["head.bias"] = torch.zeros(num_classes)
    return out


def save_dense(state: dict[str, torch.Tensor], path: Path, vit_kwargs: dict) -> Path:
    """Plain state dict (what timm's load_checkpoint reads), written atomically, plus `<path>.json` holding the
    VisionTransformer(...) arguments, so evaluate.py can rebuild the architecture without being told."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)
    path.with_suffix(path.suffix + ".json").write_text(json.dumps({"vision_transformer": vit_kwargs}, indent=1))
    return path
