"""The clustering job's bad inputs and incremental assignment: feature caches of another source or image size,
``--assign-only`` of new shards to an existing round."""

import json

import numpy as np
import pytest

from moce_ds.clustering.feature_sources import make_extractor
from moce_ds.clustering.features import featurize_shards
from moce_ds.data.keys import make_key
from moce_ds.data.shard_writer import write_shards
from moce_ds.data.sources import resolve_shards


def _shards(root, start=0, n=48, per_shard=24, prefix="shard"):
    """n images with global indices start.., the same n images whatever the start."""
    from moce_ds.data.images import png_bytes

    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    imgs[: n // 2, :, :, 0] = 255  # two obvious groups: red-saturated and not
    write_shards(((make_key(start + i, "img"), png_bytes(imgs[i]), None) for i in range(n)), root,
                 prefix=prefix, max_per_shard=per_shard)
    return root


def test_feature_cache_of_another_image_size_or_source_is_refused(tmp_path):
    src = resolve_shards(_shards(tmp_path / "shards"))
    cache = tmp_path / "cache"
    x, index, _ = featurize_shards(src.urls, make_extractor("pixel", None, 32), cache)
    again, _, _ = featurize_shards(src.urls, make_extractor("pixel", None, 32), cache)
    assert np.array_equal(x, again) and index.tolist() == list(range(48))
    with pytest.raises(ValueError, match=f"feature cache {cache} .* image size 32 .*--feature-cache"):
        featurize_shards(src.urls, make_extractor("pixel", None, 16), cache)
    rec = cache / ".done" / sorted(p.name for p in (cache / ".done").iterdir())[0]
    rec.write_text(json.dumps(dict(json.loads(rec.read_text()), source="timm:vit_tiny")))
    with pytest.raises(ValueError, match="holds features of timm:vit_tiny"):
        featurize_shards(src.urls, make_extractor("pixel", None, 32), cache)
    # the refused folder was left as it was: nothing recomputed or mixed in
    assert json.loads(rec.read_text())["source"] == "timm:vit_tiny"


def _append_shards(root, start, n):
    """More images (global indices start..start+n) in new shards, appended to the folder's manifest."""
    extra = _shards(root.parent / f"more{start}", start=start, n=n, prefix=f"more{start}")
    manifest = json.loads((root / "manifest.json").read_text())
    for s in json.loads((extra / "manifest.json").read_text())["shards"]:
        (extra / s["name"]).rename(root / s["name"])
        manifest["shards"].append(s)
    manifest["total"] = sum(s["num_samples"] for s in manifest["shards"])
    (root / "manifest.json").write_text(json.dumps(manifest))


def test_assign_only_extends_the_round_and_keeps_existing_ids(tmp_path):
    from moce_ds.clustering.job import assign_new_shards, run_clustering

    data = _shards(tmp_path / "shards")
    r0 = run_clustering(str(data), 4, iters=10, progress=False)
    assert assign_new_shards(str(data), progress=False) is None  # nothing new: nothing written
    _append_shards(data, 48, 48)
    r1 = assign_new_shards(str(data), progress=False)
    old, new = r0.ids(mmap=False), r1.ids(mmap=False)
    assert r1.round == 1 and r1.k == 4 and new.shape == (96,) and (new >= 0).all()
    assert np.array_equal(new[:48], old)  # existing images keep their ids
    assert np.array_equal(r1.centroids(), r0.centroids())
    m = r1.manifest
    assert m["assign_only"]["from_round"] == 0 and m["assign_only"]["images_assigned"] == 48
    assert m["feature_source"] == r0.manifest["feature_source"] and m["spherical"] == r0.manifest["spherical"]
    # the new shards hold copies of the old images: each gets the id its original has (nearest centroid)
    assert np.array_equal(new[48:], old)
    assert assign_new_shards(str(data), progress=False) is None  # round 1 covers them all now


def test_assign_only_refuses_another_feature_source_and_writes_nothing(tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    from moce_ds.clustering.job import run_clustering
    from moce_ds.data.sidecar import latest_round

    data = _shards(tmp_path / "shards")
    run_clustering(str(data), 4, iters=5, progress=False)
    _append_shards(data, 48, 24)
    spec = importlib.util.spec_from_file_location("cluster_launcher",
                                                  Path(__file__).resolve().parents[2] / "launchers" / "cluster.py")
    launcher = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launcher)
    rc = launcher.main(["--data", str(data), "--assign-only", "--features", "timm:vit_tiny_patch16_224",
                        "--comm", "local"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "round 0 was clustered on pixel_features_v1" in err[0]
    assert latest_round(data / "clusters").round == 0  # nothing written
