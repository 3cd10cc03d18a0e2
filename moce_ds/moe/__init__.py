"""Mixture-of-experts pieces: gates (cluster, token), image-level routing, the DeepSpeed MoE subclass, load stats."""

from moce_ds.moe.balance import layer_load
from moce_ds.moe.gates import ClusterGate, RecordingTokenGate
from moce_ds.moe.inference import inference_routing
from moce_ds.moe.layer import MoEMlp, PackedExperts
from moce_ds.moe.routing import ImageRoutes, LayerRoutes, image_capacity, plan_image_routes

__all__ = ["ClusterGate", "RecordingTokenGate", "MoEMlp", "PackedExperts", "layer_load", "ImageRoutes",
           "LayerRoutes", "image_capacity", "plan_image_routes", "inference_routing"]
