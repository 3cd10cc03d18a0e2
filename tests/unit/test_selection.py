"""Expert selection along real routes: the path with the largest routing mass, exact coverage, folded gates."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from moce_ds.config import load_config
from moce_ds.customize.selection import best_path, combine_weights, path_mass, select_experts
from moce_ds.model import build_model


def _random_probs(rng, layers: int, clusters: int, experts: int, sharp: float) -> list[np.ndarray]:
    out = []
    for _ in range(layers):
        logits = sharp * rng.standard_normal((clusters, experts))
        p = np.exp(logits - logits.max(1, keepdims=True))
        out.append(p / p.sum(1, keepdims=True))
    return out


@pytest.mark.parametrize("sharp", [0.3, 1.0, 4.0])
def test_best_path_is_the_brute_force_maximum_of_routing_mass(sharp):
    rng = np.random.default_rng(int(sharp * 10))
    for trial in range(5):
        probs = _random_probs(rng, layers=3, clusters=12, experts=4, sharp=sharp)
        q = rng.dirichlet(np.ones(12)) * (rng.random(12) > 0.3)
        q = q / q.sum()
        brute = max(itertools.product(range(4), repeat=3), key=lambda t: path_mass(probs, q, t))
        path, mass, exact = best_path(probs, q)
        assert exact and path == brute, (trial, path, brute)
        assert mass == pytest.approx(path_mass(probs, q, brute))


def test_best_path_can_beat_every_per_layer_choice():
    # two clusters with disjoint routes; each layer's own argmax mixes them into a path neither takes
    p1 = np.array([[0.9, 0.1], [0.2, 0.8]])
    p2 = np.array([[0.2, 0.8], [0.9, 0.1]])
    q = np.array([0.55, 0.45])
    per_layer = tuple(int(np.argmax(q @ p)) for p in (p1, p2))
    path, mass, _ = best_path([p1, p2], q)
    assert per_layer == (0, 0) and path == (0, 1)  # (0, 0) is no cluster's route
    assert mass == pytest.approx(0.55 * 0.9 * 0.8 + 0.45 * 0.2 * 0.1)
    assert mass > path_mass([p1, p2], q, per_layer)


def test_combine_weights_follow_deepspeed():
    p = np.array([[0.5, 0.3, 0.2]])
    assert combine_weights(p, 1).tolist() == [[0.5, 0.0, 0.0]]  # top-1: the probability itself
    np.testing.assert_allclose(combine_weights(p, 2), [[0.625, 0.375, 0.0]])  # top-k: renormalised


def _model_with_routes(routes: np.ndarray, margin: float = 3.0):
    """A tiny MoCE whose gate sends cluster c to expert routes[c, l] in MoE layer l (softmax margin ``margin``)."""
    num_clusters, layers = routes.shape
    cfg = load_config([], [f"moe.num_clusters={num_clusters}", "moe.num_experts=4", f"moe.layers={[1, 3, 5][:layers]}"])
    model = build_model(cfg).eval()
    with torch.no_grad():
        for n, (_, moe) in enumerate(model.moe_layers()):
            gate = moe.gate
            gate.cluster_table.zero_()
            gate.cluster_table[:, :4] = torch.eye(4)[torch.from_numpy(routes[:, n])]
            gate.wg.weight.zero_()
            gate.wg.weight[:, :4] = margin * torch.eye(4)
    return model


def test_coverage_and_folded_gates_are_exact_on_a_constructed_task():
    routes = np.array([[0, 1, 2], [0, 1, 2], [3, 1, 2], [2, 2, 2]])  # clusters 0 and 1 share a path
    model = _model_with_routes(routes)
    q = np.array([0.5, 0.2, 0.2, 0.1])
    sel = select_experts(model, q, rule="path")
    assert tuple(sel.chosen[b] for b in (1, 3, 5)) == (0, 1, 2)
    assert sel.coverage == pytest.approx(0.7)  # clusters 0 and 1; cluster 2 differs in block 1, cluster 3 in two
    assert sel.dominant_cluster == 0
    p_top = np.exp(3.0) / (np.exp(3.0) + 3)  # the softmax value of a margin-3 logit among 4 experts
    assert all(sel.scales[b] == pytest.approx(p_top) for b in (1, 3, 5))
    assert sel.gate_deviation == pytest.approx(0.0, abs=1e-9)  # every covered cluster has the same gate values
    assert sel.mix == {1: {0: 1.0}, 3: {1: 1.0}, 5: {2: 1.0}}
    # the per-layer rule picks the same here; merge mixes by the per-layer scores
    assert select_experts(model, q, rule="per_layer").chosen == sel.chosen
    merge = select_experts(model, q, rule="merge")
    assert sum(merge.mix[1].values()) == pytest.approx(1.0) and len(merge.mix[1]) == 4
    assert merge.mix[1][0] == pytest.approx(float(q @ sel.probabilities[1][:, 0]))


def test_unknown_rule_is_refused():
    with pytest.raises(ValueError, match="selection rule 'best' is unknown"):
        select_experts(_model_with_routes(np.zeros((2, 3), np.int64)), np.array([0.5, 0.5]), rule="best")


def test_the_merge_export_of_identical_experts_is_the_single_expert_export():
    from moce_ds.customize.export import dense_state_dict

    model = _model_with_routes(np.zeros((4, 3), np.int64))
    with torch.no_grad():
        for _, moe in model.moe_layers():
            first, *rest = moe.deepspeed_moe.experts.deepspeed_experts
            for other in rest:
                other.load_state_dict(first.state_dict())
    scales = {b: 0.8 for b in model.moe_blocks}
    single = dense_state_dict(model, {b: 2 for b in model.moe_blocks}, scales)
    merged = dense_state_dict(model, {b: {0: 0.1, 1: 0.2, 2: 0.3, 3: 0.4} for b in model.moe_blocks}, scales)
    assert single.keys() == merged.keys()
    assert all(torch.allclose(single[k], merged[k], atol=1e-6) for k in single)
    # and a real mix of different experts is their weighted average
    model2 = _model_with_routes(np.zeros((4, 3), np.int64))
    mixed = dense_state_dict(model2, {b: {0: 0.25, 3: 0.75} for b in model2.moe_blocks}, {})
    e = model2.blocks[1].mlp.deepspeed_moe.experts.deepspeed_experts
    torch.testing.assert_close(mixed["blocks.1.mlp.fc1.weight"], 0.25 * e[0].fc1.weight + 0.75 * e[3].fc1.weight)
    with pytest.raises(ValueError, match="must sum to 1"):
        dense_state_dict(model2, {b: {0: 0.5} for b in model2.moe_blocks}, {})
