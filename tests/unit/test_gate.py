import types

import pytest
import torch
from deepspeed.runtime.engine import DeepSpeedEngine

from moce_ds.config import load_config
from moce_ds.model import build_model
from moce_ds.moe import ClusterGate, MoEMlp


def _gate(**kw) -> ClusterGate:
    torch.manual_seed(0)
    args = dict(num_clusters=8, embed_dim=16, num_experts=4, k=1, capacity_factor=100.0, eval_capacity_factor=100.0,
                min_capacity=1, drop_tokens=True, noise_std=0.0)
    args.update(kw)
    return ClusterGate(**args)


def _routes(gate: ClusterGate, clusters: torch.Tensor, seq: int, d: int = 16):
    tokens = torch.randn(clusters.shape[0] * seq, d)  # token features must not matter
    routes = gate.plan(gate.image_logits(clusters)[None], seq).layer(0)
    return gate(tokens, routes)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_all_tokens_of_an_image_share_their_experts(k):
    gate = _gate(k=k, noise_std=1.0)  # noise on: still drawn per image
    gate.train()
    clusters = torch.randint(0, 8, (12,))
    out = _routes(gate, clusters, seq=5)
    indices = out[3]  # (k, S)
    assert indices.shape == (k, 12 * 5)
    per_image = indices.reshape(k, 12, 5)
    assert (per_image == per_image[:, :, :1]).all()
    assert (indices >= 0).all()  # capacity 100x: nothing dropped


def test_logits_depend_only_on_the_cluster_id():
    gate = _gate().eval()
    a = _routes(gate, torch.tensor([3, 3, 5]), seq=4)
    b = _routes(gate, torch.tensor([3, 3, 5]), seq=4)  # different random token features
    assert torch.equal(a[3], b[3]) and torch.allclose(a[5], b[5])
    logits = gate.image_logits(torch.tensor([3, 3, 5]))
    assert torch.equal(logits[0], logits[1]) and not torch.equal(logits[0], logits[2])


def test_capacity_drops_tokens_beyond_it_and_dropless_keeps_all():
    gate = _gate(capacity_factor=1.0, min_capacity=1)
    with torch.no_grad():
        gate.cluster_table.zero_()
        gate.cluster_table[:, 0] = 1.0
        gate.wg.weight.zero_()
        gate.wg.weight[2, 0] = 5.0  # every cluster -> expert 2
    gate.train()
    out = _routes(gate, torch.zeros(8, dtype=torch.long), seq=4)
    capacity = int(out[1])
    assert capacity == 8  # ceil(32 tokens / 4 experts * 1.0)
    kept = out[3][0]
    assert (kept == 2).sum() == capacity and (kept == -1).sum() == 32 - capacity
    assert out[6].tolist() == [0, 0, 32, 0]  # requested counts are taken before dropping

    dropless = _gate(capacity_factor=1.0, min_capacity=1, drop_tokens=False)
    dropless.load_state_dict(gate.state_dict())
    out = _routes(dropless, torch.zeros(8, dtype=torch.long), seq=4)
    assert (out[3][0] == 2).all() and int(out[1]) == 32


def test_gradients_reach_the_cluster_table_and_gate_weights():
    cfg = load_config([], ["moe.routing=cluster", "moe.num_clusters=8"])
    model = build_model(cfg)
    out = model(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]))
    out.loss.backward()
    for _, moe in model.moe_layers():
        table = moe.gate.cluster_table.grad
        assert table is not None and table[:4].abs().sum() > 0
        assert table[4:].abs().sum() == 0  # clusters absent from the batch get no gradient
        assert moe.gate.wg.weight.grad.abs().sum() > 0


def test_aux_loss_reaches_the_objective_with_its_weight():
    images, clusters = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    losses = {}
    for w in (0.0, 1.0):
        cfg = load_config([], [f"moe.aux_loss_weight={w}", "moe.gate_noise_std=0"])
        model = build_model(cfg)
        torch.manual_seed(1)
        out = model(images, clusters)
        losses[w] = out
    assert torch.allclose(losses[0.0].recon_loss, losses[1.0].recon_loss)
    assert losses[1.0].aux_loss > 0
    assert torch.allclose(losses[1.0].loss, losses[1.0].recon_loss + losses[1.0].aux_loss)
    assert torch.allclose(losses[0.0].loss, losses[0.0].recon_loss)


def test_cluster_id_outside_the_table_is_a_clear_error():
    model = build_model(load_config([], ["moe.num_clusters=8"]))
    with pytest.raises(ValueError, match="cluster id 8 is outside the gate's table of 8 clusters"):
        model(torch.randn(2, 3, 32, 32), torch.tensor([1, 8]))


@pytest.mark.parametrize("routing", ["cluster", "token"])
def test_deepspeed_checkpoint_split_keeps_gate_weights_out_of_expert_files(routing):
    model = build_model(load_config([], [f"moe.routing={routing}"]))
    full = model.state_dict()
    non_expert = DeepSpeedEngine._get_non_moe_state_dict(types.SimpleNamespace(module=model), dict(full))
    gate_keys = [k for k in full if ".gate." in k]
    assert gate_keys and all(k in non_expert for k in gate_keys)  # saved with the shared weights
    expert_keys = set(full) - set(non_expert)
    assert expert_keys and all("deepspeed_experts" in k for k in expert_keys)
    assert all(isinstance(m.mlp, MoEMlp) for i, m in enumerate(model.blocks) if i in model.moe_blocks)
