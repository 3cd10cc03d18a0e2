"""Task customisation on a checkpoint written by two real ranks (ep_size=2)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file
from timm.models.vision_transformer import VisionTransformer

from moce_ds.clustering.feature_sources import assign_to_round
from moce_ds.clustering.kmeans import assign, unit_rows
from moce_ds.clustering.pixel_features import pixel_features
from moce_ds.customize import customize, load_pretrained
from moce_ds.data.embedded import build_embedded_dataset
from moce_ds.evaluation import load_encoder
from moce_ds.evaluation.encoders import to_tensor
from tests.dist.launch import ROOT, run_deepspeed

pytestmark = pytest.mark.timeout(900)


def _one_cluster_task(run: Path, cache: Path, out: Path) -> tuple[int, np.ndarray]:
    """An ImageFolder of training images whose nearest centroid is the round's biggest cluster."""
    pre = load_pretrained(run)
    images, index, _ = build_embedded_dataset(cache).train_images()
    ids = np.asarray(pre.round.ids())[index]
    cluster = int(np.bincount(ids[ids >= 0]).argmax())
    candidates = images[ids == cluster][:200]
    nearest, _ = assign(unit_rows(pixel_features(candidates)), unit_rows(pre.round.centroids()))
    chosen = candidates[nearest == cluster][:48]
    assert len(chosen) >= 16
    for i, img in enumerate(chosen):
        folder = out / ("a" if i % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / f"{i:03d}.png")
    (out / "a" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n but no image")  # named in the report, not used
    return cluster, chosen


def test_export_in_timm_matches_the_moce_encoder(two_rank_run, embedded_cache, tmp_path):
    run, _ = two_rank_run
    cluster, images = _one_cluster_task(run, embedded_cache, tmp_path / "task")
    res = customize(run, str(tmp_path / "task"), tmp_path / "out")
    assert res.selection.histogram[cluster] == 1.0
    for block, probs in res.selection.probabilities.items():
        assert res.selection.chosen[block] == int(probs[cluster].argmax())  # the cluster's top-1 expert

    pre = load_pretrained(run)  # the MoCE encoder, eval mode, no dropping
    for _, moe in pre.model.moe_layers():
        moe.gate.drop_tokens = False
    x = to_tensor(images)
    with torch.no_grad():
        moce = pre.model.forward_features(x, torch.full((len(x),), cluster))
        dense = load_encoder(res.checkpoint).tokens(x)  # timm's VisionTransformer
    assert moce.shape == dense.shape
    assert (moce - dense).abs().max().item() <= 1e-5
    for name in ("json", "markdown", "heatmap"):
        assert res.report[name].stat().st_size > 0
    record = json.loads(res.report["json"].read_text())
    assert record["skipped_images"] == [str(tmp_path / "task" / "a" / "corrupt.png")]
    assert "skipped images (do not decode): 1" in res.report["markdown"].read_text()

    assert res.checkpoint.name == "vit_mini_task.safetensors"
    namespace = {"timm": timm, "VisionTransformer": VisionTransformer}
    exec(res.timm_call, namespace)  # the call the report prints
    with torch.no_grad():
        assert torch.equal(namespace["m"].eval().forward_features(x), dense)
    if res.hf_folder is None:
        assert record["load_in_transformers"].startswith("skipped: transformers is not installed")
    else:
        from transformers import ViTModel

        hf = ViTModel.from_pretrained(res.hf_folder, add_pooling_layer=False).eval()
        with torch.no_grad():
            assert (hf(pixel_values=x).last_hidden_state - dense).abs().max().item() <= 1e-4


def test_one_domain_task_picks_the_expert_the_gate_gives_its_clusters(two_rank_run, embedded_cache, tmp_path):
    """Set every gate so the digits' clusters route to expert (block % 4) and all others elsewhere."""
    run, _ = two_rank_run
    pre = load_pretrained(run)
    ds = build_embedded_dataset(embedded_cache)
    x, _ = ds.heldout("digits")
    nearest, _ = assign(unit_rows(pixel_features(x)), unit_rows(pre.round.centroids()))
    digit_clusters = np.unique(nearest)
    with torch.no_grad():
        for block, moe in pre.model.moe_layers():
            target = block % 4
            gate = moe.gate
            gate.cluster_table.zero_()
            gate.cluster_table[:, :4] = torch.eye(4)[(target + 1) % 4]  # everyone else -> another expert
            gate.cluster_table[torch.from_numpy(digit_clusters), :4] = torch.eye(4)[target]
            gate.wg.weight.zero_()
            gate.wg.weight[:, :4] = 3.0 * torch.eye(4)
    from moce_ds.customize import cluster_histogram, select_experts

    hist = cluster_histogram(assign_to_round(pre.round, x), pre.round.k)
    sel = select_experts(pre.model, hist)
    assert sel.chosen == {block: block % 4 for block in pre.model.moe_blocks}


def test_ep2_checkpoint_and_its_ep1_resave_give_the_same_export(two_rank_run, embedded_cache, tmp_path):
    run, ds = two_rank_run
    resaved = tmp_path / "resaved"
    run_deepspeed(ROOT / "tests" / "dist" / "workers" / "resave_ep1.py", [str(run), str(resaved), str(ds)],
                  num_gpus=1)
    assert len(list((resaved / "checkpoints").glob("*/layer_0_expert_*_model_states.pt"))) == 4
    a = customize(run, "faces", tmp_path / "a", cache_dir=embedded_cache, hf=False)
    b = customize(resaved, "faces", tmp_path / "b", centroids=load_pretrained(run).round.path,
                  cache_dir=embedded_cache, hf=False)
    assert not (tmp_path / "a" / "hf").exists()
    sa, sb = (load_file(r.checkpoint) for r in (a, b))
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a.selection.chosen == b.selection.chosen
