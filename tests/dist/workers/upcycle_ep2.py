"""Each rank: a MoCE MAE split over 2 ranks (ep_size=2), upcycled from a dense MAE, against that dense MAE.

Writes rank{r}.json with, on this rank's own batch: the dense loss and the upcycled model's (top-2, dropless,
no noise); how many tokens went to the other rank's experts; and, with noise, the largest difference of this
rank's experts and of the loss from an ep_size=1 model upcycled here with the same seed.
"""

import json
import sys
from pathlib import Path

import torch

from moce_ds.config import load_config
from moce_ds.engine.distributed import init_distributed
from moce_ds.model import build_model, upcycle_from_dense

OUT = Path(next(a for a in sys.argv[1:] if not a.startswith("--")))  # the launcher appends --local_rank
MOE = ["moe.num_experts=4", "moe.num_clusters=8", "moe.top_k=2", "moe.drop_tokens=false"]


def upcycled(dense: dict, ep_size: int, rank: int, noise: float):
    cfg = load_config([], [*MOE, f"moe.ep_size={ep_size}"])
    model = build_model(cfg, ep_size, ep_rank=rank if ep_size > 1 else 0)
    if ep_size > 1:
        for _, moe in model.moe_layers():
            moe.set_deepspeed_parallelism()
    upcycle_from_dense(model, dense, noise, seed=4, ep_rank=rank if ep_size > 1 else 0)
    return model.eval()


@torch.no_grad()
def loss(model, imgs, cluster, rank: int):
    torch.manual_seed(100 + rank)  # the same mask for every model on this rank
    return model(imgs, cluster).recon_loss.item()


def main() -> None:
    rank = init_distributed().rank
    dense_model = build_model(load_config([], ["moe.routing=dense", "train.seed=3"])).eval()  # same on both ranks
    dense = dense_model.state_dict()
    gen = torch.Generator().manual_seed(rank)
    imgs, cluster = torch.randn(8, 3, 32, 32, generator=gen), torch.randint(0, 8, (8,), generator=gen)

    split = upcycled(dense, 2, rank, 0.0)
    result = {"dense": loss(dense_model, imgs, cluster, rank), "upcycled": loss(split, imgs, cluster, rank)}
    other = slice(2, 4) if rank == 0 else slice(0, 2)  # the other rank's global experts
    result["remote_tokens"] = [float(m.last_load["tokens_kept"][other].sum()) for _, m in split.moe_layers()]

    noisy, whole = upcycled(dense, 2, rank, 0.05), upcycled(dense, 1, rank, 0.05)
    diffs = []
    for (_, a), (_, b) in zip(noisy.moe_layers(), whole.moe_layers()):
        mine = b.deepspeed_moe.experts.deepspeed_experts[2 * rank: 2 * rank + 2]
        for x, y in zip(a.deepspeed_moe.experts.deepspeed_experts, mine):
            diffs += [(p - q).abs().max().item() for p, q in zip(x.parameters(), y.parameters())]
    result["noisy_expert_diff"] = max(diffs)
    result["noisy_loss"], result["noisy_loss_ep1"] = loss(noisy, imgs, cluster, rank), loss(whole, imgs, cluster, rank)
    (OUT / f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
