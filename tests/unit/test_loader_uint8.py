"""uint8 on the wire, normalisation in the model (issue 17 item 4): the same crops, the same loss to 1e-6."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from moce_ds.config import load_config
from moce_ds.data.images import IMAGE_EXTS, decode_image, image_member, normalize, png_bytes
from moce_ds.data.keys import make_key
from moce_ds.data.loader import make_train_loader, to_tensor
from moce_ds.data.shard_writer import write_shards
from moce_ds.model import build_model


def _jpg(i: int, size=(48, 40), smooth: bool = False) -> bytes:
    rng = np.random.default_rng(i)
    buf = io.BytesIO()
    img = Image.fromarray(rng.integers(0, 256, (6 if smooth else size[1], 8 if smooth else size[0], 3), np.uint8))
    img.resize(size, Image.BICUBIC).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


@pytest.fixture()
def urls(tmp_path):
    m = write_shards(((make_key(i, "t"), _jpg(i), None) for i in range(24)), tmp_path / "s", max_per_shard=12)
    return [str(tmp_path / "s" / s["name"]) for s in m["shards"]]


def _batches(urls, **kw):
    return list(make_train_loader(urls, None, batch_size=8, steps_per_epoch=2, image_size=32, num_workers=0, **kw))


def test_loader_yields_uint8_and_the_model_loss_is_unchanged(urls):
    floats, u8 = _batches(urls), _batches(urls, uint8=True)
    model = build_model(load_config([], ["moe.routing=dense"])).eval()
    for f, u in zip(floats, u8):
        assert u["images"].dtype == torch.uint8 and u["images"].shape == (8, 3, 32, 32)
        assert f["images"].dtype == torch.float32
        assert torch.equal(normalize(u["images"]), f["images"])  # the same crops and arithmetic
        torch.manual_seed(0)
        loss_f = model(f["images"], f["cluster"]).loss
        torch.manual_seed(0)
        loss_u = model(u["images"], u["cluster"]).loss
        assert abs(loss_f.item() - loss_u.item()) <= 1e-6


def test_uint8_into_a_bf16_model():
    model = build_model(load_config([], ["moe.routing=dense"])).to(torch.bfloat16)
    imgs = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    out = model(imgs)
    assert torch.isfinite(out.loss) and out.pred.dtype == torch.bfloat16
    assert model.pixels(imgs).dtype == torch.float32  # the norm-pix target is made from fp32 pixels
    feats = model.forward_features(imgs)
    assert feats.dtype == torch.bfloat16


def test_draft_decoding_keeps_the_crops(tmp_path):
    m = write_shards(((make_key(i, "t"), _jpg(i, (400, 300), smooth=True), None) for i in range(8)), tmp_path / "s",
                     max_per_shard=8)
    urls = [str(tmp_path / "s" / s["name"]) for s in m["shards"]]
    kw = dict(batch_size=8, steps_per_epoch=1, image_size=32, num_workers=0, uint8=True)
    ref = list(make_train_loader(urls, None, **kw))[0]["images"].float()
    fast = list(make_train_loader(urls, None, draft=True, **kw))[0]["images"].float()
    assert fast.shape == ref.shape
    # the same crops and flips of the same images (decoded at 1/2^k scale): a few grey levels apart on average
    assert (fast - ref).abs().mean() < 0.1 * (ref - ref.roll(1, 0)).abs().mean()


def test_one_decoder_and_extension_set():
    assert {"jpg", "jpeg", "png"} <= set(IMAGE_EXTS)
    assert image_member({"__key__": "k", "cls": b"1", "png": b"x"}) == b"x"
    img = decode_image(_jpg(0))
    assert img.mode == "RGB" and img.size == (48, 40)
    x = to_tensor(np.zeros((1, 4, 4, 3), np.uint8))
    assert x.shape == (1, 3, 4, 4) and x.dtype == torch.float32


def test_one_png_encoder_for_arrays_and_images():
    a = np.random.default_rng(0).integers(0, 256, (6, 7, 3), dtype=np.uint8)
    data = png_bytes(a)
    assert data == png_bytes(Image.fromarray(a)) and data[:8] == b"\x89PNG\r\n\x1a\n"
    assert np.array_equal(np.asarray(decode_image(data)), a)  # lossless
