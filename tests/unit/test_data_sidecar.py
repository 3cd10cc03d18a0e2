import numpy as np
import pytest

from moce_ds.data.sidecar import check_round_matches, latest_round, list_rounds, load_round, load_round_at, write_round


def test_write_and_load_rounds(tmp_path):
    assert latest_round(tmp_path / "clusters") is None
    ids = np.array([0, 1, 1, -1, 2], np.int64)
    cents = np.random.default_rng(0).normal(size=(3, 4))
    r0 = write_round(tmp_path / "clusters", ids, cents, feature_source="pix", extra={"seed": 5})
    assert (r0.round, r0.k) == (0, 3)
    assert r0.path.name == "round_0000"
    assert r0.ids().dtype == np.int32 and r0.ids().tolist() == ids.tolist()
    assert isinstance(r0.ids(), np.memmap) and not isinstance(r0.ids(mmap=False), np.memmap)
    assert r0.centroids().dtype == np.float32 and np.allclose(r0.centroids(), cents, atol=1e-6)
    m = r0.manifest
    assert m["cluster_sizes"] == [1, 2, 1] and m["num_images"] == 5 and m["feature_source"] == "pix"
    assert m["seed"] == 5 and "created" in m
    r1 = write_round(tmp_path / "clusters", ids, cents, feature_source="pix")
    assert r1.round == 1
    assert latest_round(tmp_path / "clusters").round == 1
    assert load_round(tmp_path / "clusters", 0).manifest == r0.manifest


def test_leftover_temp_dir_ignored(tmp_path):
    root = tmp_path / "clusters"
    write_round(root, np.zeros(3), np.zeros((1, 2)), "pix")
    # a crash mid-write leaves a temp folder (possibly with partial files): it must stay invisible
    crashed = root / ".round_0001.tmp-99999"
    crashed.mkdir()
    np.save(crashed / "ids.npy", np.zeros(3, np.int32))
    (root / "round_0002").mkdir()  # a folder without manifest is not a round either
    assert latest_round(root).round == 0
    assert write_round(root, np.zeros(3), np.zeros((1, 2)), "pix").round == 1
    assert not any(p.name.startswith(".round_0001.tmp-") and p != crashed for p in root.iterdir())


def test_invalid_ids_rejected(tmp_path):
    with pytest.raises(ValueError, match="ids must lie in"):
        write_round(tmp_path, np.array([0, 3]), np.zeros((3, 2)), "pix")
    assert latest_round(tmp_path) is None
    assert list(tmp_path.iterdir()) == []


def test_k_mismatch_message(tmp_path):
    r = write_round(tmp_path, np.zeros(4), np.zeros((16, 2)), "pix")
    check_round_matches(r, 16)
    with pytest.raises(ValueError) as e:
        check_round_matches(r, 8)
    msg = str(e.value)
    assert "\n" not in msg
    assert "k=16" in msg and "moe.num_clusters=8" in msg
    assert "set moe.num_clusters=16" in msg and "re-cluster with k=8" in msg


def test_list_rounds_complete_folders_by_number(tmp_path):
    root = tmp_path / "clusters"
    assert list_rounds(root) == []  # no folder yet
    for _ in range(3):
        write_round(root, np.zeros(3), np.zeros((1, 2)), "pix")
    # a round numbered past 9999 sorts after round_0002 by number (by name it would come first)
    big = root / "round_10000"
    (root / "round_0002").rename(big)
    (big / "manifest.json").write_text((big / "manifest.json").read_text().replace('"round": 2', '"round": 10000'))
    (root / ".round_0003.tmp-123").mkdir()  # an interrupted write
    (root / "round_0004").mkdir()  # no manifest: not complete
    (root / "round_x").mkdir()
    (root / "round_0005").write_text("a file, not a folder")
    assert [p.name for p in list_rounds(root)] == ["round_0000", "round_0001", "round_10000"]
    assert [load_round_at(p).round for p in list_rounds(root)] == [0, 1, 10000]
    assert latest_round(root).round == 10000
    assert write_round(root, np.zeros(3), np.zeros((1, 2)), "pix").round == 10001
