"""A MoCE encoder + one chosen expert per MoE layer -> a dense ViT state dict in timm's format.

Key names are timm's VisionTransformer's (patch_embed, cls_token, pos_embed, blocks.i.{norm1,attn,norm2,mlp},
norm, head), so `timm.create_model(name, checkpoint_path=...)` loads it with no missing or unexpected keys. The file
is `.safetensors` (tensors only, nothing to unpickle); `<stem>.json` beside it holds the VisionTransformer(...)
arguments.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from timm.models import load_checkpoint
from timm.models.vision_transformer import VisionTransformer

from moce_ds.atomic_files import atomic_write, atomic_write_text
from moce_ds.model import MAESpec, MaskedAutoencoderViT

__all__ = ["dense_state_dict", "timm_vit", "timm_kwargs", "save_dense", "dense_sidecar", "load_dense"]

_DECODER_PREFIXES = ("decoder_", "mask_token")


def timm_kwargs(spec: MAESpec, num_classes: int) -> dict:
    """The VisionTransformer(...) arguments that match `spec` (also printed in the report)."""
    return dict(img_size=spec.img_size, patch_size=spec.patch_size, embed_dim=spec.embed_dim, depth=spec.depth,
                num_heads=spec.num_heads, mlp_ratio=spec.mlp_ratio, qkv_bias=True, num_classes=num_classes)


def timm_vit(spec: MAESpec, num_classes: int = 0) -> VisionTransformer:
    return VisionTransformer(**timm_kwargs(spec, num_classes))


@torch.no_grad()
def dense_state_dict(model: MaskedAutoencoderViT, experts: dict[int, int | dict[int, float]],
                     scales: dict[int, float], num_classes: int = 0) -> dict[str, torch.Tensor]:
    """Shared encoder weights + one MLP per MoE block (fc2 scaled by the folded gate value) [+ a zero head].

    experts: block -> the expert to export, or {expert: weight} to export the experts' weighted average (the merge
    export; weights sum to 1).
    """
    mix = {b: {e: 1.0} if isinstance(e, int) else e for b, e in experts.items()}
    if set(mix) != set(model.moe_blocks):
        raise ValueError(f"choose one expert for each MoE block {model.moe_blocks} (or a mix), got {sorted(mix)}.")
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if key.startswith(_DECODER_PREFIXES) or ".mlp.deepspeed_moe." in key:
            continue
        out[key] = value.detach().clone().float()
    for block, weights in mix.items():
        if abs(sum(weights.values()) - 1.0) > 1e-6:
            raise ValueError(f"the expert weights of block {block} must sum to 1, got {weights}.")
        local = model.blocks[block].mlp.deepspeed_moe.experts.deepspeed_experts
        for name in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"):
            merged = sum(w * local[e].get_parameter(name).detach().float() for e, w in weights.items())
            # gate x (W2 h + b2) == (gate W2) h + gate b2: the gate value folds into fc2
            out[f"blocks.{block}.mlp.{name}"] = merged * scales.get(block, 1.0) if name.startswith("fc2") else merged
    if num_classes:  # timm's default models carry a classifier; MAE trains none, so it starts at zero
        out["head.weight"] = torch.zeros(num_classes, model.spec.embed_dim)
        out["head.bias"] = torch.zeros(num_classes)
    return out


def dense_sidecar(path: Path) -> Path:
    """`<stem>.json` beside a `.safetensors` export; `<name>.pth.json` beside an old `.pth` one."""
    return path.with_name(path.name + ".json") if path.suffix == ".pth" else path.with_suffix(".json")


def save_dense(state: dict[str, torch.Tensor], path: Path, vit_kwargs: dict) -> Path:
    """`state` as `.safetensors` (what timm's load_checkpoint and create_model(checkpoint_path=...) read) plus its
    sidecar holding the VisionTransformer(...) arguments, so evaluate.py rebuilds the architecture untold."""
    if path.suffix != ".safetensors":
        raise ValueError(f"dense export {path} must end in .safetensors (timm picks its reader by the suffix).")
    path.parent.mkdir(parents=True, exist_ok=True)
    # the sidecar first: once the weights exist, so does their description
    meta = json.dumps({"vision_transformer": vit_kwargs}, indent=1)
    atomic_write_text(dense_sidecar(path), meta)
    tensors = {k: v.contiguous() for k, v in state.items()}  # safetensors stores only contiguous, unshared tensors
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    return path


def load_dense(path: Path) -> VisionTransformer:
    """A dense export (`.safetensors`, or an old `.pth`) as the VisionTransformer its sidecar describes, strictly."""
    meta = dense_sidecar(path)
    if not meta.is_file():
        raise ValueError(f"{path} has no {meta.name} beside it: re-export it with launchers/customize.py.")
    vit = VisionTransformer(**json.loads(meta.read_text())["vision_transformer"])
    load_checkpoint(vit, str(path), strict=True)  # .pth goes through torch.load(weights_only=True)
    return vit
