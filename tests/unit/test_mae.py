import pytest
import torch

from moce_ds.config import load_config
from moce_ds.model import MODEL_SIZES, MaskedAutoencoderViT, build_model, get_spec, tiny_variant


def test_patchify_unpatchify_round_trip():
    model = build_model(load_config([], ["moe.routing=dense"]))
    imgs = torch.randn(3, 3, 32, 32)
    patches = model.patchify(imgs)
    assert patches.shape == (3, 64, 4 * 4 * 3)
    assert torch.equal(model.unpatchify(patches), imgs)
    # patch 0 is the top-left 4x4 block, channels last
    assert torch.equal(patches[0, 0].reshape(4, 4, 3), imgs[0, :, :4, :4].permute(1, 2, 0))


@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.75, 0.9])
def test_masking_keeps_exactly_the_configured_number(ratio):
    model = build_model(load_config([], ["moe.routing=dense"]))  # ratio 0 (no masking) is for features, not training
    x = torch.randn(5, 64, 8)
    kept, mask, restore = model.random_masking(x, ratio)
    n_keep = int(64 * (1 - ratio))
    assert kept.shape == (5, n_keep, 8)
    assert (mask.sum(1) == 64 - n_keep).all()
    # kept tokens are exactly the unmasked positions, and masks differ between samples
    for i in range(5):
        assert set(map(tuple, kept[i].tolist())) == set(map(tuple, x[i][mask[i] == 0].tolist()))
    if 0 < ratio:
        assert not torch.equal(mask[0], mask[1])


def test_norm_pix_target_is_normalised_per_patch():
    model = build_model(load_config([], ["moe.routing=dense"]))
    t = model.target(torch.rand(2, 3, 32, 32))
    assert torch.allclose(t.mean(-1), torch.zeros(2, 64), atol=1e-5)


@pytest.mark.parametrize("size", list(MODEL_SIZES))
@pytest.mark.parametrize("routing", ["dense", "token", "cluster"])
def test_every_parameter_receives_a_gradient(size, routing):
    cfg = load_config([], [f"model.size={size}", f"moe.routing={routing}", "moe.num_clusters=4", "moe.top_k=2",
                                        "moe.num_experts=2"])  # top-2 of 2: every expert sees tokens
    spec = tiny_variant(get_spec(size))
    torch.manual_seed(0)
    model = MaskedAutoencoderViT(spec, cfg.moe)
    imgs = torch.randn(4, 3, spec.img_size, spec.img_size)
    out = model(imgs, torch.tensor([0, 1, 2, 3]))
    out.loss.backward()
    missing = [n for n, p in model.named_parameters()
               if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)]
    assert not missing, missing
    assert len(model.moe_layers()) == (0 if routing == "dense" else spec.depth // 2)


def test_moe_layers_default_to_every_other_block_and_are_configurable():
    assert build_model(load_config([], [])).moe_blocks == [1, 3, 5]
    assert build_model(load_config([], ["moe.layers=[0,5]"])).moe_blocks == [0, 5]
    with pytest.raises(ValueError, match="outside the encoder"):
        build_model(load_config([], ["moe.layers=[6]"]))
