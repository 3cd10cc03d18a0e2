"""Gates: turn inputs into expert scores, then let DeepSpeed's own top-k gating build the routes.

Both gates return DeepSpeed 0.19's "sparse routes" 7-tuple
`(l_aux, capacity, num_experts, indices [k,S] (-1 dropped), locations [k,S], gates [k,S], exp_counts [E])`
and remember the last routes (`last_indices`) for load statistics.
"""

from __future__ import annotations

import torch
from deepspeed.moe.sharded_moe import TopKGate, top1gating, top2gating, topkgating
from torch import nn

__all__ = ["ClusterGate", "RecordingTokenGate", "deepspeed_topk_routes"]


def deepspeed_topk_routes(
    logits: torch.Tensor,
    k: int,
    capacity_factor: float,
    min_capacity: int,
    drop_tokens: bool,
    ep_group: torch.distributed.ProcessGroup | None,
    use_tutel: bool = False,
) -> tuple:
    """logits: (S, E) float32 -> DeepSpeed's sparse-routes tuple, without any randomness of DeepSpeed's own.

    Random token selection and top-2 second-expert sampling are off: the cluster gate's only noise is its
    per-image noise, and both DeepSpeed options would otherwise stay on in eval().
    """
    if k == 1:
        return top1gating(logits, capacity_factor, min_capacity, None, None, drop_tokens, False, ep_group, True,
                          use_tutel)
    if k == 2:
        return top2gating(logits, capacity_factor, min_capacity, drop_tokens, ep_group, False, True)
    return topkgating(logits, k, capacity_factor, min_capacity, drop_tokens, ep_group, "probs", True)


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
        self.last_indices: torch.Tensor | None = None

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

    def image_logits(self, image_clusters: torch.Tensor) -> torch.Tensor:
        """image_clusters: (B,) int64 -> (B, E) float32 logits, with per-image noise in training."""
        emb = self.cluster_table[image_clusters].float()  # (B, d)
        logits = nn.functional.linear(emb, self.wg.weight.float())  # (B, E)
        if self.training and self.noise_std > 0:
            logits = logits + self.noise_std * torch.randn_like(logits)
        return logits

    def forward(
        self, tokens: torch.Tensor, cluster_ids: torch.Tensor, sparse_routes: bool = True, use_tutel: bool = False
    ) -> tuple:
        # tokens: (S, d) with S = B * T; cluster_ids: (B, T), constant along T.
        if cluster_ids is None:
            raise ValueError("the cluster gate needs the cluster id of every token: call MoE.forward(x, cluster_ids).")
        if not sparse_routes:
            raise ValueError("ClusterGate only produces DeepSpeed's sparse-routes form (DeepSpeed >= 0.19).")
        batch, seq = cluster_ids.shape
        if batch * seq != tokens.shape[0]:
            raise ValueError(f"cluster_ids {tuple(cluster_ids.shape)} do not cover {tokens.shape[0]} tokens.")
        logits = self.image_logits(cluster_ids[:, 0]).repeat_interleave(seq, dim=0)  # (S, E)
        capacity_factor = self.capacity_factor if self.training else self.eval_capacity_factor
        out = deepspeed_topk_routes(
            logits, self.k, capacity_factor, self.min_capacity, self.drop_tokens, self.ep_group, use_tutel
        )
        self.last_indices = out[3].detach()
        return out


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
