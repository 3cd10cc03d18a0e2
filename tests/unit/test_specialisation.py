"""Specialisation statistics: route purity and cluster-expert NMI, from the metric down to one training forward."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moce_ds.config import load_config
from moce_ds.metrics import ExpertLoadMeter
from moce_ds.model import build_model
from moce_ds.moe.specialisation import specialisation


def test_a_deterministic_one_cluster_one_expert_gate_scores_one():
    joint = np.diag([30.0, 20.0, 25.0, 25.0])  # cluster c always goes to expert c
    s = specialisation(joint, preferred_routes=100.0)
    assert s == {"route_purity": 1.0, "cluster_expert_nmi": pytest.approx(1.0)}
    # several clusters per expert, still deterministic: the cluster determines the expert
    many = np.zeros((16, 4))
    many[np.arange(16), np.arange(16) % 4] = 10
    assert specialisation(many, 160.0)["cluster_expert_nmi"] == pytest.approx(1.0)


def test_a_uniform_gate_scores_one_over_e_purity_and_no_information():
    rng = np.random.default_rng(0)
    clusters = rng.integers(0, 16, 200_000)
    experts = rng.integers(0, 4, 200_000)  # independent of the cluster
    preferred = rng.integers(0, 4, 16)  # whatever the gate prefers, routes ignore it
    joint = np.zeros((16, 4))
    np.add.at(joint, (clusters, experts), 1)
    s = specialisation(joint, float((experts == preferred[clusters]).sum()))
    assert s["route_purity"] == pytest.approx(0.25, abs=0.01)
    assert s["cluster_expert_nmi"] == pytest.approx(0.0, abs=0.01)


def _moce(noise: float):
    cfg = load_config([], ["moe.num_clusters=8", "moe.num_experts=4", f"moe.gate_noise_std={noise}",
                           "moe.drop_tokens=false"])
    return build_model(cfg)


@pytest.mark.parametrize("noise", [0.0, 50.0])
def test_one_forward_reports_purity_from_the_routes_it_took(noise):
    torch.manual_seed(0)
    model = _moce(noise).train()
    meter = ExpertLoadMeter(model.moe_layers(), 4)
    cluster = torch.arange(64) % 8
    model(torch.randn(64, 3, 32, 32), cluster)
    meter.update()
    load = meter.reduce(lambda t: t)
    for block in model.moe_blocks:
        stats = load[str(block)]
        if noise == 0:  # no noise: every route is the preferred one, and the cluster determines the expert
            assert stats["route_purity"] == 1.0 and stats["cluster_expert_nmi"] == pytest.approx(1.0)
        else:  # noise far above the logits' spread: routes are close to uniform
            assert stats["route_purity"] < 0.6 and stats["cluster_expert_nmi"] < 0.6
        assert sum(stats["images"]) == 64  # dropless: every image kept once (top-1)


def test_frozen_gates_get_no_optimizer_state_and_keep_routing():
    from moce_ds.config import ConfigError
    from moce_ds.engine.schedule import param_groups
    from moce_ds.moe.packing import init_cluster_tables

    model = _moce(0.0)
    init_cluster_tables(model, "lpt", None, [5, 4, 3, 3, 2, 2, 1, 1], 4.0, 0)
    before = {b: m.gate.cluster_logits().argmax(1) for b, m in model.moe_layers()}
    for _, moe in model.moe_layers():
        moe.gate.freeze()
    in_optimizer = {id(p) for g in param_groups(model, 0.05) for p in g["params"]}
    gate_params = [p for _, m in model.moe_layers() for p in m.gate.parameters()]
    assert gate_params and not any(id(p) in in_optimizer for p in gate_params)
    # every layer routes a cluster to its packed expert: one column of experts through the network
    first = next(iter(before.values()))
    assert all(torch.equal(v, first) for v in before.values())
    with pytest.raises(ConfigError, match="moe.gate_trainable=false freezes the cluster gates"):
        load_config([], ["moe.routing=dense", "moe.gate_trainable=false"])
