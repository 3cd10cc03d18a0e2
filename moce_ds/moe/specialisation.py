"""How specialised a MoE layer's experts are on the images' clusters (issue: experts that specialise).

From one logging interval's first-choice routes of a cluster-routed layer:

- **route purity**: the share of routes that go to their cluster's preferred expert (the noise-free argmax of
  the gate's p(e|c)); 1.0 when noise never overrides the gate, about 1/E for routes drawn uniformly.
- **cluster-expert NMI**: the mutual information between an image's cluster and its expert, normalised by the
  expert entropy, I(C; E) / H(E) (the uncertainty coefficient): 1.0 when the cluster determines the expert
  (however many clusters share one), 0 when they are independent. Normalising by H(E) rather than by a mean of
  H(C) and H(E) keeps a deterministic many-clusters-to-one-expert gate at 1.0, since k >> E is the normal case.
"""

from __future__ import annotations

import numpy as np

__all__ = ["specialisation"]


def specialisation(joint: np.ndarray, preferred_routes: float) -> dict[str, float]:
    """joint (C, E) route counts (cluster x expert), ``preferred_routes`` the routes to their cluster's preferred
    expert -> {"route_purity", "cluster_expert_nmi"} (NaN when there were no routes)."""
    joint = np.asarray(joint, np.float64)
    total = joint.sum()
    if total <= 0:
        return {"route_purity": float("nan"), "cluster_expert_nmi": float("nan")}
    p = joint / total
    pc, pe = p.sum(1, keepdims=True), p.sum(0, keepdims=True)  # (C, 1), (1, E)
    nz = p > 0
    mi = float((p[nz] * np.log(p[nz] / (pc @ pe)[nz])).sum())
    h_e = float(-(pe[pe > 0] * np.log(pe[pe > 0])).sum())
    nmi = mi / h_e if h_e > 0 else 1.0  # one expert only: the cluster trivially determines it
    return {"route_purity": float(preferred_routes / total), "cluster_expert_nmi": float(min(max(nmi, 0.0), 1.0))}
