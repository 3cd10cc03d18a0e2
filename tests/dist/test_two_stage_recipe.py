"""The two-stage recipe (benchmarks/two_stage_recipe.py) on two CPU ranks at a tiny budget, through the real CLIs:
dense MAE -> clusters from its encoder -> upcycled MoCE -> customised for a task -> evaluated."""

from __future__ import annotations

import json
import sys

import pytest

from moce_ds.model import get_spec
from tests.dist.launch import ROOT, write_ds_config

pytestmark = pytest.mark.timeout(900)

sys.path.insert(0, str(ROOT / "benchmarks"))


def test_recipe_clusters_by_the_dense_encoder_and_customises_with_it(tmp_path):
    from two_stage_recipe import run_recipe

    ds = write_ds_config(tmp_path / "ds.json", micro_batch=16)
    out = tmp_path / "recipe"
    records = run_recipe(out, ranks=2, dense_epochs=1, moce_epochs=1, max_steps=3, tasks=("digits",), ds_config=ds,
                         extra=("data.num_workers=1", "train.warmup_steps=1"))
    by_stage = {r["stage"]: r for r in records}
    assert set(by_stage) == {"a_dense_mae", "b_cluster", "c_moce_upcycled", "d_customize", "e_evaluate"}

    # (b) made its round from (a)'s encoder: an encoder feature source, mini's width (pixel features are 282 wide)
    manifest = json.loads((out / "cache" / "embedded-v1" / "clusters" / "round_0001" / "manifest.json").read_text())
    spec = manifest["feature_extractor"]
    assert spec["kind"] == "checkpoint" and spec["run"] == str((out / "dense").resolve())
    assert spec["routing"] == "dense" and spec["tag"] == "step00000003"
    assert manifest["dim"] == get_spec("mini").embed_dim and sum(manifest["cluster_sizes"]) == 5008

    # (c) started from (a) and routed by that round
    meta_dir = out / "moce" / "checkpoints" / "step00000003"
    assert json.loads((meta_dir / "moce_meta.json").read_text())["position"]["cluster_round"].endswith("round_0001")
    assert "init_from" in (out / "moce" / "logs" / "rank0.log").read_text()

    # (d) featurised the task with (a)'s encoder, through the round's manifest
    selection = json.loads((out / "moce" / "custom" / "digits" / "selection.json").read_text())
    assert selection["feature_source"] == manifest["feature_source"]
    assert selection["cluster_round"].endswith("round_0001")

    # (e) both models evaluated on the task
    evals = {r["method"]: r for r in records if r["stage"] == "e_evaluate"}
    assert set(evals) == {"moce_customised", "dense_mae"}
    assert all(0.0 <= r["linear_probe_top1"] <= 1.0 for r in evals.values())
    assert "| digits |" in (out / "recipe.md").read_text()
