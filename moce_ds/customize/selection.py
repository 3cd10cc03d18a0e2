"""Task -> cluster histogram -> per-layer expert scores -> chosen expert per MoE layer (DESIGN.md §1.6).

q(c): share of the task's images whose nearest centroid is c.
s_e = sum_c q(c) * p(e | c), with p the gate's softmax over experts for cluster c (eval: no noise).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from moce_ds.clustering.kmeans import assign, unit_rows
from moce_ds.model import MaskedAutoencoderViT

__all__ = ["Selection", "cluster_histogram", "gate_probabilities", "select_experts"]


def cluster_histogram(features: np.ndarray, centroids: np.ndarray, spherical: bool) -> np.ndarray:
    """features (N, d), centroids (C, d) -> q (C,) float64 summing to 1."""
    if features.shape[1] != centroids.shape[1]:
        raise ValueError(f"task features have width {features.shape[1]} but the centroids {centroids.shape[1]}: "
                         f"featurise the task with the clustering round's feature source.")
    if spherical:
        features, centroids = unit_rows(features), unit_rows(centroids)
    nearest, _ = assign(features, centroids)
    return np.bincount(nearest, minlength=centroids.shape[0]).astype(np.float64) / len(nearest)


@torch.no_grad()
def gate_probabilities(model: MaskedAutoencoderViT) -> dict[int, np.ndarray]:
    """{block: p (C, E)}: each MoE layer's softmax over experts for every cluster, without noise."""
    out = {}
    for block, moe in model.moe_layers():
        gate = moe.gate
        was_training = gate.training
        gate.eval()
        logits = gate.image_logits(torch.arange(gate.num_clusters))
        gate.train(was_training)
        out[block] = torch.softmax(logits, dim=-1).double().numpy()
    return out


@dataclass
class Selection:
    histogram: np.ndarray  # (C,)
    scores: dict[int, np.ndarray]  # block -> (E,)
    chosen: dict[int, int]  # block -> expert
    scales: dict[int, float]  # block -> gate value folded into the exported MLP
    probabilities: dict[int, np.ndarray] = field(repr=False)  # block -> (C, E)

    def to_json(self) -> dict:
        return {
            "histogram": self.histogram.round(6).tolist(),
            "layers": [{"block": b, "scores": self.scores[b].round(6).tolist(), "chosen_expert": self.chosen[b],
                        "gate_scale": round(self.scales[b], 6)} for b in sorted(self.chosen)],
        }


def select_experts(model: MaskedAutoencoderViT, histogram: np.ndarray) -> Selection:
    """Best expert per MoE layer, and the gate value to fold into it.

    DeepSpeed's top-1 output is gate value x expert(x); a dense MLP has no gate, so the export multiplies the
    chosen expert's output by the mean gate value p(e*|c) over the task's clusters that route to e*
    (all the task's clusters if none does). For a task whose clusters share one gate value this is exact.
    """
    if model.moe_cfg.routing != "cluster":
        raise ValueError(f"task customisation needs a MoCE checkpoint (moe.routing=cluster); this one is "
                         f"'{model.moe_cfg.routing}'.")
    probs = gate_probabilities(model)
    scores, chosen, scales = {}, {}, {}
    for block, p in probs.items():
        s = histogram @ p  # (E,)
        e = int(np.argmax(s))
        routes_to_e = (p.argmax(axis=1) == e) & (histogram > 0)
        weights = histogram * routes_to_e if routes_to_e.any() else histogram
        scores[block], chosen[block] = s, e
        scales[block] = float((weights * p[:, e]).sum() / weights.sum())
    return Selection(histogram, scores, chosen, scales, probs)
