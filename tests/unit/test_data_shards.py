import io
import json
import tarfile

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from moce_ds.data.keys import key_index, make_key
from moce_ds.data.shard_writer import sha256_file, write_shards


def _png(v: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((4, 4, 3), v, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_write_and_read_back(tmp_path):
    samples = [(make_key(i, "dom"), _png(i), i % 3 if i % 2 == 0 else None) for i in range(23)]
    m = write_shards(samples, tmp_path, prefix="s", max_per_shard=10)
    assert [s["name"] for s in m["shards"]] == ["s-00000.tar", "s-00001.tar", "s-00002.tar"]
    assert [s["num_samples"] for s in m["shards"]] == [10, 10, 3]
    assert m["total"] == 23
    assert json.loads((tmp_path / "manifest.json").read_text()) == m
    for s in m["shards"]:
        assert sha256_file(tmp_path / s["name"]) == s["sha256"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temp files left behind"

    urls = [str(tmp_path / s["name"]) for s in m["shards"]]
    seen = {}
    for sample in wds.WebDataset(urls, shardshuffle=False, nodesplitter=wds.split_by_node):
        i = key_index(sample["__key__"])
        img = np.asarray(Image.open(io.BytesIO(sample["png"])))
        assert (img == i).all()
        seen[i] = int(sample["cls"]) if "cls" in sample else None
    assert seen == {i: (i % 3 if i % 2 == 0 else None) for i in range(23)}


def test_rejects_dotted_and_duplicate_keys(tmp_path):
    with pytest.raises(ValueError, match="dot"):
        write_shards([("dom.1", _png(0), None)], tmp_path / "a")
    with pytest.raises(ValueError, match="duplicate"):
        write_shards([(make_key(1, "d"), _png(0), None)] * 2, tmp_path / "b")
    # a failed write leaves neither a manifest nor a temp shard behind
    assert not (tmp_path / "b" / "manifest.json").exists()
    assert list((tmp_path / "b").iterdir()) == []


def test_shard_is_valid_tar_with_expected_members(tmp_path):
    write_shards([(make_key(3, "d"), _png(3), 1)], tmp_path)
    with tarfile.open(tmp_path / "shard-00000.tar") as t:
        assert t.getnames() == ["d-00000003.png", "d-00000003.cls"]
