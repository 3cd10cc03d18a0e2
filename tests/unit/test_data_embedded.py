import numpy as np
import pytest
import webdataset as wds

from moce_ds.data.embedded import build_embedded_dataset, embedded_tasks, load_task
from moce_ds.data.keys import key_index


@pytest.fixture(scope="session")
def embedded(tmp_path_factory):
    # shared cache folder: other test modules reuse this build (the builder is idempotent)
    return build_embedded_dataset(tmp_path_factory.getbasetemp() / "embedded_cache", seed=0)


def test_size_and_domains(embedded):
    ds = embedded
    assert ds.domains == ["digits", "faces", "photos", "textures", "microscopy"]
    x, index, dom = ds.train_images()
    assert x.dtype == np.uint8 and x.shape == (ds.num_train, 32, 32, 3)
    assert ds.num_train >= 4000
    assert index.tolist() == list(range(ds.num_train))
    counts = np.bincount(dom, minlength=len(ds.domains))
    assert (counts >= 500).all(), counts
    assert 4 <= len(ds.shard_urls) <= 16
    # domains look different: mean colour saturation differs between digits (tinted) and textures (grey)
    sat = (x.max(-1).astype(int) - x.min(-1)).mean((1, 2))
    assert sat[dom == 0].mean() > 3 * sat[dom == 3].mean()


def test_shards_match_table(embedded):
    ds = embedded
    _, _, dom = ds.train_images()
    keys = []
    for s in wds.WebDataset(ds.shard_urls, shardshuffle=False, nodesplitter=wds.split_by_node):
        i = key_index(s["__key__"])
        assert s["__key__"].split("-")[0] == ds.domains[dom[i]]
        assert int(s["cls"]) == dom[i]
        keys.append(s["__key__"])
    assert len(keys) == len(set(keys)) == ds.num_train


def test_heldout_disjoint_and_labelled(embedded):
    ds = embedded
    x, _, _ = ds.train_images()
    train_hashes = {img.tobytes() for img in x}
    expect_classes = {"digits": 10, "faces": 2, "photos": 8, "textures": 3, "microscopy": 4}
    for d in ds.domains:
        hx, hy = ds.heldout(d)
        assert hx.shape[1:] == (32, 32, 3) and hy.dtype == np.int64 and len(hx) == len(hy)
        n_train = int((ds.train_images()[2] == ds.domains.index(d)).sum())
        assert 0.15 < len(hx) / (len(hx) + n_train) < 0.25
        assert len(np.unique(hy)) == expect_classes[d]
        # uniform crops (e.g. black sky) can coincide across sources by chance; anything else must not
        assert not any(img.tobytes() in train_hashes for img in hx if img.max() != img.min())
    with pytest.raises(KeyError):
        ds.heldout("nope")


def test_deterministic_and_cached(embedded, tmp_path):
    ds = embedded
    mtime = (ds.root / "manifest.json").stat().st_mtime_ns
    again = build_embedded_dataset(ds.root.parent, seed=0)
    assert again == ds
    assert (again.root / "manifest.json").stat().st_mtime_ns == mtime  # not rebuilt
    with pytest.raises(ValueError, match="seed"):
        build_embedded_dataset(ds.root.parent, seed=1)
    # a fresh build elsewhere gives the same keys, images and shard bytes
    other = build_embedded_dataset(tmp_path, seed=0)
    assert [s["sha256"] for s in other.manifest["shards"]] == [s["sha256"] for s in ds.manifest["shards"]]
    assert np.array_equal(other.train_images()[0], ds.train_images()[0])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_incomplete_cache_is_rebuilt(embedded, tmp_path):
    import shutil

    shutil.copytree(embedded.root, tmp_path / "embedded-v1")
    with open(tmp_path / "embedded-v1" / "shards" / "shard-00000.tar", "r+b") as f:
        f.write(b"garbage")
    ds = build_embedded_dataset(tmp_path, seed=0)
    assert ds.manifest["shards"] == embedded.manifest["shards"]


def test_tasks(embedded):
    tasks = embedded_tasks()
    assert {"digits", "faces", "texture_photo"} <= set(tasks)
    for name, spec in tasks.items():
        trx, try_, tex, tey = load_task(embedded, name)
        assert len(trx) + len(tex) == sum(len(embedded.heldout(d)[0]) for d in spec.domains)
        assert abs(len(trx) - len(tex)) <= spec.num_classes
        assert set(np.unique(try_)) == set(np.unique(tey)) == set(range(spec.num_classes))
        again = load_task(embedded, name)
        assert np.array_equal(again[1], try_) and np.array_equal(again[0], trx)
