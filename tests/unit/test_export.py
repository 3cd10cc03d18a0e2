import pytest
import timm
import torch

from moce_ds.config import load_config
from moce_ds.customize import dense_state_dict, save_dense, timm_kwargs
from moce_ds.model import MaskedAutoencoderViT, get_spec


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "vit_small_patch16_224", "vit_base_patch16_224"])
def test_standard_sizes_load_with_timm_create_model(name, tmp_path):
    spec = get_spec(name)
    model = MaskedAutoencoderViT(spec, load_config([], ["moe.num_experts=2"]).moe)
    chosen = {b: 1 for b in model.moe_blocks}
    state = dense_state_dict(model, chosen, {b: 0.5 for b in chosen}, num_classes=1000)
    path = save_dense(state, tmp_path / f"{name}.pth", timm_kwargs(spec, 1000))
    vit = timm.create_model(name, checkpoint_path=str(path))  # strict: no missing or unexpected keys
    b = model.moe_blocks[0]
    expert = model.blocks[b].mlp.deepspeed_moe.experts.deepspeed_experts[1]
    assert torch.equal(vit.blocks[b].mlp.fc1.weight, expert.fc1.weight)
    assert torch.allclose(vit.blocks[b].mlp.fc2.weight, 0.5 * expert.fc2.weight)
    assert torch.equal(vit.pos_embed, model.pos_embed)


def test_export_needs_one_expert_per_moe_block():
    model = MaskedAutoencoderViT(get_spec("mini"), load_config([], []).moe)
    with pytest.raises(ValueError, match="choose one expert for each MoE block"):
        dense_state_dict(model, {1: 0}, {})
