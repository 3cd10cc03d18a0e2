import dataclasses

import pytest
import torch

from moce_ds.config import load_config
from moce_ds.customize import dense_state_dict, save_dense, timm_kwargs
from moce_ds.customize.export import load_dense
from moce_ds.customize.hf_export import hf_vit_config, save_hf_folder
from moce_ds.model import MaskedAutoencoderViT, get_spec, tiny_variant

transformers = pytest.importorskip("transformers", reason="the Hugging Face export needs pip install 'moce-ds[hf]'")

GEOMETRIES = {
    "mini": get_spec("mini"),  # 32 px, patch 4, dim 128, depth 6, 4 heads
    "tiny_224_16": dataclasses.replace(tiny_variant(get_spec("vit_base_patch16_224")), embed_dim=64, num_heads=4),
}


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_hf_folder_loads_in_vitmodel_with_the_timm_exports_features(geometry, tmp_path):
    spec = GEOMETRIES[geometry]
    torch.manual_seed(0)
    model = MaskedAutoencoderViT(spec, load_config([], []).moe)
    with torch.no_grad():  # MAE's init leaves biases and norms at 0 / 1: randomise so every mapped tensor matters
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    state = dense_state_dict(model, {b: 1 for b in model.moe_blocks}, {b: 0.7 for b in model.moe_blocks})
    kwargs = timm_kwargs(spec, 0)
    vit = load_dense(save_dense(state, tmp_path / "vit.safetensors", kwargs)).eval()
    folder = save_hf_folder(state, kwargs, tmp_path / "hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "vit.json", "vit.safetensors"]  # no hf.tmp left

    hf, info = transformers.ViTModel.from_pretrained(folder, add_pooling_layer=False, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert hf.config.layer_norm_eps == 1e-6 and hf.config.intermediate_size == 4 * spec.embed_dim
    x = torch.randn(2, 3, spec.img_size, spec.img_size)
    with torch.no_grad():
        ours, theirs = vit.forward_features(x), hf.eval()(pixel_values=x).last_hidden_state  # (2, 1+L, D) each
    assert ours.shape == theirs.shape == (2, 1 + (spec.img_size // spec.patch_size) ** 2, spec.embed_dim)
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_hf_config_refuses_an_architecture_it_cannot_express():
    kwargs = dict(timm_kwargs(get_spec("mini"), 0), pre_norm=True)
    with pytest.raises(ValueError, match="no Hugging Face ViT"):
        hf_vit_config(kwargs)
