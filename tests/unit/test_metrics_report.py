"""Report pieces that need no checkpoint: pixel-space reconstructions and the curves from metrics.jsonl."""

from __future__ import annotations

import json

import numpy as np
import torch

from moce_ds.config import load_config
from moce_ds.evaluation.encoders import to_tensor
from moce_ds.model import build_model
from moce_ds.report import build_report, reconstruct, to_pixels


def test_to_pixels_undoes_the_imagenet_normalisation() -> None:
    u8 = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    assert np.abs(to_pixels(to_tensor(u8)) * 255 - u8).max() < 1e-3


def test_reconstruction_is_in_pixel_space() -> None:
    cfg = load_config([], ["moe.routing=dense"])
    model = build_model(cfg, ep_size=1).eval()
    u8 = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    x = to_tensor(u8)
    # a decoder that predicts the normalised target exactly must give back the original pixels
    model.forward_decoder = lambda latent, ids_restore: model.target(x)
    rec = reconstruct(model, x, None)
    assert rec["reconstruction"].shape == (3, 32, 32, 3)
    assert np.abs(rec["reconstruction"] - rec["original"]).max() < 1e-4
    assert np.abs(rec["masked"] - rec["original"]).max() > 0.1  # holes where patches were removed
    assert float(torch.tensor(rec["original"]).min()) >= 0 and float(torch.tensor(rec["original"]).max()) <= 1


def test_report_without_checkpoint_has_the_curves(tmp_path) -> None:
    rows = [{"step": s, "epoch": 0, "loss": 1.0 / s, "recon_loss": 0.9 / s, "aux_loss": 4.0, "lr": 1e-3,
             "images_per_s": 100.0 + s, "images": 32, "skipped": {},
             "expert_load": {"1": {"tokens_requested": [s, 10, 3, 1], "tokens_kept": [s, 9, 3, 1],
                                   "images": [1, 1, 0, 0]}}} for s in range(1, 6)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    md = build_report(tmp_path)
    text = md.read_text()
    for png in ("loss.png", "throughput.png", "expert_load.png"):
        assert f"]({png})" in text
        assert (md.parent / png).stat().st_size > 1000
    assert "No checkpoint plots" in text
