"""Cluster -> expert start (issue 4, point 4): pack clusters onto experts by size so expert load starts balanced.

k (clusters) is much larger than E (experts). A random cluster table routes each cluster to an arbitrary expert,
so from step 0 some experts get several big clusters and others almost nothing. Greedy longest-processing-time
(LPT) packing -- biggest cluster first, each onto the currently lightest expert -- bounds the heaviest expert at
4/3 of the optimum; :func:`route_clusters_to_experts` then sets a gate's table and ``wg`` so that cluster c's
logits are ``margin`` for its packed expert and 0 for the others (per-image noise of std 1 rarely flips that
with the default margin 4: P(flip) ~ (E-1) * Phi(-4/sqrt 2)).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from moce_ds.moe.gates import ClusterGate

__all__ = ["expert_images", "init_cluster_tables", "lpt_pack", "route_clusters_to_experts"]

logger = logging.getLogger("moce_ds")


def lpt_pack(sizes: np.ndarray, num_experts: int) -> np.ndarray:
    """Cluster sizes int [k] -> expert int64 [k] per cluster (LPT; ties to the lower cluster / expert id)."""
    sizes = np.asarray(sizes, np.int64)
    load = np.zeros(num_experts, np.int64)
    out = np.empty(sizes.shape[0], np.int64)
    for c in np.argsort(-sizes, kind="stable"):
        e = int(np.argmin(load))  # lightest expert, lowest id on ties
        out[c] = e
        load[e] += sizes[c]
    return out


def expert_images(sizes: np.ndarray, expert_of_cluster: np.ndarray, num_experts: int) -> np.ndarray:
    """Images per expert int64 [E] when cluster c's images all go to expert_of_cluster[c]."""
    return np.bincount(expert_of_cluster, weights=np.asarray(sizes, np.float64), minlength=num_experts).astype(np.int64)


@torch.no_grad()
def route_clusters_to_experts(gate: torch.nn.Module, expert_of_cluster: np.ndarray, margin: float,
                              generator: torch.Generator) -> None:
    """Set ``gate.cluster_table`` [C, d] and ``gate.wg.weight`` [E, d] so argmax_e logits(c) = expert_of_cluster[c].

    wg's rows are ``margin / sqrt(d)`` times orthonormal directions u_e; row c of the table is sqrt(d) times
    (cos a * u_{e(c)} + sin a * r_c) with r_c a random unit vector orthogonal to every u_e: the logits are exactly
    margin * onehot(e(c)), the rows keep the random init's norm (~sqrt d), and clusters packed on the same expert
    still differ (r_c), so the gate can learn to move them apart later.
    """
    table, wg = gate.cluster_table, gate.wg.weight  # [C, d], [E, d]
    num_c, d = table.shape
    num_e = wg.shape[0]
    if num_e > d:
        raise ValueError(f"LPT routing needs num_experts <= gate width, got {num_e} > {d}")
    q, _ = torch.linalg.qr(torch.randn(d, num_e + num_c, generator=generator, dtype=torch.float64))
    u = q[:, :num_e].T  # [E, d] orthonormal expert directions
    r = torch.randn(num_c, d, generator=generator, dtype=torch.float64)
    r = r - (r @ u.T) @ u  # drop the components along the expert directions
    r = r / r.norm(dim=1, keepdim=True).clamp_min(1e-12)
    ang = torch.tensor(0.5)  # rad: mostly the expert direction, some cluster identity
    rows = torch.cos(ang) * u[torch.as_tensor(expert_of_cluster)] + torch.sin(ang) * r  # [C, d]
    scale = (margin / (torch.cos(ang) * d**0.5)).item()
    table.copy_((rows * d**0.5).to(table.dtype))
    wg.copy_((u * scale).to(wg.dtype))


def init_cluster_tables(model: torch.nn.Module, init_table: str, centroids: np.ndarray | None,
                        cluster_sizes: list[int] | None, margin: float = 4.0, seed: int = 0) -> str:
    """Start every cluster gate of ``model`` as ``init_table`` says; returns what was done (for the log).

    ``random``: keep the random table; ``centroids``: copy the round's centroids in when their width matches the
    table (else random); ``lpt``: route each cluster to its LPT-packed expert (needs the round's cluster sizes).
    Deterministic in ``seed``, so every rank builds the same shared gate weights.
    """
    gates = [m.gate for _, m in model.moe_layers() if isinstance(m.gate, ClusterGate)]
    if not gates or init_table == "random":
        return "random"
    if init_table == "centroids":
        if centroids is None:
            return "random"
        t = torch.from_numpy(np.asarray(centroids, np.float32))
        return "centroids" if any([g.init_table_from_centroids(t) for g in gates]) else "random (width differs)"
    if init_table == "lpt":
        if cluster_sizes is None:
            raise ValueError("cluster.init_table=lpt needs a clustering round with cluster sizes")
        sizes = np.asarray(cluster_sizes, np.int64)
        gen = torch.Generator().manual_seed(seed)
        for g in gates:
            packed = lpt_pack(sizes, g.num_experts)
            route_clusters_to_experts(g, packed, margin, gen)
        load = expert_images(sizes, lpt_pack(sizes, gates[0].num_experts), gates[0].num_experts)
        cv = float(load.std() / max(load.mean(), 1e-12))
        logger.info("cluster tables start from an LPT packing: images per expert %s (CV %.3f)", load.tolist(), cv)
        return "lpt"
    raise ValueError(f"unknown cluster.init_table {init_table!r}; one of random|centroids|lpt")
