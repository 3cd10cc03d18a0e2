"""The feature-source registry: every round records how to rebuild its extractor, and any round featurises new
images as it featurised its own; one policy for images without a cluster id; deleted sources fail in one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from moce_ds.checkpoints.records import META
from moce_ds.clustering.feature_sources import (
    ClusterIds,
    FeatureSourceError,
    assign_to_round,
    build_extractor,
    checkpoint_tags_in_use,
    make_extractor,
    parse_features,
    round_extractor,
)
from moce_ds.clustering.job import write_matched_round
from moce_ds.clustering.kmeans import kmeans
from moce_ds.config import load_config, save_config
from moce_ds.data.sidecar import write_round
from moce_ds.engine.checkpoint import prune_checkpoints
from moce_ds.model import build_model


def _later_process() -> None:
    """Extractors are cached per process and spec: forget them, as a later process would not have them."""
    from moce_ds.clustering import feature_sources

    feature_sources._build_cached.cache_clear()


@pytest.fixture(autouse=True)
def _fresh_process():
    _later_process()
    yield


def _images(n: int, seed: int = 0, size: int = 32) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (4, 1, 1, 3))  # four colour families: clusterable
    noise = rng.integers(-30, 30, (n, size, size, 3))
    return np.clip(base[np.arange(n) % 4] + noise, 0, 255).astype(np.uint8)


def write_run(run: Path, overrides: list[str], tag: str = "step00000001", round_path: Path | None = None) -> Path:
    """A run folder laid out as pre-training writes it (config.yaml, one checkpoint tag, its completion record),
    from a freshly initialised model: what the readers need, without a DeepSpeed launch."""
    cfg = load_config([], [f"output_dir={run}", *overrides])
    model = build_model(cfg)
    save_config(cfg, run / "config.yaml")
    folder = run / "checkpoints" / tag
    folder.mkdir(parents=True)
    torch.save({"module": model.state_dict()}, folder / "mp_rank_00_model_states.pt")
    files = {p.name: p.stat().st_size for p in folder.iterdir()}
    position = {"step": int(tag.removeprefix("step")), "epoch": 0, "micro_in_epoch": 0,
                "cluster_round": None if round_path is None else str(round_path)}
    (folder / META).write_text(json.dumps({"signature": {}, "position": position, "tag": tag, "files": files}))
    return run


def _cluster(root: Path, ext, images: np.ndarray, k: int = 4):
    feats = ext(images, np.arange(len(images)))
    res = kmeans(feats, k, seed=0, spherical=True)
    return write_matched_round(root, res.assignments, res, ext.source, ext.space,
                               {"feature_extractor": ext.spec, "spherical": True})


def test_every_kind_round_trips_through_its_manifest(tmp_path):
    images = _images(40)
    dense = write_run(tmp_path / "dense", ["moe.routing=dense"])
    for features in ("pixel", str(dense)):
        ext = make_extractor(features)
        rnd = _cluster(tmp_path / "clusters" / Path(features).name, ext, images)
        again = round_extractor(rnd)
        assert rnd.manifest["feature_extractor"]["kind"] == {"pixel": "pixel"}.get(features, "checkpoint")
        assert again.source == ext.source == rnd.manifest["feature_source"]
        new = _images(10, seed=1)
        np.testing.assert_allclose(again(new), ext(new), atol=1e-6)
        # the round's own images are assigned to the clusters k-means gave them
        assert (assign_to_round(rnd, images) == rnd.ids(mmap=False)).mean() > 0.95
    spec = rnd.manifest["feature_extractor"]
    assert spec["run"] == str(dense.resolve()) and spec["tag"] == "step00000001" and spec["routing"] == "dense"
    assert spec["image_size"] == 32 and len(spec["mean"]) == 3
    assert again(new).shape == (10, 128)  # mini's width: encoder features, not pixels


def test_timm_source_records_the_weights_hash_and_refuses_a_changed_file(tmp_path):
    import timm

    net = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0)
    weights = tmp_path / "w.pth"
    torch.save(net.state_dict(), weights)
    spec = parse_features("timm:vit_tiny_patch16_224", str(weights))
    assert len(spec["sha256"]) == 64
    ext = build_extractor(spec)
    assert ext.image_size == 224 and ext(_images(2)).shape == (2, 192)  # 32 px images are resized to 224
    torch.save({k: v + 1 for k, v in net.state_dict().items()}, weights)
    _later_process()
    with pytest.raises(FeatureSourceError, match="changed since it was recorded"):
        build_extractor(spec)


def test_image_without_an_id_gets_its_nearest_centroid(tmp_path):
    images = _images(40)
    ext = make_extractor("pixel")
    rnd = _cluster(tmp_path / "clusters", ext, images)
    ids = ClusterIds(rnd)
    table = rnd.ids(mmap=False)
    # known indices come from the table, even where the table disagrees with the nearest centroid
    swapped = np.array([5, 6])
    got = ids(images[swapped[::-1]], swapped)
    assert got.tolist() == table[swapped].tolist() and ids.assigned == 0
    # no index, an index past the table, or -1 in the table: the nearest centroid
    nearest = assign_to_round(rnd, images[:3])
    assert ids(images[:3]).tolist() == nearest.tolist()
    assert ids(images[:3], np.array([10_000, 10_001, -1])).tolist() == nearest.tolist()
    assert ids.assigned == 6


def test_moce_source_routes_new_images_by_the_nearest_centroid_of_its_routing_round(tmp_path):
    images = _images(40)
    pixel_round = _cluster(tmp_path / "clusters", make_extractor("pixel"), images)
    moce = write_run(tmp_path / "moce", ["moe.num_clusters=4", "moe.num_experts=2"], round_path=pixel_round.path)
    ext = make_extractor(str(moce))
    assert ext.spec["routing"] == "cluster" and ext.spec["routing_round"] == str(pixel_round.path.resolve())
    # with indices, routing follows the table; without them, the nearest centroid: equal here by construction
    table = pixel_round.ids(mmap=False)
    agree = np.flatnonzero(assign_to_round(pixel_round, images) == table)
    np.testing.assert_allclose(ext(images[agree], agree), ext(images[agree]), atol=1e-6)


def test_a_deleted_source_stops_in_one_line_naming_the_path_and_the_fix(tmp_path):
    dense = write_run(tmp_path / "dense", ["moe.routing=dense"])
    rnd = _cluster(tmp_path / "clusters", make_extractor(str(dense)), _images(20))
    tag_dir = dense / "checkpoints" / "step00000001"
    (tag_dir / "mp_rank_00_model_states.pt").unlink()
    _later_process()
    with pytest.raises(FeatureSourceError) as e:
        round_extractor(rnd)
    msg = str(e.value)
    assert "\n" not in msg and str(tag_dir) in msg and "no longer exists" in msg
    assert "pass --features <run or checkpoint folder" in msg
    # the override must give features in the centroids' width
    with pytest.raises(FeatureSourceError, match="gives 282-wide features but round 0's centroids are 128-wide"):
        round_extractor(rnd, override="pixel")


def test_legacy_manifests_rebuild_from_their_source_string(tmp_path):
    rnd = write_round(tmp_path / "c", np.zeros(4, np.int32), np.ones((2, 282), np.float32), "pixel_features_v1")
    assert round_extractor(rnd).source == "pixel_features_v1"
    old = write_round(tmp_path / "c", np.zeros(4, np.int32), np.ones((2, 8), np.float32), "moce_ds:encoder@epoch3")
    with pytest.raises(FeatureSourceError, match="cannot be rebuilt: pass --features"):
        round_extractor(old)


def test_pruning_keeps_the_checkpoints_that_rounds_name(tmp_path):
    run = tmp_path / "run"
    for step in (1, 2, 3, 4):
        write_run(run, ["moe.routing=dense"], tag=f"step{step:08d}") if step == 1 else \
            _copy_tag(run, "step00000001", f"step{step:08d}", step)
    clusters = tmp_path / "clusters"
    spec = parse_features(str(run / "checkpoints" / "step00000002"))
    write_round(clusters, np.zeros(3, np.int32), np.ones((1, 4), np.float32), "x", {"feature_extractor": spec})
    assert checkpoint_tags_in_use(clusters, run) == {"step00000002"}
    prune_checkpoints(run / "checkpoints", 1, checkpoint_tags_in_use(clusters, run))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step00000002", "step00000004"]


def _copy_tag(run: Path, src: str, dst: str, step: int) -> None:
    import shutil

    shutil.copytree(run / "checkpoints" / src, run / "checkpoints" / dst)
    meta = json.loads((run / "checkpoints" / dst / META).read_text())
    meta["position"]["step"], meta["tag"] = step, dst
    (run / "checkpoints" / dst / META).write_text(json.dumps(meta))


def test_extractor_device_is_not_part_of_the_spec_and_cuda_without_a_gpu_is_refused(tmp_path):
    # the device is chosen per process: the same spec gives the same features on "cpu" and by default, and a
    # round's recorded spec never names a device; asking for CUDA on a CPU-only host is one clear error
    from moce_ds.clustering.feature_sources import build_extractor, pixel_spec

    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    a, b = build_extractor(pixel_spec(32)), build_extractor(pixel_spec(32), "cpu")
    np.testing.assert_array_equal(a(images), b(images))
    assert "device" not in a.spec
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            build_extractor(pixel_spec(32), "cuda")
