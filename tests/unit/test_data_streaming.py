"""Streaming loader on real webdataset + real DataLoader workers: modes, sources, the webdataset 1.0 traps."""

import io
import json
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from moce_ds.data.loader import SKIP_REASONS, _Process, _Shuffle, epoch_batches, make_train_loader, rank_shards
from moce_ds.data.make_shards import make_shards
from moce_ds.data.sources import resolve_shards
from tests.unit.test_data_make_shards import make_image_folder


@pytest.fixture(scope="module")
def folder_shards(tmp_path_factory) -> Path:
    """40 images from a generated ImageFolder in 8 shards of 5 (3 classes, JPEG and PNG)."""
    root = tmp_path_factory.mktemp("stream")
    make_image_folder(root / "src", per_class=14, corrupt=False)  # 42 images
    (root / "src" / "n03" / "n03_12.JPEG").unlink()
    (root / "src" / "n03" / "n03_13.png").unlink()
    make_shards(root / "shards", image_folder=root / "src", max_per_shard=5, workers=2, progress=False)
    return root / "shards"


def _indices(batches) -> list[int]:
    return [i for b in batches for i in b["index"].tolist()]


def test_non_resampled_two_nodes_two_workers_complete(folder_shards):
    src = resolve_shards(folder_shards)
    assert src.counts == [5] * 8
    for epoch in (0, 1):
        seen = []
        for rank in (0, 1):
            loader = make_train_loader(src, None, batch_size=4, steps_per_epoch=None, image_size=8, num_workers=2,
                                       epoch=epoch, rank=rank, world_size=2, resampled=False, shuffle_buffer=8)
            batches = list(loader)
            # each worker ends on a ragged batch of 2: the main process merges them, so 20 samples -> 5 batches
            assert len(loader) == len(batches) == epoch_batches(src.counts, 4, 2) == 5
            assert all(b["images"].shape == (4, 3, 8, 8) for b in batches)
            seen += _indices(batches)
        assert sorted(seen) == list(range(40)), f"epoch {epoch}: lost or duplicated samples"
    assert rank_shards(8, 0, 0, 0, 2) != rank_shards(8, 0, 1, 0, 2)  # shard assignment changes per epoch


def test_resampled_same_batches_on_every_rank(folder_shards):
    counts = []
    streams = []
    for rank in (0, 1):
        batches = list(make_train_loader(folder_shards, None, batch_size=3, steps_per_epoch=7, image_size=8,
                                         num_workers=2, rank=rank, world_size=2))
        counts.append(len(batches))
        assert all(b["images"].shape[0] == 3 for b in batches)
        streams.append(_indices(batches))
    assert counts == [7, 7] and streams[0] != streams[1]


def test_sources_brace_pipe_manifest_folder(folder_shards):
    names = sorted(p.name for p in folder_shards.glob("shard-*.tar"))
    brace = str(folder_shards / "shard-{00000..00007}.tar")
    pipes = [f"pipe:cat {folder_shards / n}" for n in names]
    kw = dict(batch_size=4, steps_per_epoch=10, image_size=8, num_workers=0, resampled=False)
    paths = [str(folder_shards / n) for n in names]
    for source in (folder_shards, folder_shards / "manifest.json", brace, pipes, paths):
        assert sorted(_indices(make_train_loader(source, None, **kw))) == list(range(40)), source
    assert len(resolve_shards(brace).urls) == 8 and resolve_shards(brace).counts is None
    with pytest.raises(ValueError, match="steps_per_epoch"):
        make_train_loader(brace, None, batch_size=4, steps_per_epoch=None, image_size=8, resampled=False)


# ----------------------------------------------------------------------------------------------- webdataset traps


def test_trap_default_node_splitter_refuses_world_size(folder_shards, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    urls = resolve_shards(folder_shards).urls
    with pytest.raises(ValueError, match="nodesplitter"):
        next(iter(wds.WebDataset(urls, shardshuffle=False)))
    # ours splits by the explicit rank/world_size, whatever the environment says
    loader = make_train_loader(folder_shards, None, batch_size=5, steps_per_epoch=None, image_size=8, num_workers=0,
                               rank=0, world_size=2, resampled=False, shuffle_buffer=0)
    mine = {u for i, u in enumerate(urls) if i in rank_shards(8, 0, 0, 0, 2)}
    got = sorted(_indices(loader))
    assert len(got) == 20 and all(any(f"-{i // 5:05d}.tar" in u for u in mine) for i in got)


def test_trap_with_epoch_on_dataset_counts_per_worker(folder_shards):
    urls = resolve_shards(folder_shards).urls
    stages = (wds.ResampledShards(urls), wds.tarfile_to_samples(), wds.batched(2, collation_fn=len))
    per_worker = wds.DataPipeline(*stages).with_epoch(3)
    assert len(list(wds.WebLoader(per_worker, batch_size=None, num_workers=2))) == 6  # 3 per worker, not 3
    ours = make_train_loader(urls, None, batch_size=2, steps_per_epoch=3, image_size=8, num_workers=2)
    assert len(list(ours)) == 3


def test_trap_fewer_shards_than_workers(folder_shards, tmp_path, caplog):
    src = resolve_shards(folder_shards)
    two = tmp_path / "two"
    two.mkdir()
    meta = json.loads((folder_shards / "manifest.json").read_text())
    meta["shards"] = meta["shards"][:2]
    for s in meta["shards"]:
        (two / s["name"]).symlink_to(folder_shards / s["name"])
    (two / "manifest.json").write_text(json.dumps(meta))
    # plain webdataset: workers 2 and 3 of 4 get no shard and deliver nothing
    per_worker = []
    for w in range(4):
        per_worker.append(len(src.urls[:2][w::4]))
    assert per_worker == [1, 1, 0, 0]
    with caplog.at_level(logging.WARNING, logger="moce_ds"):
        loader = make_train_loader(two, None, batch_size=5, steps_per_epoch=None, image_size=8, num_workers=4,
                                   resampled=False)
    assert any("2 shard(s) for 4 loader workers" in r.getMessage() for r in caplog.records)
    assert sorted(_indices(loader)) == list(range(10))


def test_trap_shuffle_before_decode(folder_shards):
    loader = make_train_loader(folder_shards, None, batch_size=4, steps_per_epoch=2, image_size=8, num_workers=0)
    stages = loader.loader.pipeline[0].dataset.pipeline  # WebLoader -> DataLoader -> our DataPipeline
    kinds = [type(s) for s in stages]
    # the buffer holds raw bytes (~KB per sample), not decoded float tensors (~600 KB at 224 px)
    assert kinds.index(_Shuffle) < kinds.index(_Process)


# ----------------------------------------------------------------------------------------------- bad samples


def _jpeg(i: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(i).integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture()
def damaged(tmp_path):
    """Two shards of 12; shard 0: index 3 a corrupt JPEG, index 6 not in the sidecar, index 11's image member cut
    off by the end of the file (a truncated tar). 21 good samples."""
    out = tmp_path / "d"
    out.mkdir()
    shards = []
    for s in range(2):
        path = out / f"shard-{s:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(s * 12, s * 12 + 12):
                data = _jpeg(i) if i != 3 else b"\xff\xd8\xff\xe0" + b"\x00" * 64
                info = tarfile.TarInfo(f"t-{i:08d}.jpg")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        shards.append({"name": path.name, "num_samples": 12})
    raw = (out / "shard-00000.tar").read_bytes()
    cut = raw.index(b"t-00000011.jpg") + 512 + 100  # inside the data of the last member
    (out / "shard-00000.tar").write_bytes(raw[:cut])
    (out / "manifest.json").write_text(json.dumps({"shards": shards, "total": 24}))
    ids = np.arange(24, dtype=np.int32) % 3
    ids[6] = -1
    np.save(tmp_path / "ids.npy", ids)
    return out, tmp_path / "ids.npy"


@pytest.mark.parametrize("workers", [0, 2])
def test_damaged_shard_good_samples_and_exact_counts(damaged, workers):
    out, ids = damaged
    batches = list(make_train_loader(out, ids, batch_size=3, steps_per_epoch=7, image_size=8, num_workers=workers,
                                     resampled=False))
    assert len(batches) == 7
    assert sorted(_indices(batches)) == [i for i in range(24) if i not in (3, 6, 11)]
    total = dict.fromkeys(SKIP_REASONS, 0)
    for b in batches:
        for r, c in b["skipped"].items():
            total[r] += c
    assert total == dict(dict.fromkeys(SKIP_REASONS, 0), decode_error=1, missing_cluster=1, truncated_tar=1)


def test_damaged_rank_short_tops_up(damaged, caplog):
    out, ids = damaged
    with caplog.at_level(logging.WARNING, logger="moce_ds"):
        batches = list(make_train_loader(out, ids, batch_size=3, steps_per_epoch=None, image_size=8, num_workers=0,
                                         resampled=False))
    assert len(batches) == epoch_batches([12, 12], 3, 1) == 8  # 21 good samples give 7; one topped up
    assert any("topping up 1 batch" in r.getMessage() for r in caplog.records)


def test_truncated_tar_strict_names_shard_and_key(damaged):
    out, _ = damaged
    loader = make_train_loader(out / "shard-00000.tar", None, batch_size=2, steps_per_epoch=20, image_size=8,
                               num_workers=0, resampled=False, strict=True, shuffle_buffer=0)
    with pytest.raises(ValueError) as e:
        list(loader)
    msg = str(e.value)
    assert "decode_error" in msg and "t-00000003" in msg  # the first bad sample in stream order
    # without a manifest the loss is counted as the one sample being read when the file ended
    loader = make_train_loader([str(out / "shard-00000.tar")], None, batch_size=1, steps_per_epoch=10, image_size=8,
                               num_workers=0, resampled=False, shuffle_buffer=0)
    got = list(loader)
    assert len(got) == 10 and sum(b["skipped"]["truncated_tar"] for b in got) == 1


def test_pinned_memory_flag(folder_shards):
    loader = make_train_loader(folder_shards, None, batch_size=4, steps_per_epoch=1, image_size=8, num_workers=0)
    assert loader.loader.pipeline[0].pin_memory == torch.cuda.is_available()
