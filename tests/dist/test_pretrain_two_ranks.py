"""Two real ranks on CPU (deepspeed launcher, gloo), expert parallel ep_size=2, ZeRO-2."""

from __future__ import annotations

import pytest
import torch

from moce_ds.metrics import read_jsonl
from tests.dist.launch import WORKER, run_deepspeed, write_ds_config
from tests.dist.launch import two_rank_overrides as _overrides

pytestmark = pytest.mark.timeout(900)


@pytest.fixture
def trained(two_rank_run):
    return two_rank_run


def test_loss_falls_with_experts_split_over_two_ranks(trained):
    run, _ = trained
    log = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in log] == list(range(1, 41))
    first, last = sum(r["loss"] for r in log[:5]) / 5, sum(r["loss"] for r in log[-5:]) / 5
    assert last < 0.75 * first, (first, last)
    # every step routed the global batch (2 ranks x 16 images) through each MoE layer
    for layer in log[-1]["expert_load"].values():
        assert sum(layer["tokens_requested"]) == 2 * 16 * 17  # 1 cls + 16 kept patches per image
        assert sum(layer["images"]) >= 2 * 16 * 0.9


def test_local_experts_differ_between_ranks_shared_weights_identical(trained):
    run, _ = trained
    s0, s1 = (torch.load(run / f"state_rank{r}.pt", weights_only=True) for r in (0, 1))
    assert s0.keys() == s1.keys()
    expert_keys = [k for k in s0 if "deepspeed_experts" in k]
    shared_keys = [k for k in s0 if k not in expert_keys]
    assert len(expert_keys) == 3 * 2 * 4  # 3 MoE layers x 2 local experts x (fc1, fc2) x (weight, bias)
    assert all(torch.equal(s0[k], s1[k]) for k in shared_keys)
    assert all(not torch.equal(s0[k], s1[k]) for k in expert_keys if k.endswith("weight"))
    assert any("gate.cluster_table" in k for k in shared_keys)


def test_checkpoint_holds_every_expert_and_the_gate(trained):
    run, _ = trained
    tag = (run / "checkpoints" / "latest").read_text().strip()
    files = {p.name for p in (run / "checkpoints" / tag).iterdir()}
    for layer in range(3):
        for expert in range(4):
            assert f"layer_{layer}_expert_{expert}_mp_rank_00_model_states.pt" in files
    shared = torch.load(run / "checkpoints" / tag / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    s0 = torch.load(run / "state_rank0.pt", weights_only=True)
    gate_keys = [k for k in s0 if ".gate." in k]
    assert gate_keys and all(torch.equal(shared[k], s0[k]) for k in gate_keys)


def test_resume_reproduces_the_uninterrupted_losses(trained, tmp_path, embedded_cache):
    run, ds = trained
    resumed = tmp_path / "resumed"
    run_deepspeed(WORKER, [str(ds), *_overrides(resumed, embedded_cache, 25)])
    run_deepspeed(WORKER, [str(ds), "--resume", *_overrides(resumed, embedded_cache, 40)])
    full = {r["step"]: r["loss"] for r in read_jsonl(run / "metrics.jsonl")}
    again = {r["step"]: r["loss"] for r in read_jsonl(resumed / "metrics.jsonl")}
    assert sorted(again) == list(range(1, 41))
    for step in (26, 27, 40):
        assert again[step] == pytest.approx(full[step], rel=1e-5, abs=1e-6), step
    # gate weights survive the save -> load round trip
    s_full = torch.load(run / "state_rank0.pt", weights_only=True)
    s_again = torch.load(resumed / "state_rank0.pt", weights_only=True)
    for k in (k for k in s_full if ".gate." in k):
        assert torch.allclose(s_full[k], s_again[k], atol=1e-5), k


def test_bf16_config_trains_with_experts_split(tmp_path, embedded_cache):
    """The GPU config's precision path (bf16 params, fp32 buffers) on two CPU ranks."""
    ds = write_ds_config(tmp_path / "bf16.json", micro_batch=8, bf16={"enabled": True})
    run = tmp_path / "bf16"
    run_deepspeed(WORKER, [str(ds), *_overrides(run, embedded_cache, 3)])
    log = read_jsonl(run / "metrics.jsonl")
    assert len(log) == 3 and all(r["loss"] == r["loss"] and r["loss"] < 10 for r in log)  # finite, sane
    state = torch.load(run / "state_rank0.pt", weights_only=True)
    assert state["blocks.0.mlp.fc1.weight"].dtype == torch.bfloat16

    # what customisation and evaluation read: the optimizer's fp32 masters (rebuilt over both ranks' partitions,
    # rank 1's experts 2 and 3 under their global ids), not the bf16 module copies
    from moce_ds.checkpoints import latest_tag, load_pretrained

    tag_dir = run / "checkpoints" / latest_tag(run / "checkpoints")
    saved = torch.load(tag_dir / "mp_rank_00_model_states.pt", weights_only=True)["module"]
    for f in tag_dir.glob("layer_*_expert_*_mp_rank_00_model_states.pt"):
        saved.update(torch.load(f, weights_only=True))
    loaded = dict(load_pretrained(run).model.named_parameters())
    assert {k for k in saved if ".deepspeed_experts.3." in k} <= set(loaded)
    finer = 0
    for name, weight in loaded.items():
        assert weight.dtype == torch.float32
        assert torch.equal(weight.detach().to(torch.bfloat16), saved[name]), name  # the bf16 copy of this master
        finer += not torch.equal(weight.detach(), saved[name].float())
    assert finer > 0.9 * len(loaded)  # fp32 precision the bf16 copies lost
