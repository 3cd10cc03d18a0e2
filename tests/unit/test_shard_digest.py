"""The manifest's sha256 is checked while a shard streams: a flipped byte is counted as a bad shard and named (an
error under data.strict), a partial read is not checked."""

import hashlib
import json
import tarfile
from pathlib import Path

import pytest

from moce_ds.data.loader import SKIP_REASONS, make_train_loader
from moce_ds.data.make_shards import make_shards
from moce_ds.data.sources import SKIP_MARKER, read_tar_samples, resolve_shards
from tests.unit.test_data_make_shards import make_image_folder


def _shards(root: Path, per_shard: int) -> Path:
    make_image_folder(root / "src", per_class=6, corrupt=False)  # 18 images, JPEG and PNG
    make_shards(root / "shards", image_folder=root / "src", max_per_shard=per_shard, progress=False)
    return root / "shards"


def _flip_byte(shard: Path) -> None:
    """Flip one byte in the middle of the first image member's data (the tar's structure stays intact)."""
    with tarfile.open(shard) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith((".jpg", ".png")))
    raw = bytearray(shard.read_bytes())
    raw[member.offset_data + member.size // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))


def _epoch(source, **kw) -> list[dict]:
    args = dict(batch_size=2, steps_per_epoch=None, image_size=8, num_workers=0, resampled=False, shuffle_buffer=0)
    return list(make_train_loader(source, None, **{**args, **kw}))


def _bad_shards(batches: list[dict]) -> int:
    return sum(b["skipped"]["bad_shard"] for b in batches)


def test_manifest_digests_reach_the_source(tmp_path):
    shards = _shards(tmp_path, per_shard=5)
    src = resolve_shards(shards)
    manifest = json.loads((shards / "manifest.json").read_text())
    assert src.sha256 == [s["sha256"] for s in manifest["shards"]] and len(src.sha256) == 4
    assert resolve_shards(str(shards / "shard-{00000..00003}.tar")).sha256 is None  # no manifest, nothing to check
    batches = _epoch(shards)
    assert sum(b["images"].shape[0] for b in batches) == 18 and _bad_shards(batches) == 0  # intact shards pass


@pytest.mark.parametrize("workers", [0, 1])
def test_flipped_byte_is_counted_and_names_shard_digests_and_fix(tmp_path, workers, caplog):
    shards = _shards(tmp_path, per_shard=5)
    bad = shards / "shard-00001.tar"
    expected = json.loads((shards / "manifest.json").read_text())["shards"][1]["sha256"]
    _flip_byte(bad)
    actual = hashlib.sha256(bad.read_bytes()).hexdigest()
    batches = _epoch(shards, num_workers=workers)
    assert _bad_shards(batches) == 1
    if workers == 0:  # the warning is logged in the worker process otherwise
        msg = next(r.getMessage() for r in caplog.records if "bad_shard" in r.getMessage())
        assert str(bad) in msg and expected in msg and actual in msg
        assert "make_shards.py" in msg and "--verify" in msg and "restore the file" in msg
    assert sum(b["skipped"]["decode_error"] for b in batches) == 1  # this flip also broke its image


def test_a_damaged_shard_whose_images_still_decode_stops_a_strict_run(tmp_path):
    shards = _shards(tmp_path, per_shard=5)
    bad = shards / "shard-00001.tar"
    raw = bytearray(bad.read_bytes())
    raw[-1] ^= 0xFF  # inside the end-of-archive zeros: every member reads as before, only the digest differs
    bad.write_bytes(bytes(raw))
    actual = hashlib.sha256(bytes(raw)).hexdigest()
    batches = _epoch(shards)
    assert _bad_shards(batches) == 1 and sum(b["images"].shape[0] for b in batches) == 18
    with pytest.raises(ValueError, match=rf"bad sample \(bad_shard\): shard {bad}.*sha256 is {actual}.*strict mode"):
        _epoch(shards, strict=True)


def test_partial_read_is_not_checked(tmp_path):
    shards = _shards(tmp_path, per_shard=18)  # one shard holds everything
    shard = shards / "shard-00000.tar"
    _flip_byte(shard)
    digests = {str(shard): resolve_shards(shards).sha256[0]}
    stream = read_tar_samples(iter([{"url": str(shard)}]), {str(shard): 18}, digests)
    first = [next(stream) for _ in range(3)]
    stream.close()  # the consumer stops mid-shard: no verdict, no error
    assert [s["__key__"] for s in first] == ["img-00000000", "img-00000001", "img-00000002"]
    # the epoch ends mid-shard, in both modes: nothing reported
    assert _bad_shards(_epoch(shards, steps_per_epoch=2)) == 0
    assert _bad_shards(_epoch(shards, steps_per_epoch=2, resampled=True)) == 0
    assert _bad_shards(_epoch(shards)) == 1  # read to the end: caught


def test_cut_short_shard_is_still_counted_not_a_digest_error(tmp_path):
    shards = _shards(tmp_path, per_shard=9)
    shard = shards / "shard-00000.tar"
    with tarfile.open(shard) as tar:
        last = tar.getmembers()[-1]
    shard.write_bytes(shard.read_bytes()[: last.offset_data + 1])  # cut inside the last member's data
    src = resolve_shards(shards)
    urls = [{"url": u} for u in src.urls]
    out = list(read_tar_samples(iter(urls), dict(zip(src.urls, src.counts)), dict(zip(src.urls, src.sha256))))
    markers = [s for s in out if SKIP_MARKER in s]
    assert len(out) == 18 and len(markers) == 1 and markers[0][SKIP_MARKER] == "truncated_tar"  # no bad_shard
    skipped = dict.fromkeys(SKIP_REASONS, 0)
    for b in _epoch(shards, steps_per_epoch=8):
        for r, c in b["skipped"].items():
            skipped[r] += c
    assert skipped["truncated_tar"] == 1


def test_the_named_fix_repairs_the_shard(tmp_path):
    shards = _shards(tmp_path, per_shard=5)
    _flip_byte(shards / "shard-00002.tar")
    assert _bad_shards(_epoch(shards)) == 1
    untouched = (shards / "shard-00000.tar").stat().st_mtime_ns
    make_shards(shards, image_folder=tmp_path / "src", max_per_shard=5, verify=True, progress=False)
    assert (shards / "shard-00000.tar").stat().st_mtime_ns == untouched  # only the damaged shard was rewritten
    batches = _epoch(shards)
    assert sum(b["images"].shape[0] for b in batches) == 18 and _bad_shards(batches) == 0
