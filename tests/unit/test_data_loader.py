import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from moce_ds.data.keys import make_key
from moce_ds.data.loader import IMAGENET_MEAN, IMAGENET_STD, SKIP_REASONS, make_train_loader
from moce_ds.data.shard_writer import write_shards


def _png(i: int) -> bytes:
    rng = np.random.default_rng(i)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _shards(out: Path, n: int, per_shard: int, bad: dict[int, bytes] | None = None) -> list[str]:
    bad = bad or {}
    m = write_shards(((make_key(i, "t"), bad.get(i, _png(i)), None) for i in range(n)), out, max_per_shard=per_shard)
    return [str(out / s["name"]) for s in m["shards"]]


@pytest.fixture()
def clean(tmp_path):
    urls = _shards(tmp_path / "s", 60, 20)
    ids = (np.arange(60, dtype=np.int32) * 7) % 5
    np.save(tmp_path / "ids.npy", ids)
    return urls, tmp_path / "ids.npy", ids


def test_exact_batches_and_join(clean):
    urls, path, ids = clean
    batches = list(make_train_loader(urls, path, batch_size=8, steps_per_epoch=5, image_size=16, num_workers=2))
    assert len(batches) == 5
    for b in batches:
        assert b["images"].shape == (8, 3, 16, 16) and b["images"].dtype == torch.float32
        assert b["cluster"].dtype == torch.int64 and b["index"].dtype == torch.int64
        assert b["cluster"].tolist() == ids[b["index"].numpy()].tolist()
        assert b["skipped"] == dict.fromkeys(SKIP_REASONS, 0)
    # normalised with ImageNet statistics: uniform random pixels have mean ~0.5 -> (0.5 - mean) / std
    expect = ((0.5 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)).mean()
    got = torch.cat([b["images"] for b in batches]).mean()
    assert abs(got - expect) < 0.15


def test_no_cluster_table_gives_zeros_and_determinism(clean):
    urls, _, _ = clean
    kw = {"batch_size": 4, "steps_per_epoch": 3, "image_size": 8, "num_workers": 0, "seed": 3}
    a = list(make_train_loader(urls, None, **kw))
    b = list(make_train_loader(urls, None, **kw))
    c = list(make_train_loader(urls, None, epoch=1, **kw))
    assert all((x["cluster"] == 0).all() for x in a)
    assert [x["index"].tolist() for x in a] == [x["index"].tolist() for x in b]
    assert all(torch.equal(x["images"], y["images"]) for x, y in zip(a, b))
    assert [x["index"].tolist() for x in a] != [x["index"].tolist() for x in c]


def test_two_ranks_same_length_different_streams(clean):
    urls, path, _ = clean
    out = []
    for rank in (0, 1):
        bs = list(
            make_train_loader(
                urls, path, batch_size=6, steps_per_epoch=4, image_size=8, num_workers=0, rank=rank, world_size=2
            )
        )
        assert len(bs) == 4 and all(b["images"].shape[0] == 6 for b in bs)
        out.append([b["index"].tolist() for b in bs])
    assert out[0] != out[1]
    with pytest.raises(ValueError):
        make_train_loader(urls, path, batch_size=6, steps_per_epoch=4, image_size=8, rank=2, world_size=2)


@pytest.fixture()
def dirty(tmp_path):
    # one shard of 10: index 3 is a truncated PNG, index 6 has no cluster id -> 8 good samples per pass
    urls = _shards(tmp_path / "s", 10, 10, bad={3: _png(3)[:40]})
    ids = np.arange(10, dtype=np.int32) % 4
    ids[6] = -1
    np.save(tmp_path / "ids.npy", ids)
    return urls, tmp_path / "ids.npy"


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_samples_skipped_and_counted(dirty, workers, caplog):
    urls, path = dirty
    # no shuffle, batch = one pass over the shard: every batch carries exactly the two skips of its pass
    batches = list(
        make_train_loader(
            urls, path, batch_size=8, steps_per_epoch=4, image_size=8, num_workers=workers, shuffle_buffer=0
        )
    )
    assert len(batches) == 4
    for b in batches:
        assert sorted(b["index"].tolist()) == [0, 1, 2, 4, 5, 7, 8, 9]
        assert b["skipped"] == dict(dict.fromkeys(SKIP_REASONS, 0), decode_error=1, missing_cluster=1)
    if workers == 0:  # logged once per reason (worker processes log to their own handlers)
        warnings = [r.getMessage() for r in caplog.records if r.name == "moce_ds" and r.levelname == "WARNING"]
        assert len(warnings) == 2
        assert any("decode_error" in w and "t-00000003" in w for w in warnings)
        assert any("missing_cluster" in w and "t-00000006" in w for w in warnings)


def test_index_beyond_table_is_missing(dirty, tmp_path):
    urls, _ = dirty
    short = np.zeros(8, np.int32)  # indices 8 and 9 are outside the table
    np.save(tmp_path / "short.npy", short)
    (b,) = make_train_loader(
        urls, tmp_path / "short.npy", batch_size=6, steps_per_epoch=1, image_size=8, num_workers=0, shuffle_buffer=0
    )
    assert b["index"].tolist() == [0, 1, 2, 4, 5, 6]
    # by the 6th good sample only index 3 (decode) has been dropped; 8 and 9 come later in the pass
    assert b["skipped"]["decode_error"] == 1 and b["skipped"]["missing_cluster"] == 0


def test_strict_raises_with_shard_and_key(dirty):
    urls, path = dirty
    loader = make_train_loader(
        urls, path, batch_size=8, steps_per_epoch=2, image_size=8, num_workers=0, shuffle_buffer=0, strict=True
    )
    with pytest.raises(ValueError) as e:
        list(loader)
    msg = str(e.value)
    assert "decode_error" in msg and "t-00000003" in msg and urls[0] in msg
