"""Gates: turn inputs into expert scores and routes.

The token gate is DeepSpeed's own; the cluster gate scores images and leaves routing to
`moce_ds.moe.routing`, which plans every layer of a step at once. Both return DeepSpeed 0.19's "sparse routes" 7-tuple
`(l_aux, capacity, num_experts, indices [k,S] (-1 dropped), locations [k,S], gates [k,S], exp_counts [E])`;
the token gate remembers its last routes (`last_indices`) for load statistics, the cluster gate's are in its
`LayerRoutes`.
"""

from __future__ import annotations

import torch
from deepspeed.moe.sharded_moe import TopKGate
from torch import nn

from moce_ds.moe.routing import ImageRoutes, LayerRoutes, plan_image_routes

__all__ = ["ClusterGate", "RecordingTokenGate"]


class ClusterGate(nn.Module):
    """MoCE's gate: logits = W_g . emb(c) for the cluster c of each token's image.

    All tokens of an image therefore share their expert(s). The logits are computed once per image
    ((B, E), not (S, E)) and repeated over the image's tokens; noise, when on, is drawn per image.
    No parameter name here contains the word "expert": DeepSpeed's checkpointing would file it
    with the expert weights.
    """

    def __init__(
        self,
        num_clusters: int,
        embed_dim: int,
        num_experts: int,
        k: int = 1,
        capacity_factor: float = 1.25,
        eval_capacity_factor: float = 2.0,
        min_capacity: int = 4,
        drop_tokens: bool = True,
        noise_std: float = 0.0,
    ) -> None:
        super().__init__()
        # Random init: an all-equal table would give all-equal logits, and argmax sends everything to expert 0.
        self.cluster_table = nn.Parameter(torch.randn(num_clusters, embed_dim))
        self.wg = nn.Linear(embed_dim, num_experts, bias=False)
        self.num_clusters = num_clusters
        self.num_experts = num_experts
        self.k = k
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = eval_capacity_factor
        self.min_capacity = min_capacity
        self.drop_tokens = drop_tokens
        self.noise_std = noise_std
        self.ep_group: torch.distributed.ProcessGroup | None = None

    def _set_ep_group(self, ep_group: torch.distributed.ProcessGroup) -> None:
        self.ep_group = ep_group

    @torch.no_grad()
    def init_table_from_centroids(self, centroids: torch.Tensor) -> bool:
        """Copy the centroids (C, d) into the table when their shape matches; returns whether it did."""
        if tuple(centroids.shape) != tuple(self.cluster_table.shape):
            return False
        # Centroids are unit-norm features; scale rows to the random init's norm so logits keep their spread.
        scale = self.cluster_table.norm(dim=1, keepdim=True).mean()
        self.cluster_table.copy_(centroids / centroids.norm(dim=1, keepdim=True).clamp_min(1e-6) * scale)
        return True

    def freeze(self) -> None:
        """Keep the table and ``wg`` as they are (no gradient, so no optimizer state): a fixed cluster -> expert map."""
        self.cluster_table.requires_grad_(False)
        self.wg.weight.requires_grad_(False)

    def cluster_logits(self) -> torch.Tensor:
        """(C, E) float32 logits of every cluster, without noise: what the gate prefers for each cluster."""
        return nn.functional.linear(self.cluster_table.float(), self.wg.weight.float())

    def image_logits(self, image_clusters: torch.Tensor) -> torch.Tensor:
        """image_clusters: (B,) int64 -> (B, E) float32 logits, with per-image noise in training."""
        emb = self.cluster_table[image_clusters].float()  # (B, d)
        logits = nn.functional.linear(emb, self.wg.weight.float())  # (B, E)
        if self.training and self.noise_std > 0:
            logits = logits + self.noise_std * torch.randn_like(logits)
        return logits

    def plan(self, logits: torch.Tensor, tokens_per_image: int) -> ImageRoutes:
        """logits (L, B, E) of L layers that share this gate's settings -> their image routes for the step."""
        return plan_image_routes(
            logits, self.k, self.capacity_factor if self.training else self.eval_capacity_factor, self.min_capacity,
            tokens_per_image, self.drop_tokens, self.ep_group,
        )

    def forward(
        self, tokens: torch.Tensor, routes: LayerRoutes, sparse_routes: bool = True, use_tutel: bool = False
    ) -> tuple:
        # tokens: (S, d) with S = B * T; routes: this layer's image routes, planned before the layer ran.
        if not isinstance(routes, LayerRoutes):
            raise ValueError("the cluster gate routes by image: call MoEMlp(x, cluster_ids) or pass the step's "
                             "LayerRoutes (MaskedAutoencoderViT.route_images).")
        if not sparse_routes or use_tutel:
            raise ValueError("ClusterGate only produces DeepSpeed's sparse-routes form, without Tutel.")
        if routes.images * routes.tokens_per_image != tokens.shape[0]:
            raise ValueError(f"routes for {routes.images} images x {routes.tokens_per_image} tokens do not cover "
                             f"{tokens.shape[0]} tokens.")
        return routes.sparse_routes()


class RecordingTokenGate(TopKGate):
    """DeepSpeed's own token gate (the TokenMoE baseline), remembering its last routes for statistics.

    Random token selection and top-2 sampling are switched off in eval(), where DeepSpeed leaves them on.
    """

    def __init__(self, *args, use_rts: bool = False, **kwargs) -> None:
        super().__init__(*args, use_rts=use_rts, **kwargs)
        self._train_use_rts = use_rts
        self.last_indices: torch.Tensor | None = None

    def forward(self, tokens: torch.Tensor, used_token=None, sparse_routes: bool = True, use_tutel: bool = False):
        self.use_rts = self._train_use_rts and self.training
        self.top2_2nd_expert_sampling = self.training
        out = super().forward(tokens, used_token, sparse_routes, use_tutel)
        self.last_indices = out[3].detach()
        return out
