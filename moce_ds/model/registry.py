"""Named MAE sizes, from a CPU-sized `mini` (32x32) up to ViT-L/16 at 224.

Names follow MAE's convention for the encoder; `timm_name` is the timm model an exported dense encoder
loads into (None for sizes timm has no name for: the README shows the VisionTransformer(...) call).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

__all__ = ["MAESpec", "MODEL_SIZES", "get_spec", "tiny_variant"]


@dataclass(frozen=True)
class MAESpec:
    img_size: int
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    decoder_embed_dim: int
    decoder_depth: int
    decoder_num_heads: int
    mlp_ratio: float = 4.0
    timm_name: str | None = None

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2


MODEL_SIZES: dict[str, MAESpec] = {
    # 8x8 patches of 4 px: small enough that a few hundred steps run in minutes on 2 CPU cores.
    "mini": MAESpec(32, 4, 128, 6, 4, 64, 2, 4),
    "vit_tiny_patch16_224": MAESpec(224, 16, 192, 12, 3, 128, 4, 4, timm_name="vit_tiny_patch16_224"),
    "vit_small_patch16_224": MAESpec(224, 16, 384, 12, 6, 256, 4, 8, timm_name="vit_small_patch16_224"),
    "vit_base_patch16_224": MAESpec(224, 16, 768, 12, 12, 512, 8, 16, timm_name="vit_base_patch16_224"),
    "vit_large_patch16_224": MAESpec(224, 16, 1024, 24, 16, 512, 8, 16, timm_name="vit_large_patch16_224"),
}


def get_spec(size: str) -> MAESpec:
    if size not in MODEL_SIZES:
        raise ValueError(f"model.size='{size}' is unknown; choose one of {', '.join(MODEL_SIZES)}.")
    return MODEL_SIZES[size]


def tiny_variant(spec: MAESpec) -> MAESpec:
    """The same geometry (image and patch size) with a tiny width and depth, for tests of every size."""
    return dataclasses.replace(
        spec, embed_dim=32, depth=4, num_heads=2, decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2
    )
