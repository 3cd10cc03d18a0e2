"""launchers/cluster.py in process: --k checked before featurising, one consistent image count, the rank's
device binding and threads, --device passed to the feature extractor (issues 14, 15, 16, 17)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from moce_ds.data.images import png_bytes
from moce_ds.data.keys import make_key
from moce_ds.data.shard_writer import write_shards
from tests.script_module import load_script

BAD = (3, 7, 11)  # samples whose image does not decode


def _shards(root: Path, n: int = 40, start: int = 0, prefix: str = "s") -> Path:
    """n 32 px images in shards of 16 (global indices start..), the BAD ones undecodable."""
    imgs = np.random.default_rng(start).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    samples = ((make_key(start + i, "img"), b"not a png" if i in BAD else png_bytes(imgs[i]), None) for i in range(n))
    write_shards(samples, root, prefix=prefix, max_per_shard=16)
    return root


@pytest.fixture
def launcher():
    mod = load_script("launchers/cluster.py", "cluster_launcher")
    threads = torch.get_num_threads()
    yield mod
    torch.set_num_threads(threads)  # --threads changes this process's pool


def _run(launcher, capsys, *args: str) -> tuple[int, list[str]]:
    rc = launcher.main([*args, "--comm", "local"])
    return rc, capsys.readouterr().err.strip().splitlines()


def test_k_above_the_listed_images_is_refused_before_featurising(tmp_path, launcher, capsys):
    data, out = _shards(tmp_path / "shards"), tmp_path / "clusters"
    rc, err = _run(launcher, capsys, "--data", str(data), "--k", "1000", "--out", str(out))
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: --k 1000 is more clusters than the 40 images of {data}: pass --k of at most 40")
    assert not out.exists()  # nothing featurised, nothing written


def test_k_above_the_decodable_images_names_both_counts_and_writes_no_round(tmp_path, launcher, capsys):
    data, out = _shards(tmp_path / "shards"), tmp_path / "clusters"
    rc, err = _run(launcher, capsys, "--data", str(data), "--k", "39", "--out", str(out))
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: --k 39 is more clusters than the 37 images of {data} that decode (3 of 40 "
                             f"skipped): pass --k of at most 37")
    assert not list(out.glob("round_*"))


def test_the_round_summary_gives_one_consistent_image_count(tmp_path, launcher, capsys, caplog):
    data, out = _shards(tmp_path / "shards"), tmp_path / "clusters"
    with caplog.at_level(logging.INFO, logger="moce_ds"):
        rc, _ = _run(launcher, capsys, "--data", str(data), "--k", "4", "--out", str(out))
    assert rc == 0
    summary = [r.getMessage() for r in caplog.records if r.getMessage().startswith("round 0: k=4")]
    assert len(summary) == 1 and "over 37 of the 40 images (3 skipped: decode_error 3)" in summary[0], summary
    m = json.loads((out / "round_0000" / "manifest.json").read_text())
    assert (m["num_images"], m["num_unassigned"], sum(m["cluster_sizes"])) == (40, 3, 37)
    assert m["spherical"] is True and m["iterations"] <= 20  # the shared defaults (config schema: 20, spherical)


def test_euclidean_and_iters_flags_reach_the_kmeans(tmp_path, launcher, capsys):
    data, out = _shards(tmp_path / "shards"), tmp_path / "clusters"
    rc, _ = _run(launcher, capsys, "--data", str(data), "--k", "4", "--out", str(out), "--euclidean", "--iters", "2",
                 "--tol", "0")
    m = json.loads((out / "round_0000" / "manifest.json").read_text())
    assert rc == 0 and m["spherical"] is False and m["iterations"] == 2


def test_threads_are_set_through_the_rank_binding(tmp_path, launcher, capsys):
    data = _shards(tmp_path / "shards")
    rc, _ = _run(launcher, capsys, "--data", str(data), "--k", "4", "--out", str(tmp_path / "c"), "--threads", "1")
    assert rc == 0 and torch.get_num_threads() == 1


def test_inconsistent_launcher_variables_stop_with_one_line(tmp_path, launcher, capsys, monkeypatch):
    # mpirun's local rank 1 on a node of 1 process: the binding refuses it before anything is read
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_RANK", "1")
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_SIZE", "1")
    data, out = _shards(tmp_path / "shards"), tmp_path / "clusters"
    rc, err = _run(launcher, capsys, "--data", str(data), "--k", "4", "--out", str(out))
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: OMPI_COMM_WORLD_LOCAL_RANK=1 but the node runs 1")
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_device_reaches_the_extractor_of_both_modes(tmp_path, launcher, capsys):
    data, out = _shards(tmp_path / "shards"), tmp_path / "clusters"
    rc, err = _run(launcher, capsys, "--data", str(data), "--k", "4", "--out", str(out), "--device", "cuda")
    assert rc == 2 and len(err) == 1 and "torch sees no CUDA device: pass --device cpu or auto" in err[0]
    assert _run(launcher, capsys, "--data", str(data), "--k", "4", "--out", str(out), "--device", "auto")[0] == 0
    # --assign-only featurises the new shards with the round's extractor on --device
    more = _shards(tmp_path / "more", n=16, start=40, prefix="more")
    manifest = json.loads((data / "manifest.json").read_text())
    for s in json.loads((more / "manifest.json").read_text())["shards"]:
        (more / s["name"]).rename(data / s["name"])
        manifest["shards"].append(s)
    manifest["total"] = sum(s["num_samples"] for s in manifest["shards"])
    (data / "manifest.json").write_text(json.dumps(manifest))
    rc, err = _run(launcher, capsys, "--data", str(data), "--assign-only", "--out", str(out), "--device", "cuda")
    assert rc == 2 and len(err) == 1 and "torch sees no CUDA device" in err[0]
    assert len(list(out.glob("round_*"))) == 1  # nothing written
    assert _run(launcher, capsys, "--data", str(data), "--assign-only", "--out", str(out), "--device", "cpu")[0] == 0
    assert len(list(out.glob("round_*"))) == 2
