"""Task -> cluster histogram -> per-layer expert scores -> chosen expert per MoE layer (DESIGN.md §1.6).

q(c): share of the task's images whose nearest centroid is c.
s_e = sum_c q(c) * p(e | c), with p the gate's softmax over experts for cluster c (eval: no noise).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from moce_ds.model import MaskedAutoencoderViT

__all__ = ["Selection", "cluster_histogram", "gate_probabilities", "select_experts"]


def cluster_histogram(ids: np.ndarray, num_clusters: int) -> np.ndarray:
    """cluster ids int [N] (each image's nearest centroid) -> q (C,) float64 summing to 1."""
    if len(ids) == 0:
        raise ValueError("the task has no readable images, so it has no cluster histogram.")
    return np.bincount(np.asarray(ids, np.int64), minlength=num_clusters).astype(np.float64) / len(ids)


@torch.no_grad()
def gate_probabilities(model: MaskedAutoencoderViT) -> dict[int, np.ndarray]:
    """{block: p (C, E)}: each MoE layer's softmax over experts for every cluster, without noise."""
    return {block: torch.softmax(moe.gate.cluster_logits(), dim=-1).double().numpy()
            for block, moe in model.moe_layers()}


def combine_weights(p: np.ndarray, top_k: int) -> np.ndarray:
    """p (C, E) gate softmax -> (C, E) the weight each expert gets in the layer's output for each cluster.

    Top-1 (DeepSpeed's top1gating): the chosen expert's probability, not renormalised. Top-k: the k largest
    probabilities renormalised to sum to 1 (top2gating / topkgating), 0 elsewhere.
    """
    if top_k == 1:
        return np.where(np.arange(p.shape[1]) == p.argmax(1)[:, None], p, 0.0)
    top = np.argsort(-p, axis=1)[:, :top_k]
    w = np.zeros_like(p)
    np.put_along_axis(w, top, np.take_along_axis(p, top, 1), 1)
    return w / w.sum(1, keepdims=True)


def path_mass(probs: list[np.ndarray], histogram: np.ndarray, path: tuple[int, ...]) -> float:
    """sum_c q(c) prod_l p_l(e_l | c): the share of the task's routing mass that follows ``path``."""
    prod = np.ones_like(histogram)
    for p, e in zip(probs, path):
        prod = prod * p[:, e]
    return float(histogram @ prod)


def best_path(probs: list[np.ndarray], histogram: np.ndarray,
              max_nodes: int = 2_000_000) -> tuple[tuple[int, ...], float, bool]:
    """The expert tuple (one per MoE layer) with the largest routing mass; returns (path, mass, exact).

    Branch and bound: a partial path's mass over its first layers bounds every completion (probabilities are
    at most 1), so subtrees that cannot beat the best complete path are pruned. The search starts from the
    best of the task's own clusters' top-1 paths. Past ``max_nodes`` visited nodes (near-uniform gates over
    many layers) it returns the best path found, with ``exact=False``.
    """
    active = histogram > 0
    q = histogram[active]
    ps = [p[active] for p in probs]  # (C_task, E) per layer
    candidates = {tuple(int(p[c].argmax()) for p in ps) for c in range(len(q))}
    best = max(candidates, key=lambda t: path_mass(ps, q, t))
    best_mass = path_mass(ps, q, best)
    nodes, exact = 0, True

    def visit(depth: int, weight: np.ndarray, prefix: tuple[int, ...]) -> None:
        # weight (C_task,): q(c) * prod over the prefix's layers of p_l(e_l | c)
        nonlocal best, best_mass, nodes, exact
        if depth == len(ps):
            mass = float(weight.sum())
            if mass > best_mass:
                best, best_mass = prefix, mass
            return
        children = weight[:, None] * ps[depth]  # (C_task, E)
        bounds = children.sum(0)
        for e in np.argsort(-bounds):
            if bounds[e] <= best_mass:
                break  # sorted: no later child can beat the best either
            nodes += 1
            if nodes > max_nodes:
                exact = False
                return
            visit(depth + 1, children[:, e], (*prefix, int(e)))

    visit(0, q.astype(np.float64), ())
    return best, best_mass, exact


RULES = ("path", "per_layer", "merge")


@dataclass
class Selection:
    rule: str  # path | per_layer | merge
    histogram: np.ndarray  # (C,) q(c)
    scores: dict[int, np.ndarray]  # block -> (E,) per-layer s_e = sum_c q(c) p(e|c)
    chosen: dict[int, int]  # block -> the exported expert (merge: the heaviest of the mix)
    scales: dict[int, float]  # block -> gate value folded into the exported MLP
    mix: dict[int, dict[int, float]]  # block -> {expert: weight} averaged into the export ({e: 1.0} unless merge)
    coverage: float  # share of the task's images whose route (top-1 expert of their cluster) is the export's in
    #                  every MoE layer
    mass: float  # sum_c q(c) prod_l p_l(chosen_l | c)
    gate_deviation: float  # over covered images: mean of max_l |their combine weight - folded scale|
    dominant_cluster: int | None  # the covered cluster with the most task images (its gate values are folded)
    exact_search: bool  # path rule: the routing-mass maximum is exact (branch and bound finished)
    probabilities: dict[int, np.ndarray] = field(repr=False)  # block -> (C, E)

    def to_json(self) -> dict:
        return {
            "rule": self.rule,
            "coverage": round(self.coverage, 6),
            "routing_mass": round(self.mass, 6),
            "gate_deviation": round(self.gate_deviation, 6),
            "dominant_cluster": self.dominant_cluster,
            "exact_search": self.exact_search,
            "histogram": self.histogram.round(6).tolist(),
            "layers": [{"block": b, "scores": self.scores[b].round(6).tolist(), "chosen_expert": self.chosen[b],
                        "gate_scale": round(self.scales[b], 6),
                        "mix": {str(e): round(w, 6) for e, w in self.mix[b].items()}} for b in sorted(self.chosen)],
        }


def select_experts(model: MaskedAutoencoderViT, histogram: np.ndarray, rule: str = "path") -> Selection:
    """The experts of a dense export for a task with cluster histogram ``histogram``, and the gate values to fold.

    - ``path`` (default): the expert tuple over all MoE layers with the largest routing mass, so the export
      follows a route the task's images really take; the folded gate values are those of the dominant covered
      cluster, so for its images the export is exact.
    - ``per_layer``: the best expert of each layer on its own (argmax s_e); it can build a path no image takes.
    - ``merge``: each layer's experts averaged with weights s_e (the task's routing mass per expert).

    DeepSpeed's output is gate value x expert(x); a dense MLP has no gate, so the export multiplies the expert's
    output by a folded gate value.
    """
    if not model.policy.needs_clusters:
        raise ValueError(f"task customisation needs a MoCE checkpoint (moe.routing=cluster); this one is "
                         f"'{model.moe_cfg.routing}'.")
    if rule not in RULES:
        raise ValueError(f"selection rule '{rule}' is unknown; choose one of {', '.join(RULES)}.")
    top_k = model.moe_cfg.top_k
    probs = gate_probabilities(model)
    blocks = sorted(probs)
    plist = [probs[b] for b in blocks]
    weights = {b: combine_weights(probs[b], top_k) for b in blocks}  # (C, E) each
    scores = {b: histogram @ probs[b] for b in blocks}
    exact = True
    if rule == "path":
        path, _, exact = best_path(plist, histogram)
    else:
        path = tuple(int(np.argmax(scores[b])) for b in blocks)
    chosen = dict(zip(blocks, path))
    routes = np.stack([probs[b].argmax(1) for b in blocks], 1)  # (C, L) each cluster's top-1 path
    covered = (routes == np.asarray(path)[None]).all(1) & (histogram > 0)  # (C,)
    coverage = float(histogram[covered].sum())
    dominant = int(np.argmax(np.where(covered, histogram, -1))) if covered.any() else None
    scales = {}
    for b in blocks:
        e = chosen[b]
        if rule == "path" and dominant is not None:
            scales[b] = float(weights[b][dominant, e])  # exact for the dominant cluster's images
        else:  # the mean gate value over the task's clusters that route to e here (all of them if none does)
            w = histogram * ((probs[b].argmax(1) == e) & (histogram > 0))
            if rule == "merge" or not w.any():
                w = histogram
            top = weights[b][np.arange(len(histogram)), probs[b].argmax(1)] if rule == "merge" else weights[b][:, e]
            scales[b] = float((w * top).sum() / w.sum())
    if rule == "merge":
        mix = {b: {e: float(v) for e, v in enumerate(scores[b] / scores[b].sum()) if v > 0} for b in blocks}
    else:
        mix = {b: {chosen[b]: 1.0} for b in blocks}
    if covered.any():
        dev = np.stack([np.abs(weights[b][:, chosen[b]] - scales[b]) for b in blocks], 1).max(1)  # (C,)
        deviation = float((histogram * dev)[covered].sum() / coverage)
    else:
        deviation = float("nan")
    return Selection(rule, histogram, scores, chosen, scales, mix, coverage, path_mass(plist, histogram, path),
                     deviation, dominant, exact, probs)
