"""Accumulates per-layer expert load over a logging interval and reduces it across ranks."""

from __future__ import annotations

import torch

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
        """Add each MoE layer's load from its last forward; sums stay on the routes' device until `reduce`."""
        for i, moe in self.layers:
            stats = moe.last_load
            if stats is None:
                continue
            for k in _KEYS:
                self.sums[i][k] = self.sums[i][k].to(stats[k].device) + stats[k]

    def reduce(self, all_reduce) -> dict[str, dict]:
        """One all-reduce for all layers; returns {layer: {stat: [per expert], "dropped_share": float}} and resets."""
        if not self.layers:
            return {}
        flat = torch.stack([self.sums[i][k].cpu() for i, _ in self.layers for k in _KEYS])  # (L*3, E)
        flat = all_reduce(flat)
        out: dict[str, dict] = {}
        row = 0
        for i, _ in self.layers:
            out[str(i)] = {}
            for k in _KEYS:
                out[str(i)][k] = [int(v) for v in flat[row].tolist()]
                row += 1
            # Routes dropped over capacity / requested: for cluster routing whole images, so the dropped image share.
            requested = sum(out[str(i)]["tokens_requested"])
            out[str(i)]["dropped_share"] = 1.0 - sum(out[str(i)]["tokens_kept"]) / requested if requested else 0.0
        self.reset()
        return out
