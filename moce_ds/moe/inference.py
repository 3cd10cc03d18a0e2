"""Routing for inference: what featurising, evaluation, customisation and the report need from every MoE layer.

Training routes with capacity (tokens or whole images dropped), per-image gate noise and, for the token gate,
random token selection. A feature must not depend on its batch, so inference runs eval() (no noise, no random
token selection, no top-2 second-expert sampling) and dropless (no capacity drop). This is the only place
outside the gates that changes their settings.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from deepspeed.moe.layer import MoE

__all__ = ["inference_routing"]


@contextlib.contextmanager
def inference_routing(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``with inference_routing(model):`` eval mode and dropless MoE layers; both restored on exit."""
    gates = [m.deepspeed_moe.gate for m in model.modules() if isinstance(m, MoE)]  # DeepSpeed's own class: no loop
    saved = [g.drop_tokens for g in gates]
    was_training = model.training
    model.eval()
    for g in gates:
        g.drop_tokens = False  # dropless: no token of an image is lost to capacity
    try:
        yield model
    finally:
        for g, d in zip(gates, saved):
            g.drop_tokens = d
        model.train(was_training)
