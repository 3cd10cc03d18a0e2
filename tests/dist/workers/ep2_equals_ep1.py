"""Each rank: one MoCE layer split over 2 ranks (ep_size=2) against the same layer whole on this rank (ep_size=1).

Writes rank{r}.json with the largest differences in output, input gradient, gate gradient and (summed over
ranks, as the expert-parallel backward sums them) expert gradients, for a capacity that drops, for dropless, and for top-2 with drops.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from moce_ds.config import load_config
from moce_ds.engine.distributed import init_distributed
from moce_ds.model import build_model
from moce_ds.moe import MoEMlp

OUT = Path(next(a for a in sys.argv[1:] if not a.startswith("--")))  # the launcher appends --local_rank
ARGS = dict(routing="cluster", num_experts=4, num_clusters=8, capacity_factor=1.0, eval_capacity_factor=1.0,
            min_capacity=1, gate_noise_std=0.0, use_rts=False)


def build(ep_size: int, drop: bool, top_k: int = 1) -> MoEMlp:
    torch.manual_seed(0)  # same gate on every rank and in both layouts
    moe = MoEMlp(16, 32, ep_size=ep_size, drop_tokens=drop, **{**ARGS, "top_k": top_k})
    local = moe.deepspeed_moe.experts.deepspeed_experts
    first = dist.get_rank() * len(local) if ep_size > 1 else 0
    with torch.no_grad():
        for j, mlp in enumerate(local):  # expert weights depend only on the global expert id
            gen = torch.Generator().manual_seed(100 + first + j)
            for p in mlp.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    if ep_size > 1:
        moe.set_deepspeed_parallelism()
    return moe


def run(moe: MoEMlp, x: torch.Tensor, clusters: torch.Tensor):
    x = x.clone().requires_grad_(True)
    out = moe(x, clusters)
    (out.square().sum() + moe.l_aux).backward()
    local = moe.deepspeed_moe.experts.deepspeed_experts
    experts = [torch.cat([p.grad.flatten() for p in mlp.parameters()]) for mlp in local]
    dropped = float(moe.last_load["tokens_requested"].sum() - moe.last_load["tokens_kept"].sum())
    return out.detach(), x.grad, moe.gate.wg.weight.grad.clone(), experts, dropped


def collectives_per_forward(drop: bool) -> dict[str, int]:
    """Calls into torch.distributed during one forward of a 3-MoE-layer model with ep_size=2 (spied, not mocked)."""
    cfg = load_config([], ["moe.num_experts=4", "moe.ep_size=2", "moe.num_clusters=8", "moe.layers=[0,1,2]",
                           f"moe.drop_tokens={str(drop).lower()}"])
    model = build_model(cfg, ep_size=2, ep_rank=dist.get_rank())
    for _, moe in model.moe_layers():
        moe.set_deepspeed_parallelism()
    counts: dict[str, int] = {}
    originals = {name: getattr(dist, name) for name in ("all_gather", "all_reduce", "all_to_all_single", "broadcast")}

    def spy(name):
        def call(*args, **kwargs):
            counts[name] = counts.get(name, 0) + 1
            return originals[name](*args, **kwargs)
        return call

    for name in originals:
        setattr(dist, name, spy(name))
    try:
        model(torch.randn(6, 3, 32, 32), torch.randint(0, 8, (6,)))
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
    return counts


def main() -> None:
    rank = init_distributed().rank
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(12, 5, 16, generator=gen)
    clusters = torch.randint(0, 8, (12,), generator=gen)
    result = {}
    for mode, drop, top_k in (("drop", True, 1), ("dropless", False, 1), ("top2_drop", True, 2)):
        split = run(build(2, drop, top_k), x, clusters)
        whole = run(build(1, drop, top_k), x, clusters)
        summed = [g.clone() for g in whole[3]]
        for g in summed:
            dist.all_reduce(g)  # every rank's tokens reach every expert's gradient
        mine = summed[2 * rank: 2 * rank + 2]
        result[mode] = {
            "out": (split[0] - whole[0]).abs().max().item(),
            "x_grad": (split[1] - whole[1]).abs().max().item(),
            "gate_grad": (split[2] - whole[2]).abs().max().item(),
            "expert_grad": max((a - b).abs().max().item() for a, b in zip(split[3], mine)),
            "out_norm": whole[0].norm().item(),
            "kept_tokens": int((split[0].abs().sum(-1) > 0).sum()),
            "dropped_routes": split[4],
        }
    result["collectives"] = {"drop": collectives_per_forward(True), "dropless": collectives_per_forward(False)}
    (OUT / f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
