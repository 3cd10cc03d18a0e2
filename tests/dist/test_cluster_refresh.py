"""In-training refresh: 2 real ranks (deepspeed launcher, gloo, ep_size=2) write a new round from their encoder
after epoch 0, and epoch 1 trains on it."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from moce_ds.clustering import feature_sources
from moce_ds.customize import customize
from moce_ds.metrics import read_jsonl
from moce_ds.model import get_spec
from tests.dist.launch import WORKER, run_deepspeed, two_rank_overrides, write_ds_config

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory, embedded_cache):
    """256 embedded images in 4 shards (8 steps per epoch at 2 x 16) with a pixel-feature round 0 (k=16)."""
    from moce_ds.clustering.job import run_clustering
    from moce_ds.data.embedded import build_embedded_dataset
    from moce_ds.data.images import png_bytes
    from moce_ds.data.keys import make_key
    from moce_ds.data.shard_writer import write_shards

    images, _, _ = build_embedded_dataset(embedded_cache).train_images()
    pick = np.linspace(0, len(images) - 1, 256).astype(int)  # every domain
    root = tmp_path_factory.mktemp("refresh") / "shards"
    write_shards(((make_key(i, "img"), png_bytes(images[j]), None) for i, j in enumerate(pick)), root,
                 max_per_shard=64)
    run_clustering(str(root), 16, iters=10, progress=False)
    return root


def test_refresh_writes_a_round_and_the_next_epoch_trains_on_it(tmp_path, small_shards, embedded_cache):
    run = tmp_path / "run"
    ds = write_ds_config(tmp_path / "ds.json", micro_batch=16)
    overrides = [*two_rank_overrides(run, embedded_cache, 16), f"data.path={small_shards}", "cluster.refresh_every=1"]
    run_deepspeed(WORKER, [str(ds), *overrides])

    clusters = small_shards / "clusters"
    m = json.loads((clusters / "round_0001" / "manifest.json").read_text())
    assert not (clusters / "round_0002").exists()  # no refresh after the last epoch
    # the round names the checkpoint of the step it was made at (8 steps per epoch) as its feature source
    assert m["refresh_after_epoch"] == 0 and m["feature_source"] == f"moce_ds:{run.resolve()}@step00000008"
    spec = m["feature_extractor"]
    assert spec["kind"] == "checkpoint" and spec["tag"] == "step00000008" and spec["routing"] == "cluster"
    assert spec["routing_round"] == str((clusters / "round_0000").resolve())
    assert m["k"] == 16 and m["num_unassigned"] == 0 and sum(m["cluster_sizes"]) == 256
    assert m["ranks"] == 2 and m["comm"] == "torch.distributed" and m["dim"] == get_spec("mini").embed_dim
    # pixel round -> encoder round: other feature spaces, so ids are matched by shared images
    assert m["matched_to"] == 0 and m["match_method"] == "overlap"

    log = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in log] == list(range(1, 17)) and {r["epoch"] for r in log} == {0, 1}
    assert all(r["loss"] == r["loss"] for r in log)
    tag = (run / "checkpoints" / "latest").read_text().strip()
    meta = json.loads((run / "checkpoints" / tag / "moce_meta.json").read_text())
    assert meta["position"]["cluster_round"].endswith("round_0001")  # epoch 1 routed by the refreshed round
    assert "cluster round 0 -> 1" in (run / "logs" / "rank0.log").read_text()
    # both ranks still hold the same shared weights after the refresh (it ran in lockstep)
    s0, s1 = (torch.load(run / f"state_rank{r}.pt", weights_only=True) for r in (0, 1))
    shared = [k for k in s0 if "deepspeed_experts" not in k]
    assert all(torch.equal(s0[k], s1[k]) for k in shared)

    # that checkpoint outlived pruning (keep_checkpoints=2 would have dropped it for a later epoch's), and
    # customisation on the refreshed round featurises the task with it (routing by round 0 through its pixels)
    assert (run / "checkpoints" / "step00000008" / "moce_meta.json").is_file()
    res = customize(run, "digits", tmp_path / "custom", cache_dir=embedded_cache)
    report = json.loads(res.report["json"].read_text())
    assert report["cluster_round"].endswith("round_0001") and report["feature_source"] == m["feature_source"]
    # with that checkpoint gone, customisation stops in one line naming it and what to pass instead
    shutil.rmtree(run / "checkpoints" / "step00000008")
    feature_sources._build_cached.cache_clear()  # as in a new process
    with pytest.raises(ValueError) as e:
        customize(run, "digits", tmp_path / "custom2", cache_dir=embedded_cache)
    assert "\n" not in str(e.value) and str(run / "checkpoints" / "step00000008") in str(e.value)
    assert "pass --features <run or checkpoint folder" in str(e.value)
    assert not (tmp_path / "custom2").exists()
