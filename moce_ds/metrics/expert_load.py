"""Accumulates per-layer expert load (and, for cluster routing, specialisation) over a logging interval and
reduces it across ranks."""

from __future__ import annotations

import numpy as np
import torch

from moce_ds.moe.layer import MoEMlp
from moce_ds.moe.specialisation import specialisation

__all__ = ["ExpertLoadMeter"]

_KEYS = ("tokens_requested", "tokens_kept", "images")  # (E,) per layer, always
_SPECIALISATION = ("cluster_expert", "preferred_routes")  # (C*E,) and (1,), cluster-routed layers only


class ExpertLoadMeter:
    def __init__(self, layers: list[tuple[int, MoEMlp]], num_experts: int) -> None:
        self.layers = layers
        self.num_experts = num_experts
        self.reset()

    def reset(self) -> None:
        self.sums: dict[int, dict[str, torch.Tensor]] = {
            i: {k: torch.zeros(self.num_experts, dtype=torch.float64) for k in _KEYS} for i, _ in self.layers}

    def update(self) -> None:
        """Add each MoE layer's load from its last forward; sums stay on the routes' device until `reduce`."""
        for i, moe in self.layers:
            stats = moe.last_load
            if stats is None:
                continue
            for k, v in stats.items():
                prev = self.sums[i].get(k)
                self.sums[i][k] = v.clone() if prev is None else prev.to(v.device) + v

    def _keys(self, i: int) -> list[str]:
        return [*_KEYS, *(k for k in _SPECIALISATION if k in self.sums[i])]

    def reduce(self, all_reduce) -> dict[str, dict]:
        """One all-reduce for all layers; returns {layer: {stat: [per expert], "dropped_share": float, and for
        cluster routing "route_purity", "cluster_expert_nmi"}} and resets.

        Every rank must hold the same statistics (the same MoE layers, all routed by cluster or none), so the
        flattened vectors line up in the reduction.
        """
        if not self.layers:
            return {}
        parts = [self.sums[i][k].cpu().reshape(-1) for i, _ in self.layers for k in self._keys(i)]
        flat = all_reduce(torch.cat(parts))
        out: dict[str, dict] = {}
        offset = 0
        for i, _ in self.layers:
            layer: dict = {}
            values: dict[str, np.ndarray] = {}
            for k in self._keys(i):
                n = self.sums[i][k].numel()
                values[k] = flat[offset:offset + n].numpy()
                offset += n
            for k in _KEYS:
                layer[k] = [int(v) for v in values[k].tolist()]
            # Routes dropped over capacity / requested: for cluster routing whole images, so the dropped image share.
            requested = sum(layer["tokens_requested"])
            layer["dropped_share"] = 1.0 - sum(layer["tokens_kept"]) / requested if requested else 0.0
            if "cluster_expert" in values:
                joint = values["cluster_expert"].reshape(-1, self.num_experts)
                layer.update(specialisation(joint, float(values["preferred_routes"][0])))
            out[str(i)] = layer
        self.reset()
        return out
