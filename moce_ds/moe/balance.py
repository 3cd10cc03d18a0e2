"""Expert-load statistics from a token-routed MoE layer's last routes (per rank; reduce across ranks yourself).

Cluster-routed layers know their load at image level already (`LayerRoutes.load`); both give the same keys.
"""

from __future__ import annotations

import torch

__all__ = ["layer_load"]


def layer_load(indices: torch.Tensor, exp_counts: torch.Tensor, images: int, tokens_per_image: int,
               num_experts: int) -> dict[str, torch.Tensor]:
    """indices: (k, S) kept expert per route (-1 dropped); exp_counts: (E,) requested before dropping.

    Returns float64 (E,) tensors on the routes' device (no host copy): tokens requested, tokens kept,
    images routed (an image counts for an expert when at least one of its tokens was kept there).
    """
    # Column 0 collects the dropped routes (-1); scatter_add instead of bincount/boolean indexing: no host sync.
    flat = indices.reshape(-1).long() + 1
    tokens_kept = torch.zeros(num_experts + 1, dtype=torch.float64, device=indices.device)
    tokens_kept = tokens_kept.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.float64))[1:]
    # (k, B, T) -> per image, which experts received any of its tokens
    per_image = indices.reshape(indices.shape[0], images, tokens_per_image).permute(1, 0, 2).reshape(images, -1)
    hit = torch.zeros(images, num_experts + 1, dtype=torch.bool, device=indices.device)
    hit.scatter_(1, per_image.long() + 1, True)  # column 0 collects the dropped routes
    return {
        "tokens_requested": exp_counts.detach().double(),
        "tokens_kept": tokens_kept,
        "images": hit[:, 1:].sum(0).double(),
    }
