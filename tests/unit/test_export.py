import json
import sys
import zipfile

import pytest
import timm
import torch
from safetensors import safe_open
from timm.models import load_checkpoint
from timm.models.vision_transformer import VisionTransformer

from moce_ds.config import load_config
from moce_ds.customize import dense_state_dict, save_dense, timm_kwargs
from moce_ds.customize.export import dense_sidecar, load_dense
from moce_ds.customize.hf_export import hf_unavailable
from moce_ds.evaluation import load_encoder
from moce_ds.model import MaskedAutoencoderViT, get_spec


def _mini_export(tmp_path):
    spec = get_spec("mini")
    model = MaskedAutoencoderViT(spec, load_config([], []).moe)
    state = dense_state_dict(model, {b: 0 for b in model.moe_blocks}, {b: 0.5 for b in model.moe_blocks})
    return state, save_dense(state, tmp_path / "vit_mini_task.safetensors", timm_kwargs(spec, 0)), spec


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "vit_small_patch16_224", "vit_base_patch16_224"])
def test_standard_sizes_load_with_timm_create_model(name, tmp_path):
    spec = get_spec(name)
    model = MaskedAutoencoderViT(spec, load_config([], ["moe.num_experts=2"]).moe)
    chosen = {b: 1 for b in model.moe_blocks}
    state = dense_state_dict(model, chosen, {b: 0.5 for b in chosen}, num_classes=1000)
    path = save_dense(state, tmp_path / f"{name}.safetensors", timm_kwargs(spec, 1000))
    vit = timm.create_model(name, checkpoint_path=str(path))  # strict: no missing or unexpected keys
    b = model.moe_blocks[0]
    expert = model.blocks[b].mlp.deepspeed_moe.experts.deepspeed_experts[1]
    assert torch.equal(vit.blocks[b].mlp.fc1.weight, expert.fc1.weight)
    assert torch.allclose(vit.blocks[b].mlp.fc2.weight, 0.5 * expert.fc2.weight)
    assert torch.equal(vit.pos_embed, model.pos_embed)


def test_export_is_safetensors_with_its_sidecar_and_nothing_else(tmp_path):
    state, path, spec = _mini_export(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vit_mini_task.json", "vit_mini_task.safetensors"]  # no .tmp
    assert not zipfile.is_zipfile(path)  # torch.save writes a zip of pickles; this is a safetensors header + bytes
    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == set(state)
        assert torch.equal(f.get_tensor("pos_embed"), state["pos_embed"])
    assert json.loads(dense_sidecar(path).read_text())["vision_transformer"] == timm_kwargs(spec, 0)


def test_mini_export_loads_strictly_in_a_timm_vision_transformer(tmp_path):
    state, path, spec = _mini_export(tmp_path)
    vit = VisionTransformer(**timm_kwargs(spec, 0))
    load_checkpoint(vit, str(path), strict=True)
    assert all(torch.equal(vit.state_dict()[k], v) for k, v in state.items())
    x = torch.randn(2, 3, spec.img_size, spec.img_size)
    with torch.no_grad():
        assert torch.equal(load_dense(path).eval().forward_features(x), vit.eval().forward_features(x))


def test_an_older_pth_export_still_loads_for_evaluation(tmp_path):
    state, path, spec = _mini_export(tmp_path)
    old = tmp_path / "vit_mini_old.pth"
    torch.save(state, old)
    old.with_name(old.name + ".json").write_text(dense_sidecar(path).read_text())  # the old <name>.pth.json
    x = torch.randn(2, 3, spec.img_size, spec.img_size)
    with torch.no_grad():
        assert torch.equal(load_encoder(old).tokens(x), load_encoder(path).tokens(x))


def test_export_refuses_a_suffix_timm_would_read_as_a_pickle(tmp_path):
    with pytest.raises(ValueError, match="must end in .safetensors"):
        save_dense({}, tmp_path / "vit.pth", {})


def test_export_needs_one_expert_per_moe_block():
    model = MaskedAutoencoderViT(get_spec("mini"), load_config([], []).moe)
    with pytest.raises(ValueError, match="choose one expert for each MoE block"):
        dense_state_dict(model, {1: 0}, {})


def test_without_transformers_the_hf_folder_is_skipped_with_the_reason(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # what `import transformers` sees when it is absent
    assert hf_unavailable().startswith("transformers is not installed")
    assert "pip install 'moce-ds[hf]'" in hf_unavailable()
