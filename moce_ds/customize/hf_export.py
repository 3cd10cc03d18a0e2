"""The dense timm ViT as a Hugging Face folder (config.json + model.safetensors) that `ViTModel` loads.

    ViTModel.from_pretrained(folder, add_pooling_layer=False).last_hidden_state == VisionTransformer.forward_features

Keys follow the Hub's ViT checkpoints (`encoder.layer.i.attention.attention.query`, ...), which every transformers
release from 4.40 on loads (5.x renames them on load). timm fuses q, k and v into one `qkv` linear; ViT keeps three.
MAE trains no pooler (HF's dense + tanh on the CLS token) and no classifier, so neither is written: load with
`add_pooling_layer=False`. transformers is optional (`pip install "moce-ds[hf]"`); it is imported only here.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

__all__ = ["hf_unavailable", "hf_vit_config", "hf_state_dict", "save_hf_folder"]

# timm VisionTransformer arguments this mapping knows; any other changes the architecture, so it is refused
_KNOWN_KWARGS = {"img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias", "num_classes"}

# timm name inside blocks.i -> HF name inside encoder.layer.i (qkv is split separately)
_BLOCK_KEYS = {
    "norm1": "layernorm_before",
    "attn.proj": "attention.output.dense",
    "norm2": "layernorm_after",
    "mlp.fc1": "intermediate.dense",
    "mlp.fc2": "output.dense",
}
_TOP_KEYS = {
    "cls_token": "embeddings.cls_token",
    "pos_embed": "embeddings.position_embeddings",
    "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
    "norm.weight": "layernorm.weight",
    "norm.bias": "layernorm.bias",
}


def hf_unavailable() -> str | None:
    """Why no Hugging Face folder can be written here, or None when it can."""
    try:
        import transformers  # noqa: F401
    except ImportError as e:
        return f"transformers is not installed ({e}); pip install 'moce-ds[hf]'"
    return None


def hf_vit_config(vit_kwargs: dict):
    """transformers.ViTConfig for timm's VisionTransformer(**vit_kwargs)."""
    from transformers import ViTConfig

    unknown = set(vit_kwargs) - _KNOWN_KWARGS
    if unknown or not vit_kwargs.get("qkv_bias", False):
        raise ValueError(f"no Hugging Face ViT for VisionTransformer arguments {sorted(unknown) or 'qkv_bias=False'}: "
                         f"export with --no-hf.")
    dim = vit_kwargs["embed_dim"]
    return ViTConfig(
        image_size=vit_kwargs["img_size"], patch_size=vit_kwargs["patch_size"], num_channels=3, hidden_size=dim,
        num_hidden_layers=vit_kwargs["depth"], num_attention_heads=vit_kwargs["num_heads"],
        intermediate_size=int(dim * vit_kwargs["mlp_ratio"]), hidden_act="gelu",  # exact (erf) GELU, as nn.GELU
        layer_norm_eps=1e-6,  # timm's and ours; HF's default 1e-12 would shift every feature
        qkv_bias=True, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )


def hf_state_dict(state: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """timm VisionTransformer keys -> ViTModel keys; the classifier head (if any) is left out."""
    used = {k for k in state if k.startswith("head.")}

    def take(key: str) -> torch.Tensor:
        used.add(key)
        return state[key]

    out = {hf_key: take(timm_key) for timm_key, hf_key in _TOP_KEYS.items()}
    for i in range(depth):
        src, dst = f"blocks.{i}.", f"encoder.layer.{i}."
        for kind in ("weight", "bias"):
            # qkv: (3 D, D) rows are q | k | v, heads in order inside each: the layout of ViT's three linears
            for name, part in zip(("query", "key", "value"), take(f"{src}attn.qkv.{kind}").chunk(3, dim=0)):
                out[f"{dst}attention.attention.{name}.{kind}"] = part.contiguous()
            for timm_name, hf_name in _BLOCK_KEYS.items():
                out[f"{dst}{hf_name}.{kind}"] = take(f"{src}{timm_name}.{kind}")
    if set(state) - used:
        raise ValueError(f"timm keys {sorted(set(state) - used)[:5]} have no Hugging Face ViT counterpart: "
                         f"export with --no-hf.")
    return out


def save_hf_folder(state: dict[str, torch.Tensor], vit_kwargs: dict, folder: Path) -> Path:
    """Write `folder/config.json` + `folder/model.safetensors`, whole or not at all (built beside, then renamed)."""
    from safetensors.torch import save_file
    from transformers import ViTModel
    from transformers.utils import logging as hf_logging

    config = hf_vit_config(vit_kwargs)
    tensors = hf_state_dict(state, vit_kwargs["depth"])
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config.save_pretrained(tmp)
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    # refuse to publish what from_pretrained would not load whole (its key names change across releases)
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a check, not a download: no bar in the launcher's output
    try:
        _, info = ViTModel.from_pretrained(tmp, add_pooling_layer=False, output_loading_info=True)
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        raise ValueError(f"ViTModel.from_pretrained({tmp}) reports {bad}: export with --no-hf and report it.")
    shutil.rmtree(folder, ignore_errors=True)  # a folder cannot be renamed over a non-empty one
    tmp.rename(folder)
    return folder
