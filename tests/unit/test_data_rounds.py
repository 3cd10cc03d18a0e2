"""Cluster-id rounds as the trainer sees them: picked at each epoch start, refused on a k mismatch."""

import numpy as np
import pytest

from moce_ds.config import load_config
from moce_ds.data.loader import make_train_loader
from moce_ds.data.make_shards import make_shards
from moce_ds.data.sidecar import write_round
from moce_ds.data.sources import resolve_shards
from moce_ds.engine.training_data import TrainingData, epoch_round, steps_per_epoch
from tests.unit.test_data_make_shards import make_image_folder


@pytest.fixture()
def data(tmp_path) -> TrainingData:
    make_image_folder(tmp_path / "src", per_class=4, corrupt=False)  # 12 images
    make_shards(tmp_path / "shards", image_folder=tmp_path / "src", max_per_shard=4, progress=False)
    src = resolve_shards(tmp_path / "shards")
    return TrainingData(src.urls, src.total, None, "test", src.counts, tmp_path / "shards" / "clusters")


def _clusters(data: TrainingData, rnd, epoch: int) -> dict[int, int]:
    loader = make_train_loader(data.source, rnd.path / "ids.npy", batch_size=4, steps_per_epoch=None, image_size=8,
                               num_workers=0, epoch=epoch, resampled=False)
    return {i: c for b in loader for i, c in zip(b["index"].tolist(), b["cluster"].tolist())}


def test_round_switch_at_epoch_boundary(data):
    cfg = load_config([], ["moe.num_clusters=3"])
    cents = np.zeros((3, 2), np.float32)
    ids0 = np.arange(12) % 3
    write_round(data.clusters_root, ids0, cents, "test")
    r = epoch_round(cfg, data, None)
    assert r.round == 0
    assert _clusters(data, r, 0) == {i: int(ids0[i]) for i in range(12)}
    assert epoch_round(cfg, data, r) is r  # nothing new: the same round object
    ids1 = (np.arange(12) + 1) % 3  # a refresh between epochs
    write_round(data.clusters_root, ids1, cents, "test")
    r = epoch_round(cfg, data, r)
    assert r.round == 1
    assert _clusters(data, r, 1) == {i: int(ids1[i]) for i in range(12)}
    write_round(data.clusters_root, ids1, np.zeros((4, 2)), "test")  # k=4 for a gate table of 3
    with pytest.raises(ValueError, match="k=4 clusters but the model expects moe.num_clusters=3"):
        epoch_round(cfg, data, r)


def test_steps_per_epoch_modes(data):
    assert data.shard_counts == [4, 4, 4]
    resampled = load_config([], [])
    once = load_config([], ["data.resampled=false"])
    assert steps_per_epoch(resampled, data, micro=2, accum=1, world_size=2) == 3  # 12 // (2 * 2)
    # non-resampled: a rank gets at least one shard of 4 -> 2 micro-batches of 2 -> 1 step of 2 micro-batches
    assert steps_per_epoch(once, data, micro=2, accum=2, world_size=2) == 1
    with pytest.raises(ValueError, match="at least one shard per rank"):
        steps_per_epoch(once, data, micro=1, accum=1, world_size=4)
