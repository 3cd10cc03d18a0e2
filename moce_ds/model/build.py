"""Config -> model, in one place for the trainer, the tests and the benchmarks."""

from __future__ import annotations

import torch

from moce_ds.config.schema import Config
from moce_ds.model.mae import MaskedAutoencoderViT, init_local_experts
from moce_ds.model.registry import MAESpec, get_spec

__all__ = ["build_model"]


def build_model(cfg: Config, ep_size: int = 1, ep_rank: int = 0, spec: MAESpec | None = None) -> MaskedAutoencoderViT:
    """Shared weights are drawn from cfg.train.seed (identical on every rank); experts from their global ids."""
    torch.manual_seed(cfg.train.seed)
    model = MaskedAutoencoderViT(spec or get_spec(cfg.model.size), cfg.moe, ep_size, cfg.model.mask_ratio,
                                 cfg.model.norm_pix_loss)
    init_local_experts(model, ep_rank, cfg.train.seed)
    return model
