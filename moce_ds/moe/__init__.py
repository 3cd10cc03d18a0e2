"""Mixture-of-experts pieces: gates (cluster, token), the DeepSpeed MoE subclass, load statistics."""

from moce_ds.moe.balance import layer_load
from moce_ds.moe.gates import ClusterGate, RecordingTokenGate, deepspeed_topk_routes
from moce_ds.moe.layer import MoEMlp

__all__ = ["ClusterGate", "RecordingTokenGate", "deepspeed_topk_routes", "MoEMlp", "layer_load"]
