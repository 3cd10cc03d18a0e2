"""Stable ids across rounds, LPT packing, and the clustering job end to end in one process."""

import json

import numpy as np
import pytest
import torch

from moce_ds.clustering.job import run_clustering
from moce_ds.clustering.matching import apply_matching, match_by_centroids, match_by_overlap
from moce_ds.data.keys import make_key
from moce_ds.data.shard_writer import write_shards
from moce_ds.moe.gates import ClusterGate
from moce_ds.moe.packing import expert_images, init_cluster_tables, lpt_pack, route_clusters_to_experts


def test_permuted_centroids_map_back_to_old_ids():
    rng = np.random.default_rng(0)
    old = rng.normal(size=(32, 24)).astype(np.float32)
    perm = rng.permutation(32)
    new = old[perm] + rng.normal(scale=0.01, size=old.shape).astype(np.float32)  # new cluster j = old perm[j]
    new_ids = rng.integers(0, 32, 500)
    got = match_by_centroids(new, old)
    assert np.array_equal(got, perm)
    c, ids = apply_matching(got, new, np.where(np.arange(500) % 7 == 0, -1, new_ids))
    assert np.allclose(c, old, atol=0.05)
    assert np.array_equal(ids[np.arange(500) % 7 != 0], perm[new_ids[np.arange(500) % 7 != 0]])
    assert (ids[np.arange(500) % 7 == 0] == -1).all()


def test_overlap_matching_across_feature_spaces():
    rng = np.random.default_rng(1)
    old_ids = rng.integers(0, 8, 1000)
    perm = rng.permutation(8)
    inv = np.argsort(perm)
    new_ids = inv[old_ids]  # the same partition with other labels ...
    noisy = np.where(rng.random(1000) < 0.1, rng.integers(0, 8, 1000), new_ids)  # ... and 10 % moved
    got = match_by_overlap(noisy, old_ids, 8)
    assert np.array_equal(got, perm)


def test_lpt_packing_balances_better_than_random():
    rng = np.random.default_rng(0)
    sizes = rng.lognormal(5, 1, 256).astype(np.int64)
    packed = expert_images(sizes, lpt_pack(sizes, 8), 8)
    rand = expert_images(sizes, rng.integers(0, 8, 256), 8)
    assert packed.sum() == sizes.sum()
    cv = lambda v: v.std() / v.mean()  # noqa: E731
    assert cv(packed) < 0.02 < cv(rand)
    assert lpt_pack(np.array([5, 4, 3, 3, 3]), 2).tolist() == [0, 1, 1, 0, 1]  # 5+3 | 4+3+3... greedy: 8 | 10


def test_lpt_gate_routes_every_cluster_to_its_packed_expert():
    gate = ClusterGate(num_clusters=16, embed_dim=32, num_experts=4)
    want = lpt_pack(np.arange(1, 17) * 10, 4)
    route_clusters_to_experts(gate, want, margin=4.0, generator=torch.Generator().manual_seed(0))
    gate.eval()
    logits = gate.image_logits(torch.arange(16))
    assert logits.argmax(1).tolist() == want.tolist()
    top2 = logits.topk(2, dim=1).values
    assert torch.allclose(top2[:, 0] - top2[:, 1], torch.full((16,), 4.0), atol=1e-4)  # margin, per cluster
    # table rows keep a random-init-like norm and still differ between clusters of one expert
    assert torch.allclose(gate.cluster_table.norm(dim=1), torch.full((16,), 32**0.5), rtol=1e-4)
    same = np.flatnonzero(want == want[0])
    assert not torch.allclose(gate.cluster_table[same[0]], gate.cluster_table[same[1]])


def test_init_cluster_tables_modes(tmp_path):
    from moce_ds.config import load_config
    from moce_ds.model import build_model

    cfg = load_config([], ["moe.num_clusters=8"])
    model = build_model(cfg, ep_size=1)
    sizes = [50, 10, 10, 10, 40, 30, 5, 5]
    assert init_cluster_tables(model, "lpt", None, sizes, 4.0, seed=0) == "lpt"
    for _, m in model.moe_layers():
        m.gate.eval()
        assert m.gate.image_logits(torch.arange(8)).argmax(1).tolist() == lpt_pack(np.array(sizes), 4).tolist()
    assert init_cluster_tables(model, "random", None, sizes) == "random"
    with pytest.raises(ValueError):
        init_cluster_tables(model, "lpt", None, None)


def test_config_cluster_keys_validated():
    from moce_ds.config import ConfigError, load_config

    assert load_config([], ["cluster.refresh_every=2", "cluster.init_table=lpt"]).cluster.refresh_every == 2
    for bad in ("cluster.init_table=packed", "cluster.refresh_every=-1", "cluster.features=timm", "cluster.iters=0",
                "cluster.lpt_margin=0", "cluster.tol=-1", "cluster.max_images=-5", "cluster.spherical=3"):
        with pytest.raises(ConfigError):
            load_config([], [bad])
    with pytest.raises(ConfigError):
        load_config([], ["cluster.refresh_every=1", "moe.routing=token"])


def _small_shards(root, n=96, per_shard=24):
    from moce_ds.data.images import png_bytes

    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    imgs[: n // 2, :, :, 0] = 255  # two obvious groups: red-saturated and not
    write_shards(((make_key(i, "img"), png_bytes(imgs[i]), None) for i in range(n)), root, max_per_shard=per_shard)
    return root


def test_job_writes_a_round_and_resumes_from_the_feature_cache(tmp_path):
    data = _small_shards(tmp_path / "shards")
    r0 = run_clustering(str(data), 4, iters=10, progress=False)
    assert r0.round == 0 and r0.k == 4
    m = json.loads((r0.path / "manifest.json").read_text())
    assert m["feature_source"] == "pixel_features_v1" and len(m["objective"]) == m["iterations"] >= 1
    assert sum(m["cluster_sizes"]) == 96 and m["num_unassigned"] == 0 and m["matched_to"] is None
    done = sorted((data / "clusters" / "features").glob("*/.done/*.json"))
    assert len(done) == 4
    # a rerun reads the cached features (the shards could be gone) and matches its ids to round 0
    stamp = [p.stat().st_mtime_ns for p in done]
    r1 = run_clustering(str(data), 4, iters=10, progress=False)  # same seed: same partition
    assert [p.stat().st_mtime_ns for p in done] == stamp
    m1 = json.loads((r1.path / "manifest.json").read_text())
    assert r1.round == 1 and m1["matched_to"] == 0 and m1["match_method"] == "centroids"
    assert m1["ids_kept_fraction"] == 1.0
