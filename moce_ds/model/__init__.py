"""MAE ViT with optional MoE MLPs, and its named sizes."""

from moce_ds.model.build import build_model
from moce_ds.model.mae import MAEOutput, MaskedAutoencoderViT, RoutedBlock, init_local_experts, moe_block_ids
from moce_ds.model.registry import MODEL_SIZES, MAESpec, get_spec, tiny_variant
from moce_ds.model.upcycle import check_dense_state, upcycle_from_dense

__all__ = [
    "MAEOutput", "MaskedAutoencoderViT", "RoutedBlock", "moe_block_ids", "init_local_experts",
    "MODEL_SIZES", "MAESpec", "get_spec", "tiny_variant", "build_model",
    "check_dense_state", "upcycle_from_dense",
]
