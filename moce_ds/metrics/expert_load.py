"""Accumulates per-layer expert load over a logging interval and reduces it across ranks."""

from __future__ import annotations

import torch

from moce_ds.moe.balance import layer_load
from moce_ds.moe.layer import MoEMlp

__all__ = ["ExpertLoadMeter"]

_KEYS = ("tokens_requested", "tokens_kept", "images")


class ExpertLoadMeter:
    def __init__(self, layers: list[tuple[int, MoEMlp]], num_experts: int) -> None:
        self.layers = layers
        self.num_experts = num_experts
        self.reset()

    def reset(self) -> None:
        self.sums = {i: {k: torch.zeros(self.num_experts, dtype=torch.float64) for k in _KEYS} for i, _ in self.layers}

    def update(self) -> None:
        """Read each MoE layer's routes from its last forward."""
        for i, moe in self.layers:
            gate = moe.gate
            if gate.last_indices is None:
                continue
            images, seq = moe.last_tokens
            stats = layer_load(gate.last_indices, moe.exp_counts, images, seq, self.num_experts)
            for k in _KEYS:
                self.sums[i][k] += stats[k]

    def reduce(self, all_reduce) -> dict[str, dict[str, list[float]]]:
        """One all-reduce for all layers; returns {layer: {stat: [per expert]}} and resets."""
        if not self.layers:
            return {}
        flat = torch.stack([self.sums[i][k] for i, _ in self.layers for k in _KEYS])  # (L*3, E)
        flat = all_reduce(flat)
        out: dict[str, dict[str, list[float]]] = {}
        row = 0
        for i, _ in self.layers:
            out[str(i)] = {}
            for k in _KEYS:
                out[str(i)][k] = [int(v) for v in flat[row].tolist()]
                row += 1
        self.reset()
        return out
