"""Fixed 2-D sin-cos position embeddings (MAE's), with a leading zero row for the cls token."""

from __future__ import annotations

import torch

__all__ = ["sincos_pos_embed_2d"]


def _sincos_1d(embed_dim: int, pos: torch.Tensor) -> torch.Tensor:
    # pos: (M,) -> (M, embed_dim)
    omega = torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    out = pos.reshape(-1).to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_pos_embed_2d(embed_dim: int, grid_size: int, cls_token: bool = True) -> torch.Tensor:
    """(1 + grid_size**2, embed_dim) if cls_token else (grid_size**2, embed_dim), float32."""
    if embed_dim % 4:
        raise ValueError(f"sin-cos position embeddings need an embedding width divisible by 4, got {embed_dim}.")
    coords = torch.arange(grid_size, dtype=torch.float64)
    grid_w, grid_h = torch.meshgrid(coords, coords, indexing="xy")  # MAE's order: w varies fastest
    emb = torch.cat([_sincos_1d(embed_dim // 2, grid_w), _sincos_1d(embed_dim // 2, grid_h)], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, embed_dim, dtype=torch.float64), emb], dim=0)
    return emb.float()
