"""Image-level routing with experts split over two real ranks equals the same layer whole on one rank."""

from __future__ import annotations

import json

import pytest

from tests.conftest import deepspeed_shm_segments
from tests.dist.launch import ROOT, run_deepspeed

pytestmark = pytest.mark.timeout(300)


def test_ep2_layer_equals_ep1_layer_and_a_step_plans_all_layers_with_one_collective(tmp_path):
    before = deepspeed_shm_segments()
    run_deepspeed(ROOT / "tests" / "dist" / "workers" / "ep2_equals_ep1.py", [str(tmp_path)], timeout=240)
    # Each rank removed its DeepSpeed CPU all-reduce segment at exit (DeepSpeed leaves ~65 MB per rank and run).
    assert deepspeed_shm_segments() - before == set()
    for rank in (0, 1):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["drop"]["kept_tokens"] < 60 == result["dropless"]["kept_tokens"]  # 12 images x 5 tokens
        assert result["drop"]["dropped_routes"] > 0 and result["top2_drop"]["dropped_routes"] > 0  # capacity bites
        assert result["dropless"]["dropped_routes"] == 0
        for mode in ("drop", "dropless", "top2_drop"):
            r = result[mode]
            assert r["out_norm"] > 1.0
            assert r["out"] <= 1e-5 and r["x_grad"] <= 1e-5 and r["gate_grad"] <= 1e-5, (rank, mode, r)
            assert r["expert_grad"] <= 1e-4, (rank, mode, r)
        # Three MoE layers, one forward: one all-gather plans them all; the rest is DeepSpeed's 2 all-to-alls per layer.
        for mode in ("drop", "dropless"):
            assert result["collectives"][mode] == {"all_gather": 1, "all_to_all_single": 6}, (rank, mode, result)
