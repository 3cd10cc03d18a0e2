"""The one place where DeepSpeed's MoE is subclassed: an MLP-shaped MoE layer for timm blocks.

`MoEMlp` is built with timm's `Mlp` signature so it plugs into `Block(mlp_layer=...)`; its gate is
either MoCE's `ClusterGate` or DeepSpeed's token gate. The engine recognises it as `deepspeed.moe.layer.MoE`.
With cluster routing the layer knows, before dispatch, how many rows of every expert buffer are filled
(`LayerRoutes.filled_images`), and `PackedExperts` runs each expert on those rows only: the capacity
factor's padding costs no expert compute.
"""

from __future__ import annotations

import torch
from deepspeed.moe.experts import Experts
from deepspeed.moe.layer import MoE
from timm.layers import Mlp
from torch import nn

from moce_ds.config.schema import MoEConfig
from moce_ds.moe.balance import layer_load
from moce_ds.moe.policies import ROUTING_POLICIES
from moce_ds.moe.routing import LayerRoutes

__all__ = ["MoEMlp", "PackedExperts"]


class PackedExperts(Experts):
    """DeepSpeed's `Experts` (same parameters and names), computing only the filled rows of each buffer.

    `filled` (rows per [source ep rank][local expert]) is set by the layer before each forward and used once;
    without it the forward is DeepSpeed's own (every row, padding included).
    """

    def __init__(self, expert: nn.Module, num_local_experts: int, expert_group_name: str | None) -> None:
        super().__init__(expert, num_local_experts, expert_group_name)
        self.filled: list[list[int]] | None = None

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        # inputs: (ep, local_E, C, d) after the all-to-all; rows [0, filled[r][j]) of (r, j) hold tokens.
        filled, self.filled = self.filled, None
        if filled is None:
            return super().forward(inputs)
        ep, local, cap, d = inputs.shape
        # One split into (filled, padding) pieces and one cat back: both are views or a single copy, and their
        # backward is the same. Slice assignment into a zero buffer instead would copy the whole buffer's
        # gradient once per expert in backward.
        sizes = [n for r in range(ep) for j in range(local) for n in (filled[r][j], cap - filled[r][j])]
        pieces = inputs.reshape(-1, d).split(sizes)
        per_rank: list[list[torch.Tensor]] = [[] for _ in range(ep)]  # [r][j] expert output rows
        for j, expert in enumerate(self.deepspeed_experts):
            rows = [pieces[2 * (r * local + j)] for r in range(ep)]
            y = expert(rows[0] if ep == 1 else torch.cat(rows))  # run even on 0 rows: every parameter gets a grad
            for r, part in enumerate(y.split([filled[r][j] for r in range(ep)])):
                per_rank[r].append(part)
        out = []
        for r in range(ep):
            for j in range(local):
                out += [per_rank[r][j], inputs.new_zeros(cap - filled[r][j], d)]  # padding is never read back
        return torch.cat(out).view(ep, local, cap, d)


class MoEMlp(MoE):
    """forward(x (B, T, d), routes) -> (B, T, d); keeps `l_aux`, `exp_counts` and `last_load` of the last forward."""

    def __init__(
        self,
        in_features: int,
        hidden_features: int,
        *,
        routing: str,
        num_experts: int,
        ep_size: int,
        top_k: int,
        num_clusters: int,
        capacity_factor: float,
        eval_capacity_factor: float,
        min_capacity: int,
        drop_tokens: bool,
        gate_noise_std: float,
        use_rts: bool,
        act_layer: type[nn.Module] = nn.GELU,
        bias: bool = True,
        drop: float = 0.0,
        **_: object,  # timm passes norm_layer/device/dtype; an MoE MLP uses none of them
    ) -> None:
        policy_cls = ROUTING_POLICIES.get(routing)
        if policy_cls is None or not policy_cls.uses_moe:
            moe_routings = [n for n, c in ROUTING_POLICIES.items() if c.uses_moe]
            raise ValueError(f"MoEMlp routing must be one of {moe_routings}, got '{routing}'.")
        expert = Mlp(in_features, hidden_features, act_layer=act_layer, bias=bias, drop=drop)
        super().__init__(
            hidden_size=in_features,
            expert=expert,
            num_experts=num_experts,
            ep_size=ep_size,
            k=top_k,
            capacity_factor=capacity_factor,
            eval_capacity_factor=eval_capacity_factor,
            min_capacity=min_capacity,
            drop_tokens=drop_tokens,
            use_rts=use_rts,
        )
        self.routing = routing
        self.routes_by_image = policy_cls.routes_by_image
        settings = MoEConfig(routing=routing, num_experts=num_experts, top_k=top_k, num_clusters=num_clusters,
                             capacity_factor=capacity_factor, eval_capacity_factor=eval_capacity_factor,
                             min_capacity=min_capacity, drop_tokens=drop_tokens, gate_noise_std=gate_noise_std,
                             use_rts=use_rts)
        self.deepspeed_moe.gate = policy_cls(settings).make_gate(in_features)
        # Same parameter names and expert-group tags as DeepSpeed's Experts, so checkpoints and ZeRO see no change.
        self.deepspeed_moe.experts = PackedExperts(expert, self.num_local_experts, self.expert_group_name)
        self.l_aux: torch.Tensor | None = None
        self.exp_counts: torch.Tensor | None = None
        self.last_load: dict[str, torch.Tensor] | None = None  # (E,) float64 per stat, this rank, last forward

    @property
    def gate(self) -> nn.Module:
        return self.deepspeed_moe.gate

    def forward(self, x: torch.Tensor, routes: LayerRoutes | torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        """x: (B, T, d); routes: this layer's planned `LayerRoutes`, or cluster ids (B,) / (B, T) to plan alone."""
        if self.routes_by_image:
            if not isinstance(routes, LayerRoutes):
                routes = self.plan_alone(routes, x.shape[1])
            self.deepspeed_moe.experts.filled = [[n * routes.tokens_per_image for n in row]
                                                 for row in routes.filled_images]
            out, l_aux, exp_counts = super().forward(x, routes)
            self.last_load = routes.load()  # counts: no graph to detach from
        else:
            out, l_aux, exp_counts = super().forward(x, None)
            self.last_load = layer_load(self.gate.last_indices, exp_counts, x.shape[0], x.shape[1],
                                        self.num_experts)
        self.l_aux, self.exp_counts = l_aux, exp_counts
        return out

    def plan_alone(self, cluster_ids: torch.Tensor | None, tokens_per_image: int) -> LayerRoutes:
        """Routes of this layer by itself (a model plans all its layers at once instead)."""
        if cluster_ids is None:
            raise ValueError("the cluster gate needs the cluster id of every image: call MoEMlp(x, cluster_ids).")
        image_clusters = cluster_ids[:, 0] if cluster_ids.dim() == 2 else cluster_ids  # (B,)
        return self.gate.plan(self.gate.image_logits(image_clusters)[None], tokens_per_image).layer(0)
