"""The one place where DeepSpeed's MoE is subclassed: an MLP-shaped MoE layer for timm blocks.

`MoEMlp` is built with timm's `Mlp` signature so it plugs into `Block(mlp_layer=...)`; its gate is
either MoCE's `ClusterGate` or DeepSpeed's token gate. The engine recognises it as `deepspeed.moe.layer.MoE`.
"""

from __future__ import annotations

import torch
from deepspeed.moe.layer import MoE
from timm.layers import Mlp
from torch import nn

from moce_ds.moe.gates import ClusterGate, RecordingTokenGate

__all__ = ["MoEMlp"]


class MoEMlp(MoE):
    """forward(x (B, T, d), cluster_ids (B, T) | None) -> (B, T, d); keeps `l_aux`, `exp_counts`, `last_tokens`."""

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
        if routing not in ("token", "cluster"):
            raise ValueError(f"MoEMlp routing must be 'token' or 'cluster', got '{routing}'.")
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
        if routing == "cluster":
            gate: nn.Module = ClusterGate(
                num_clusters, in_features, num_experts, top_k, capacity_factor, eval_capacity_factor,
                min_capacity, drop_tokens, gate_noise_std,
            )
        else:
            gate = RecordingTokenGate(
                in_features, num_experts, top_k, capacity_factor, eval_capacity_factor, min_capacity,
                None, drop_tokens, use_rts=use_rts,
            )
        self.deepspeed_moe.gate = gate
        self.l_aux: torch.Tensor | None = None
        self.exp_counts: torch.Tensor | None = None
        self.last_tokens: tuple[int, int] = (0, 0)  # (images, tokens per image) of the last forward

    @property
    def gate(self) -> nn.Module:
        return self.deepspeed_moe.gate

    def forward(self, x: torch.Tensor, cluster_ids: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        route_arg = cluster_ids if self.routing == "cluster" else None
        out, l_aux, exp_counts = super().forward(x, route_arg)
        self.l_aux, self.exp_counts = l_aux, exp_counts
        self.last_tokens = (x.shape[0], x.shape[1])
        return out
