"""Routing policies: the one owner of what ``moe.routing`` means (dense MAE, TokenMoE, MoCE).

Every comparison in this project runs on this axis, so everything that differs between the three lives here,
behind one constructor that rejects unknown names (Tutel's gate registry is the model):

- which encoder blocks get a MoE layer, and the gate a MoE layer builds;
- whether the batch must carry a cluster id per image (rounds, refresh, customisation), and its check;
- the per-step plan (MoCE plans every layer's image routes at once before the first block runs);
- the inference context (eval, dropless, no noise, no random token selection) for refresh, evaluation,
  customisation and the report;
- the gates' start (MoCE: the round's centroids or an LPT packing, optionally frozen);
- the checkpoint signature keys that must match on resume.

``model`` arguments are the MAE (anything with ``moe_layers()``); moe/ sits below model/, so it is not imported.
A fourth routing (hash routing, expert choice) is one new class here with ``@register_policy`` (and its gate).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from moce_ds.config.schema import ClusterConfig, MoEConfig
from moce_ds.moe.gates import ClusterGate, RecordingTokenGate
from moce_ds.moe.inference import inference_routing
from moce_ds.moe.packing import init_cluster_tables
from moce_ds.moe.routing import ImageRoutes

__all__ = ["ROUTING_POLICIES", "RoutingPolicy", "register_policy", "routing_policy"]

ROUTING_POLICIES: dict[str, type[RoutingPolicy]] = {}


def register_policy(cls: type[RoutingPolicy]) -> type[RoutingPolicy]:
    ROUTING_POLICIES[cls.name] = cls
    return cls


class RoutingPolicy:
    """Plain MAE: no MoE layer. Subclasses override what their routing changes."""

    name: ClassVar[str] = ""
    uses_moe: ClassVar[bool] = True  # any MoE layer at all (expert parallelism, MoE optimizer groups)
    needs_clusters: ClassVar[bool] = False  # the batch carries a cluster id per image; rounds matter
    routes_by_image: ClassVar[bool] = False  # a MoE layer takes this step's planned LayerRoutes

    def __init__(self, moe: MoEConfig) -> None:
        self.cfg = moe

    # ---- structure
    def moe_blocks(self, depth: int) -> list[int]:
        """Encoder blocks whose MLP is a MoE: the configured list, or every other block (1, 3, 5, ...)."""
        if not self.uses_moe:
            return []
        ids = list(range(1, depth, 2)) if self.cfg.layers is None else sorted(set(self.cfg.layers))
        bad = [i for i in ids if not 0 <= i < depth]
        if bad:
            raise ValueError(f"moe.layers={self.cfg.layers} names blocks {bad} outside the encoder's 0..{depth - 1}.")
        return ids

    def make_gate(self, width: int) -> nn.Module:
        raise ValueError(f"moe.routing={self.name} has no MoE layers, so no gate.")

    # ---- per step
    def check_clusters(self, cluster: torch.Tensor | None, batch: int) -> torch.Tensor | None:
        """The batch's cluster ids as the layers need them (None when the routing does not use them)."""
        return None

    def check_clusters_deferred(self, cluster: torch.Tensor | None,
                                batch: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """As check_clusters, without a host sync: -> (ids, a 0-dim bool that is set when an id was outside the
        gate's table; those ids are clamped into it). The caller reads the flag and, if set, calls check_clusters
        for the error."""
        return self.check_clusters(cluster, batch), None

    def plan(self, model: nn.Module, cluster: torch.Tensor | None,
             tokens_per_image: int) -> ImageRoutes | None:
        """Every MoE layer's routes for this step, in block order (None: the layers route by themselves)."""
        return None

    # ---- around training
    @contextlib.contextmanager
    def inference(self, model: nn.Module) -> Iterator[nn.Module]:
        """``with policy.inference(model):`` eval, dropless, no noise, no random token selection; restored after."""
        with inference_routing(model):
            yield model

    def init_gates(self, model: nn.Module, centroids: np.ndarray | None, cluster_sizes: list[int] | None,
                   cluster: ClusterConfig, seed: int) -> str:
        """Start the gates before the optimizer is built; returns what was done, for the log."""
        return "none"

    def signature(self) -> dict:
        """What must match for a checkpoint of this routing to resume (model_signature adds the model's size)."""
        m = self.cfg
        return {"moe.routing": m.routing, "moe.num_experts": m.num_experts, "moe.num_clusters": m.num_clusters,
                "moe.layers": m.layers, "moe.top_k": m.top_k}


@register_policy
class DensePolicy(RoutingPolicy):
    name = "dense"
    uses_moe = False


@register_policy
class TokenPolicy(RoutingPolicy):
    """DeepSpeed's own token gate (the TokenMoE baseline)."""

    name = "token"

    def make_gate(self, width: int) -> nn.Module:
        m = self.cfg
        return RecordingTokenGate(width, m.num_experts, m.top_k, m.capacity_factor, m.eval_capacity_factor,
                                  m.min_capacity, None, m.drop_tokens, use_rts=m.use_rts)


@register_policy
class ClusterPolicy(RoutingPolicy):
    """MoCE: every token of an image goes to the expert(s) of the image's cluster, planned once per step."""

    name = "cluster"
    needs_clusters = True
    routes_by_image = True

    def make_gate(self, width: int) -> nn.Module:
        m = self.cfg
        return ClusterGate(m.num_clusters, width, m.num_experts, m.top_k, m.capacity_factor, m.eval_capacity_factor,
                           m.min_capacity, m.drop_tokens, m.gate_noise_std)

    def _check_shape(self, cluster: torch.Tensor | None, batch: int) -> torch.Tensor:
        if cluster is None:
            raise ValueError("moe.routing=cluster needs a cluster id per image; the batch has none.")
        if cluster.shape != (batch,):
            raise ValueError(f"cluster ids must have shape ({batch},), got {tuple(cluster.shape)}.")
        return cluster

    def check_clusters_deferred(self, cluster: torch.Tensor | None,
                                batch: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        cluster, k = self._check_shape(cluster, batch), self.cfg.num_clusters
        return cluster.long().clamp(0, k - 1), ((cluster < 0) | (cluster >= k)).any()

    def check_clusters(self, cluster: torch.Tensor | None, batch: int) -> torch.Tensor | None:
        cluster, k = self._check_shape(cluster, batch), self.cfg.num_clusters
        lo, hi = torch.stack(torch.aminmax(cluster)).tolist()  # one host sync per forward, not two
        if lo < 0 or hi >= k:
            raise ValueError(
                f"cluster id {hi if hi >= k else lo} is outside the gate's table of {k} clusters: set "
                f"moe.num_clusters to the clustering round's k or re-cluster with k={k}."
            )
        return cluster.long()

    def plan(self, model: nn.Module, cluster: torch.Tensor | None,
             tokens_per_image: int) -> ImageRoutes | None:
        """cluster (N,) -> every layer's image routes: one (N, E) logit row per layer, one vectorised top-k +
        capacity pass, and (with expert parallelism) one collective for all layers, before any block runs."""
        gates = [m.gate for _, m in model.moe_layers()]
        logits = torch.stack([g.image_logits(cluster) for g in gates])  # (L_moe, N, E)
        routes = gates[0].plan(logits, tokens_per_image)
        with torch.no_grad():  # for the specialisation statistics: each image's noise-free preferred expert
            for g, layer in zip(gates, routes.layers):
                layer.clusters, layer.num_clusters = cluster, g.num_clusters
                layer.preferred = g.cluster_logits().argmax(1)[cluster]  # (N,)
        return routes

    def init_gates(self, model: nn.Module, centroids: np.ndarray | None, cluster_sizes: list[int] | None,
                   cluster: ClusterConfig, seed: int) -> str:
        how = init_cluster_tables(model, cluster.init_table, centroids, cluster_sizes, cluster.lpt_margin, seed)
        if not self.cfg.gate_trainable:
            for _, moe in model.moe_layers():
                moe.gate.freeze()  # before the optimizer is built: frozen gates get no optimizer state
            how += ", frozen (moe.gate_trainable=false)"
        return how


def routing_policy(moe: MoEConfig) -> RoutingPolicy:
    """The policy of ``moe.routing``; an unknown name is an error that lists the known ones."""
    if moe.routing not in ROUTING_POLICIES:
        raise ValueError(f"moe.routing='{moe.routing}' is not one of {'|'.join(ROUTING_POLICIES)}.")
    return ROUTING_POLICIES[moe.routing](moe)
