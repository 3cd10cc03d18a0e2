"""Image-level routing planned once per step: equal to DeepSpeed's gating, whole images, dropless, packed experts."""

import pytest
import torch
from deepspeed.moe.sharded_moe import top1gating, top2gating

from moce_ds.config import load_config
from moce_ds.metrics import ExpertLoadMeter
from moce_ds.model import build_model
from moce_ds.moe import MoEMlp, image_capacity, plan_image_routes

_MOE = dict(routing="cluster", num_experts=4, ep_size=1, top_k=1, num_clusters=8, capacity_factor=1.25,
            eval_capacity_factor=2.0, min_capacity=1, drop_tokens=True, gate_noise_std=0.0, use_rts=False)


@pytest.mark.parametrize("k", [1, 2])
def test_plan_equals_deepspeed_gating_of_the_same_logits_per_token(k):
    torch.manual_seed(k)
    images, seq, experts = 12, 5, 4
    logits = torch.randn(images, experts)
    routes = plan_image_routes(logits[None], k, 100.0, 1, seq, drop=True).layer(0).sparse_routes()
    token_logits = logits.repeat_interleave(seq, dim=0)  # (S, E): every token carries its image's logits
    if k == 1:
        ref = top1gating(token_logits, 100.0, 1, None, None, True, False, None, True)
    else:
        ref = top2gating(token_logits.clone(), 100.0, 1, True, None, False, True)
    l_aux, cap, num_e, idx, loc, gates, counts = routes
    assert num_e == ref[2] == experts and cap == images * seq  # whole images, at most the batch
    assert torch.equal(idx, ref[3]) and torch.equal(loc, ref[4])
    assert torch.allclose(gates, ref[5]) and torch.allclose(l_aux, ref[0])
    assert torch.equal(counts.long(), ref[6].long())


def test_model_plans_all_layers_at_once_as_each_layer_would_alone():
    cfg = load_config([], ["moe.routing=cluster", "moe.num_clusters=8", "moe.gate_noise_std=0",
                           "moe.capacity_factor=1.0"])
    model = build_model(cfg).train()
    clusters = torch.randint(0, 8, (16,))
    plan = model.route_images(clusters, tokens_per_image=5)
    assert len(plan.layers) == len(model.moe_layers()) >= 2
    for n, (_, moe) in enumerate(model.moe_layers()):
        alone = moe.plan_alone(clusters, 5)
        for a, b in zip(plan.layer(n).sparse_routes(), alone.sparse_routes()):
            assert torch.equal(torch.as_tensor(a), torch.as_tensor(b))


def _one_expert_routes(k: int, drop: bool, images: int = 8, seq: int = 3):
    """Every image prefers expert 2 (then 1), with distinct probabilities; E=4."""
    logits = torch.full((images, 4), -5.0)
    logits[:, 2] = torch.linspace(1.0, 3.0, images)  # image 7 is the most confident
    logits[:, 1] = 0.0
    return plan_image_routes(logits[None], k, 1.0, 1, seq, drop=drop).layer(0), logits


def test_over_capacity_keeps_whole_images_with_the_highest_gate_probability():
    routes, _ = _one_expert_routes(k=1, drop=True)
    cap = image_capacity(8, 4, 1, 1.0, 1, 3)
    assert cap == 2 and routes.capacity_images == 2
    assert routes.kept[0].tolist() == [False] * 6 + [True, True]  # batch priority: images 6 and 7
    idx = routes.sparse_routes()[3].reshape(1, 8, 3)
    assert (idx == idx[:, :, :1]).all()  # never part of an image
    assert sorted(routes.slots[0][routes.kept[0]].tolist()) == [0, 1]
    load = routes.load()
    assert load["images"].tolist() == [0, 0, 2, 0] and load["tokens_requested"].tolist() == [0, 0, 24, 0]


def test_top2_first_choices_take_priority_over_second_choices():
    routes, _ = _one_expert_routes(k=2, drop=True)
    cap = routes.capacity_images  # ceil(2 * 8 / 4 * 1.0) = 4 images per expert
    assert cap == 4
    # Expert 2 is every image's first choice: the 4 most confident keep it; expert 1 gets every second choice.
    assert routes.kept[0].tolist() == [False] * 4 + [True] * 4
    assert routes.kept[1].sum() == 4 and (routes.experts[1] == 1).all()
    kept_gates = routes.gates[:, 7]
    assert torch.allclose(kept_gates.sum(), torch.tensor(1.0))  # renormalised over kept choices


def test_dropless_keeps_every_image_and_sizes_the_buffer_to_the_busiest_expert():
    routes, _ = _one_expert_routes(k=1, drop=False)
    assert routes.kept.all() and routes.capacity_images == 8
    assert routes.filled_images == [[0, 0, 8, 0]]
    out = routes.sparse_routes()
    assert (out[3] == 2).all() and out[1] == 24


@pytest.mark.parametrize("drop", [True, False])
def test_packed_experts_compute_what_deepspeeds_padded_experts_compute(drop):
    torch.manual_seed(0)
    moe = MoEMlp(16, 32, **{**_MOE, "drop_tokens": drop})
    x = torch.randn(10, 6, 16, requires_grad=True)
    clusters = torch.randint(0, 8, (10,))
    routes = moe.plan_alone(clusters, 6)
    packed = moe(x, routes)
    packed.square().sum().backward()
    grads = [p.grad.clone() for p in moe.parameters()]
    xgrad = x.grad.clone()
    moe.zero_grad()
    x.grad = None
    moe.deepspeed_moe.experts.filled = None  # DeepSpeed's own path: every row of every buffer
    full = moe.deepspeed_moe(x, moe.plan_alone(clusters, 6))  # re-planned: the first graph is freed
    full.square().sum().backward()
    assert torch.allclose(packed, full, atol=1e-6)
    assert torch.allclose(xgrad, x.grad, atol=1e-5)
    for g, p in zip(grads, moe.parameters()):
        assert torch.allclose(g, p.grad, atol=1e-5)


def test_dropped_share_counts_whole_images():
    cfg = load_config([], ["moe.routing=cluster", "moe.num_clusters=8", "moe.num_experts=4",
                           "moe.capacity_factor=1.0", "moe.gate_noise_std=0"])
    model = build_model(cfg).train()
    with torch.no_grad():
        for _, moe in model.moe_layers():
            moe.gate.wg.weight.zero_()
            moe.gate.wg.weight[1].fill_(1.0)  # every image prefers expert 1 (ties broken by the table)
            moe.gate.cluster_table.abs_()
    meter = ExpertLoadMeter(model.moe_layers(), 4)
    model(torch.randn(8, 3, 32, 32), torch.randint(0, 8, (8,)))
    meter.update()
    load = meter.reduce(lambda t: t)
    for stats in load.values():
        assert stats["images"] == [0, 2, 0, 0]  # capacity ceil(8 / 4) = 2 whole images
        assert stats["dropped_share"] == pytest.approx(6 / 8)


def test_token_route_load_counts_kept_tokens_and_images():
    from moce_ds.moe import layer_load

    idx = torch.tensor([[0, 0, -1, 2, 2, 2], [1, -1, -1, 3, 0, 0]], dtype=torch.int32)  # k=2, 2 images x 3 tokens
    out = layer_load(idx, torch.tensor([3, 1, 3, 1]), images=2, tokens_per_image=3, num_experts=4)
    assert out["tokens_kept"].tolist() == [4, 1, 3, 1]  # the three -1 routes count nowhere
    assert out["images"].tolist() == [2, 1, 1, 1]  # expert 0 got tokens of both images
    assert out["tokens_requested"].tolist() == [3, 1, 3, 1]
