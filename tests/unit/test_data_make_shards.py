import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from moce_ds.data.keys import key_index
from moce_ds.data.make_shards import list_image_folder, make_shards

CLASSES = ["n01", "n02", "n03"]
ROOT = Path(__file__).resolve().parents[2]


def make_image_folder(root: Path, per_class: int = 6, corrupt: bool = True) -> dict[str, bytes]:
    """ImageNet-train-like tree: root/<class>/<class>_<i>.JPEG|png; returns relative path -> original bytes."""
    rng = np.random.default_rng(0)
    out = {}
    for c in CLASSES:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            buf = io.BytesIO()
            fmt, ext = ("JPEG", "JPEG") if i % 2 == 0 else ("PNG", "png")
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(buf, format=fmt)
            rel = f"{c}/{c}_{i}.{ext}"
            (root / rel).write_bytes(buf.getvalue())
            out[rel] = buf.getvalue()
    if corrupt:
        (root / "n02" / "n02_bad.JPEG").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return out


def read_all(out: Path, manifest: dict) -> dict[str, dict]:
    urls = [str(out / s["name"]) for s in manifest["shards"]]
    return {s["__key__"]: s for s in wds.WebDataset(urls, shardshuffle=False, nodesplitter=wds.split_by_node)}


def test_image_folder_to_shards(tmp_path):
    originals = make_image_folder(tmp_path / "src")
    m = make_shards(tmp_path / "out", image_folder=tmp_path / "src", max_per_shard=4, workers=2, progress=False)
    classes, files = list_image_folder(tmp_path / "src")
    assert classes == CLASSES and m["classes"] == CLASSES
    assert m["num_indices"] == len(files) == 19 and m["total"] == 18 and m["num_corrupt"] == 1
    assert m["corrupt_examples"][0]["src"] == "n02/n02_bad.JPEG"
    assert [s["num_samples"] + s["num_corrupt"] for s in m["shards"]] == [4, 4, 4, 4, 3]
    assert json.loads((tmp_path / "out" / "manifest.json").read_text()) == m
    samples = read_all(tmp_path / "out", m)
    assert len(samples) == 18
    for i, (rel, label) in enumerate(files):
        key = f"img-{i:08d}"
        if rel.endswith("bad.JPEG"):
            assert key not in samples  # the corrupt image keeps its index: later keys do not shift
            continue
        s = samples[key]
        assert int(s["cls"]) == label == CLASSES.index(rel.split("/")[0])
        ext = "jpg" if rel.endswith(".JPEG") else "png"
        assert s[ext] == originals[rel]  # stored bytes passed through untouched
    assert not [p for p in (tmp_path / "out").iterdir() if ".tmp-" in p.name]


def test_num_shards_reencode_and_no_labels(tmp_path):
    make_image_folder(tmp_path / "src", corrupt=False)
    m = make_shards(tmp_path / "out", image_folder=tmp_path / "src", num_shards=4, encode="jpg", labels=False,
                    key_prefix="inet", progress=False)
    assert [s["num_samples"] for s in m["shards"]] == [4, 5, 4, 5] and "classes" not in m
    samples = read_all(tmp_path / "out", m)
    assert sorted(key_index(k) for k in samples) == list(range(18))
    assert all({k for k in s if not k.startswith("__")} == {"jpg"} for s in samples.values())
    assert all(k.startswith("inet-") for k in samples)


def test_resume_skips_finished_shards(tmp_path):
    make_image_folder(tmp_path / "src")
    out = tmp_path / "out"
    m1 = make_shards(out, image_folder=tmp_path / "src", max_per_shard=5, workers=2, progress=False)
    names = [s["name"] for s in m1["shards"]]
    # an interrupted run: one shard lost, one half-written temp file, one shard cut short (its record disagrees)
    (out / names[1]).unlink()
    (out / f".{names[2]}.tmp-4242").write_bytes(b"half")
    with open(out / names[3], "r+b") as f:
        f.truncate(1024)
    before = {n: os.stat(out / n).st_mtime_ns for n in (names[0], names[2])}
    os.utime(out / names[0], ns=(1, 1))  # marks: a skipped shard keeps these times
    m2 = make_shards(out, image_folder=tmp_path / "src", max_per_shard=5, workers=2, progress=False)
    assert os.stat(out / names[0]).st_mtime_ns == 1  # untouched
    assert os.stat(out / names[2]).st_mtime_ns == before[names[2]]
    assert (out / names[1]).is_file() and os.path.getsize(out / names[3]) > 1024
    assert not list(out.glob(".*.tmp-*"))
    assert m2["shards"] == m1["shards"]  # rewritten shards are byte-identical (same sha256)
    # a changed source image invalidates only its shard (the done-record's fingerprint holds the file sizes)
    (tmp_path / "src" / "n01" / "n01_0.JPEG").write_bytes(_jpeg())
    m3 = make_shards(out, image_folder=tmp_path / "src", max_per_shard=5, workers=1, progress=False)
    assert os.stat(out / names[0]).st_mtime_ns != 1
    assert [s["sha256"] for s in m3["shards"][1:]] == [s["sha256"] for s in m1["shards"][1:]]
    with tarfile.open(out / names[0]) as t:
        assert t.getnames()[0] == "img-00000000.jpg"


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (9, 9), (200, 10, 10)).save(buf, format="JPEG")
    return buf.getvalue()


def test_embedded_source(tmp_path, embedded_cache):
    m = make_shards(tmp_path / "out", embedded=True, num_shards=3, workers=1, progress=False, cache_dir=embedded_cache)
    assert m["total"] == m["num_indices"] > 4000 and len(m["shards"]) == 3
    assert m["classes"][0] == "digits"
    with tarfile.open(tmp_path / "out" / m["shards"][0]["name"]) as t:
        names = t.getnames()[:2]
    assert names[0].endswith(".png") and names[1].endswith(".cls")


def test_bad_arguments(tmp_path):
    make_image_folder(tmp_path / "src", corrupt=False)
    with pytest.raises(ValueError, match="exactly one"):
        make_shards(tmp_path / "o", image_folder=tmp_path / "src", max_per_shard=2, num_shards=2)
    with pytest.raises(ValueError, match="does not exist"):
        make_shards(tmp_path / "o", image_folder=tmp_path / "missing", max_per_shard=2)
    with pytest.raises(ValueError, match="a-z0-9_"):
        make_shards(tmp_path / "o", image_folder=tmp_path / "src", max_per_shard=2, key_prefix="Bad.Prefix")


@pytest.mark.parametrize("where", ["inside", "same", "nested"])
def test_output_inside_the_image_folder_is_refused_before_writing(tmp_path, where):
    make_image_folder(tmp_path / "src", corrupt=False)
    out = {"inside": tmp_path / "src" / "shards", "same": tmp_path / "src",
           "nested": tmp_path / "src" / "n01" / "x" / ".." / "shards"}[where]
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(ValueError) as e:
        make_shards(out, image_folder=tmp_path / "src", max_per_shard=4, progress=False)
    msg = str(e.value)
    assert "\n" not in msg and str(out.resolve()) in msg and str((tmp_path / "src").resolve()) in msg
    assert "relabel" in msg and f"e.g. to {(tmp_path / 'src').resolve().parent / 'src-shards'}" in msg
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written


def test_launcher_refuses_output_inside_input_in_one_line(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_shards_launcher", ROOT / "launchers" / "make_shards.py")
    launcher = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launcher)
    main = launcher.main
    make_image_folder(tmp_path / "src", corrupt=False)
    assert main([str(tmp_path / "src"), str(tmp_path / "src" / "out"), "--max-per-shard", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: output folder ") and "\n" not in err
    assert not (tmp_path / "src" / "out").exists()
    # beside the image folder is fine, and so is the image folder inside the output folder
    assert main([str(tmp_path / "src"), str(tmp_path / "src-shards"), "--max-per-shard", "4", "--workers", "1"]) == 0
    assert main([str(tmp_path / "src"), str(tmp_path), "--max-per-shard", "4", "--workers", "1"]) == 0


def test_every_image_extension_is_listed(tmp_path):
    from moce_ds.data.images import IMAGE_EXTS

    (tmp_path / "src").mkdir()
    for i, ext in enumerate(IMAGE_EXTS):
        fmt = {"jpg": "JPEG", "jpeg": "JPEG", "tif": "TIFF", "tiff": "TIFF"}.get(ext, ext.upper())
        Image.new("RGB", (5, 5), (i, 0, 0)).save(tmp_path / "src" / f"a{i}.{ext.upper()}", format=fmt)
    (tmp_path / "src" / "notes.txt").write_text("not an image")
    _, files = list_image_folder(tmp_path / "src")
    assert len(files) == len(IMAGE_EXTS)
    m = make_shards(tmp_path / "out", image_folder=tmp_path / "src", num_shards=1, progress=False)
    assert m["total"] == len(IMAGE_EXTS) and m["num_corrupt"] == 0
