"""Evaluation features and fine-tuning take a device (issue 17 item 3); CPU stays the default."""

import numpy as np
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from moce_ds.data.loader import to_tensor
from moce_ds.evaluation.encoders import Encoder, extract_features
from moce_ds.evaluation.probes import finetune
from moce_ds.model.device import resolve_device


def _encoder() -> Encoder:
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=16, patch_size=4, embed_dim=16, depth=1, num_heads=2, num_classes=0).eval()
    return Encoder("tiny", 16, vit.forward_features, vit, vit)


def test_features_on_the_chosen_device_match_the_plain_forward():
    enc = _encoder()
    images = np.random.default_rng(0).integers(0, 256, (10, 16, 16, 3), np.uint8)
    with torch.no_grad():
        want = enc.vit.forward_features(to_tensor(images))[:, 1:].mean(1).numpy()
    for device in (None, "cpu", "auto"):
        got = extract_features(enc, images, batch_size=4, device=device)
        tol = 2e-2 if resolve_device(device).type == "cuda" else 1e-6  # bf16 autocast on CUDA
        np.testing.assert_allclose(got, want, atol=tol)


def test_finetune_takes_a_device():
    enc = _encoder()
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (8, 16, 16, 3), np.uint8), np.array([0, 1] * 4)
    acc = finetune(enc.vit, x, y, x, y, epochs=1, batch_size=4, device="auto")
    assert 0.0 <= acc <= 1.0


def test_resolve_device():
    assert resolve_device(None).type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA"):
            resolve_device("cuda")
