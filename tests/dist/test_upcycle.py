"""Sparse upcycling on real ranks: experts split over 2 ranks start as the dense MAE; pre-training starts from one."""

from __future__ import annotations

import json

import pytest

from moce_ds.checkpoints import load_pretrained
from tests.dist.launch import ROOT, run_deepspeed, write_ds_config

pytestmark = pytest.mark.timeout(300)


def test_ep2_upcycled_moce_computes_the_dense_loss_on_both_ranks(tmp_path):
    run_deepspeed(ROOT / "tests" / "dist" / "workers" / "upcycle_ep2.py", [str(tmp_path)], timeout=240)
    for rank in (0, 1):
        r = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert abs(r["upcycled"] - r["dense"]) < 1e-5, (rank, r)
        assert all(n > 0 for n in r["remote_tokens"]), (rank, r)  # the all-to-all really carried tokens
        # noise comes from (seed, block, global expert id): ep_size=2 draws what ep_size=1 draws
        assert r["noisy_expert_diff"] == 0.0, (rank, r)
        assert abs(r["noisy_loss"] - r["noisy_loss_ep1"]) < 1e-5 and abs(r["noisy_loss"] - r["dense"]) > 1e-6, r


def test_pretraining_starts_from_a_dense_run_with_every_expert_its_dense_mlp(tmp_path, embedded_cache):
    ds = write_ds_config(tmp_path / "ds.json")
    common = [f"data.cache_dir={embedded_cache}", "data.num_workers=0", "train.max_steps=2", "metrics.enabled=false"]
    dense_run, moce_run = tmp_path / "dense", tmp_path / "moce"
    pretrain = ROOT / "launchers" / "pretrain.py"
    run_deepspeed(pretrain, ["--deepspeed_config", str(ds), f"output_dir={dense_run}", "moe.routing=dense", *common],
                  num_gpus=1)
    # a learning rate of ~0: the saved experts are still the copies the run started from
    proc = run_deepspeed(pretrain, ["--deepspeed_config", str(ds), f"output_dir={moce_run}",
                                    f"model.init_from={dense_run}", "moe.top_k=2", "train.lr=1.0e-12",
                                    "train.min_lr=0", *common], num_gpus=1)
    log = (moce_run / "logs" / "rank0.log").read_text()
    assert "init_from (run layout): run checkpoint 'step00000002'" in log and "with its decoder" in log, proc.stdout
    # upcycled first, then the gate tables from the round's centroids
    assert log.index("init_from (run layout)") < log.index("cluster tables start:")
    dense, moce = load_pretrained(dense_run).model, load_pretrained(moce_run).model
    ref = dense.state_dict()
    for block, layer in moce.moe_layers():
        for expert in layer.deepspeed_moe.experts.deepspeed_experts:
            for name, p in expert.named_parameters():
                assert (p - ref[f"blocks.{block}.mlp.{name}"]).abs().max() < 1e-6, (block, name)
    assert (moce.decoder_pred.weight - dense.decoder_pred.weight).abs().max() < 1e-6
    assert (moce.blocks[0].attn.qkv.weight - dense.blocks[0].attn.qkv.weight).abs().max() < 1e-6
