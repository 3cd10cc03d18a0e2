"""Sparse upcycling: a MoE MAE started from a dense MAE (ours, the official MAE layout, timm) computes what it does."""

from __future__ import annotations

import dataclasses

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer

from moce_ds.checkpoints.dense_weights import read_dense_mae
from moce_ds.config import ConfigError, load_config
from moce_ds.model import MODEL_SIZES, MaskedAutoencoderViT, build_model, get_spec, tiny_variant, upcycle_from_dense

MINI = get_spec("mini")
DECODER = ("decoder_", "mask_token")


def _dense(spec=MINI, seed: int = 3) -> MaskedAutoencoderViT:
    cfg = load_config([], ["moe.routing=dense", f"train.seed={seed}"])
    model = build_model(cfg, spec=spec).eval()
    with torch.no_grad():  # LayerNorms and biases away from their 1/0 init, so copying them is really tested
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def _moe(*overrides: str, spec=MINI, ep_size: int = 1, ep_rank: int = 0) -> MaskedAutoencoderViT:
    cfg = load_config([], ["moe.num_experts=4", "moe.num_clusters=8", "moe.top_k=2", "moe.drop_tokens=false",
                           *overrides])
    return build_model(cfg, ep_size, ep_rank, spec=spec)


def _timm_vit(dense: MaskedAutoencoderViT) -> VisionTransformer:
    """timm's ViT holding the dense encoder (with a 10-class head, as timm files carry one)."""
    s = dense.spec
    vit = VisionTransformer(img_size=s.img_size, patch_size=s.patch_size, embed_dim=s.embed_dim, depth=s.depth,
                            num_heads=s.num_heads, mlp_ratio=s.mlp_ratio, qkv_bias=True, num_classes=10)
    encoder = {k: v for k, v in dense.state_dict().items() if not k.startswith(DECODER)}
    missing, unexpected = vit.load_state_dict(encoder, strict=False)
    assert set(missing) == {"head.weight", "head.bias"} and not unexpected
    return vit.eval()


def _write(dense: MaskedAutoencoderViT, layout: str, tmp_path):
    sd = dense.state_dict()  # pos_embed [1, 1+L, D] included, as in MAE's files
    if layout == "mae":
        torch.save({"model": sd}, tmp_path / "mae_visualize.pth")
        return tmp_path / "mae_visualize.pth"
    if layout == "mae_encoder":  # the released mae_pretrain_vit_*.pth: no decoder, no mask_token
        torch.save({"model": {k: v for k, v in sd.items() if not k.startswith(DECODER)}}, tmp_path / "mae_pre.pth")
        return tmp_path / "mae_pre.pth"
    vit_sd = _timm_vit(dense).state_dict()
    if layout == "timm_pth":
        torch.save({"state_dict": vit_sd}, tmp_path / "vit.pth")
        return tmp_path / "vit.pth"
    save_file({k: v.contiguous() for k, v in vit_sd.items()}, tmp_path / "vit.safetensors")
    return tmp_path / "vit.safetensors"


def _loss(model, imgs, cluster=None):
    torch.manual_seed(11)  # the same mask for both models
    with torch.no_grad():
        return model(imgs, cluster)


@pytest.mark.parametrize(("layout", "routing"), [("mae", "cluster"), ("mae_encoder", "cluster"),
                                                 ("timm_pth", "cluster"), ("timm_safetensors", "cluster"),
                                                 ("mae", "token")])  # TokenMoE: DeepSpeed's top-2 renormalises too
def test_upcycled_top2_dropless_model_computes_the_dense_mae(layout, routing, tmp_path):
    dense = _dense()
    weights = read_dense_mae(_write(dense, layout, tmp_path), MINI)
    assert weights.layout == layout.split("_")[0] and weights.has_decoder == (layout == "mae")
    model = _moe(f"moe.routing={routing}")
    upcycle_from_dense(model, weights.state, 0.0, seed=0, ep_rank=0)
    model.eval()
    imgs, cluster = torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 3, 5, 7])
    with torch.no_grad():
        feats = model.forward_features(imgs, cluster)
        assert (feats - dense.forward_features(imgs)).abs().max() < 1e-5
        if layout.startswith("timm"):  # and what timm itself computes from that file
            assert (feats - _timm_vit(dense).forward_features(imgs)).abs().max() < 1e-5
    if weights.has_decoder:
        out, ref = _loss(model, imgs, cluster), _loss(dense, imgs)
        assert abs(out.recon_loss.item() - ref.loss.item()) < 1e-5
        assert (out.pred - ref.pred).abs().max() < 1e-5
        assert out.aux_loss.item() > 0  # the balance loss is still there, on top
    else:  # the decoder starts as built, not from the file
        assert torch.equal(model.decoder_pred.weight, _moe(f"moe.routing={routing}").decoder_pred.weight)


def test_top1_is_not_equal_to_dense_the_gate_value_scales_the_expert():
    dense = _dense()
    model = _moe("moe.top_k=1")
    upcycle_from_dense(model, dense.state_dict())
    imgs, cluster = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    gap = (_loss(model.eval(), imgs, cluster).recon_loss - _loss(dense, imgs).loss).abs().item()
    assert gap > 1e-4  # p(e|c) < 1 multiplies each MoE block's MLP output


@pytest.mark.parametrize("size", list(MODEL_SIZES))
def test_every_expert_of_every_moe_block_is_the_dense_mlp_and_gates_are_untouched(size):
    spec = tiny_variant(get_spec(size))
    dense = _dense(spec)
    model = _moe("moe.layers=[0,1,3]", spec=spec)
    gates_before = {k: v.clone() for k, v in model.state_dict().items() if ".gate." in k}
    upcycle_from_dense(model, dense.state_dict(), 0.0)
    ref = dense.state_dict()
    for block, moe in model.moe_layers():
        for expert in moe.deepspeed_moe.experts.deepspeed_experts:
            for name, p in expert.named_parameters():
                assert torch.equal(p, ref[f"blocks.{block}.mlp.{name}"]), (size, block, name)
    state = model.state_dict()
    for k, v in state.items():
        if ".gate." in k:
            assert torch.equal(v, gates_before[k]), k
        elif ".mlp.deepspeed_moe." not in k:
            assert torch.equal(v, ref[k]), k
    assert len(model.moe_layers()) == 3 and gates_before


def test_a_dense_model_upcycled_is_the_dense_model():
    dense = _dense()
    model = build_model(load_config([], ["moe.routing=dense"]))
    upcycle_from_dense(model, dense.state_dict())
    assert all(torch.equal(v, dense.state_dict()[k]) for k, v in model.state_dict().items())


def test_noise_makes_experts_differ_is_deterministic_and_independent_of_ep_size():
    dense = _dense().state_dict()
    runs = []
    for _ in range(2):
        model = _moe()
        upcycle_from_dense(model, dense, noise_std=0.1, seed=5)
        runs.append(model.state_dict())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])  # same seed: same experts
    experts = runs[0]
    w = dense["blocks.1.mlp.fc1.weight"]
    copies = [experts[f"blocks.1.mlp.deepspeed_moe.experts.deepspeed_experts.{e}.fc1.weight"] for e in range(4)]
    rel = [((c - w).std() / w.std()).item() for c in copies]
    assert all(0.09 < r < 0.11 for r in rel), rel  # std 0.1 x the dense weight's std
    assert not torch.equal(copies[0], copies[1])  # each expert its own draw
    assert torch.equal(experts["blocks.1.mlp.deepspeed_moe.experts.deepspeed_experts.2.fc1.bias"],
                       dense["blocks.1.mlp.fc1.bias"])  # biases are copied exactly
    other_seed = _moe()
    upcycle_from_dense(other_seed, dense, noise_std=0.1, seed=6)
    assert not torch.equal(other_seed.state_dict()[
        "blocks.1.mlp.deepspeed_moe.experts.deepspeed_experts.0.fc1.weight"], copies[0])
    # ep_size=2, rank 1 holds global experts 2 and 3: the same draws as ep_size=1's
    half = _moe("moe.ep_size=2", ep_size=2, ep_rank=1)
    upcycle_from_dense(half, dense, noise_std=0.1, seed=5, ep_rank=1)
    for j in range(2):
        key = f"blocks.5.mlp.deepspeed_moe.experts.deepspeed_experts.{j}.fc2.weight"
        assert torch.equal(half.state_dict()[key], experts[key.replace(f".{j}.fc2", f".{j + 2}.fc2")])


def _fails(path, spec=MINI) -> str:
    with pytest.raises(ValueError) as e:
        read_dense_mae(path, spec)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"model.init_from={path}")
    return msg


def test_bad_files_are_refused_with_one_line_naming_the_mismatch_and_the_fix(tmp_path):
    mini_file = _write(_dense(), "mae", tmp_path)
    msg = _fails(mini_file, get_spec("vit_tiny_patch16_224"))
    assert "another size" in msg and "pos_embed [1, 65, 128] vs [1, 197, 192]" in msg
    assert msg.endswith("set model.size=mini.")

    patch8 = dataclasses.replace(MINI, patch_size=8)  # no named size has it
    torch.save({"model": _dense(patch8).state_dict()}, tmp_path / "p8.pth")
    msg = _fails(tmp_path / "p8.pth")
    assert "patch 8" in msg and "no model.size has that geometry" in msg

    save_file(timm.create_model("test_resnet").state_dict(), tmp_path / "resnet.safetensors")
    msg = _fails(tmp_path / "resnet.safetensors")
    assert "is not a ViT (no patch_embed.proj.weight" in msg and "its keys start ['bn1.bias'" in msg
    vit_ls = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=128, depth=6,
                               num_heads=4, init_values=1e-5)  # layer scale: a ViT, but not our block
    torch.save(vit_ls.state_dict(), tmp_path / "vit_ls.pth")
    msg = _fails(tmp_path / "vit_ls.pth")
    assert "is not a ViT MAE of our architecture (unexpected ['blocks.0.ls1.gamma'" in msg

    half_decoder = {k: v for k, v in _dense().state_dict().items() if not k.startswith("decoder_blocks")}
    torch.save({"model": half_decoder}, tmp_path / "half.pth")
    assert "missing ['decoder_blocks.0.norm1.weight'" in _fails(tmp_path / "half.pth")

    torch.save({"model": {"x": 1}, "args": object()}, tmp_path / "pickled.pth")  # needs weights_only=False
    assert "cannot be read as a weights file with torch.load(weights_only=True)" in _fails(tmp_path / "pickled.pth")

    assert _fails(tmp_path / "nothing.pth").endswith("does not exist: pass a dense MAE (one of our dense runs, "
                                                     "the official MAE .pth or a timm ViT .pth/.safetensors).")
    (tmp_path / "empty_run").mkdir()
    assert "holds no complete checkpoint" in _fails(tmp_path / "empty_run")


def test_upcycle_noise_is_validated():
    with pytest.raises(ConfigError, match=r"moe.upcycle_noise=-0.1 must be >= 0"):
        load_config([], ["moe.upcycle_noise=-0.1", "model.init_from=x.pth"])
    with pytest.raises(ConfigError, match="set model.init_from"):
        load_config([], ["moe.upcycle_noise=0.1"])
    assert load_config([], ["moe.upcycle_noise=0.1", "model.init_from=x.pth"]).moe.upcycle_noise == 0.1
