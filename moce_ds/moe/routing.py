"""Image-level routing for every MoCE layer of a step, planned once from the images' cluster ids.

The cluster gate's logits depend on nothing but an image's cluster, so the routes of all MoE layers
are known the moment the batch is loaded. `plan_image_routes` takes the stacked logits of all layers
and decides, for every (layer, image, choice), the expert, whether the image is kept, its slot in the
expert's buffer and its combine weight; each layer's gate then only expands its row to DeepSpeed's
token-level sparse routes, which DeepSpeed's own dispatch and all-to-all consume.

Capacity is counted in images, so an expert over capacity keeps or drops whole images. Which images
it keeps follows V-MoE's batch-priority routing at image level: all first choices before any second
choice, and within a choice the highest gate probability first. Kept images then take their slots in
batch order (first choices, then second choices), which is exactly DeepSpeed's layout whenever nothing
is dropped. In dropless mode the capacity grows to the busiest expert on any rank.

Expert parallelism needs one collective per step, not one per layer: a single all-gather of the
kept-image counts (layers x experts) over the expert-parallel group gives the dropless capacity and
how many rows of every buffer arrive filled after the all-to-all (`PackedExperts` computes only those).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

__all__ = ["ImageRoutes", "LayerRoutes", "plan_image_routes", "image_capacity"]


@dataclass
class LayerRoutes:
    """One MoE layer's routes for one step, at image level; `sparse_routes` expands them to tokens."""

    experts: torch.Tensor  # (k, B) int64 chosen expert per choice and image
    kept: torch.Tensor  # (k, B) bool
    slots: torch.Tensor  # (k, B) int64 image slot in the expert's buffer (0 where dropped)
    gates: torch.Tensor  # (k, B) float32 combine weight (0 where dropped); carries the gate's gradient
    l_aux: torch.Tensor  # () DeepSpeed's balance loss for this k
    capacity_images: int  # buffer length per expert, in images
    filled_images: list[list[int]]  # [source ep rank][local expert] images this rank's experts receive
    tokens_per_image: int
    num_experts: int
    requested_images: torch.Tensor  # (E,) int64 images asking for each expert (all choices), before capacity
    kept_images: torch.Tensor  # (E,) int64 images each expert keeps
    clusters: torch.Tensor | None = None  # (B,) int64 each image's cluster, for specialisation statistics
    preferred: torch.Tensor | None = None  # (B,) int64 the noise-free top-1 expert of each image's cluster
    num_clusters: int = 0

    @property
    def images(self) -> int:
        return self.experts.shape[1]

    def sparse_routes(self) -> tuple:
        """DeepSpeed 0.19's 7-tuple `(l_aux, capacity, E, indices [k,S], locations [k,S], gates [k,S], exp_counts)`.

        Token t of image b sits at row slot * T + t of its expert's buffer; S = B * T in image-major order.
        """
        t = self.tokens_per_image
        offsets = torch.arange(t, device=self.experts.device)  # (T,)
        indices = torch.where(self.kept, self.experts, -1).repeat_interleave(t, dim=1)  # (k, S)
        locations = (self.slots[:, :, None] * t + offsets).reshape(self.slots.shape[0], -1)  # (k, S)
        locations = locations * self.kept.repeat_interleave(t, dim=1)
        gates = self.gates.repeat_interleave(t, dim=1)  # (k, S)
        capacity = self.capacity_images * t  # a Python int: DeepSpeed's int(C) costs no host sync
        return (self.l_aux, capacity, self.num_experts, indices.to(torch.int32), locations.to(torch.int32), gates,
                self.requested_tokens())

    def requested_tokens(self) -> torch.Tensor:
        """(E,) tokens requested per expert before capacity, DeepSpeed's `exp_counts`."""
        return self.requested_images * self.tokens_per_image

    def load(self) -> dict[str, torch.Tensor]:
        """(E,) float64 per-expert load of this step, on the routes' device (no host copy, no sync)."""
        kept = self.kept_images.double()
        out = {
            "tokens_requested": self.requested_tokens().double(),
            "tokens_kept": kept * self.tokens_per_image,
            "images": kept,
        }
        if self.clusters is not None and self.preferred is not None:
            # first choices, before capacity: what routing decided, whether or not the buffer had room
            first = self.experts[0]
            flat = self.clusters * self.num_experts + first  # (B,) index into the (C, E) table
            joint = torch.zeros(self.num_clusters * self.num_experts, dtype=torch.float64, device=first.device)
            out["cluster_expert"] = joint.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.float64))
            out["preferred_routes"] = (first == self.preferred).sum().double().reshape(1)
        return out


@dataclass
class ImageRoutes:
    """The routes of all MoE layers of a step (leading dimension: layer, in encoder order)."""

    layers: list[LayerRoutes]

    def layer(self, n: int) -> LayerRoutes:
        return self.layers[n]


def image_capacity(images: int, num_experts: int, k: int, capacity_factor: float, min_capacity_tokens: int,
                   tokens_per_image: int) -> int:
    """Buffer length per expert in images: ceil(k * B / E * factor), at least DeepSpeed's min_capacity in tokens."""
    cap = math.ceil(k * images / num_experts * capacity_factor)
    return min(max(cap, math.ceil(min_capacity_tokens / tokens_per_image), 1), images)


def _aux_loss(probs: torch.Tensor, choice: torch.Tensor, k: int) -> torch.Tensor:
    """probs (L, B, E), choice (L, k, B) -> (L,) DeepSpeed's l_aux for this k, over images.

    Every image has the same number of tokens, so DeepSpeed's token means equal these image means.
    top1/top2: E * sum_e mean_b(p) * share of first choices; top-k (k > 2): the same over all k choices, / k.
    """
    e = probs.shape[-1]
    me = probs.mean(dim=1)  # (L, E)
    counted = choice[:, :1] if k <= 2 else choice
    ce = F.one_hot(counted, e).float().sum(dim=1).mean(dim=1)  # (L, E)
    scale = e if k <= 2 else e / k
    return (me * ce).sum(dim=-1) * scale


def _group_size(group: dist.ProcessGroup | None) -> int:
    if group is None or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def plan_image_routes(
    logits: torch.Tensor,
    k: int,
    capacity_factor: float,
    min_capacity: int,
    tokens_per_image: int,
    drop: bool,
    ep_group: dist.ProcessGroup | None = None,
) -> ImageRoutes:
    """logits: (L, B, E) float32, one row per MoE layer -> every layer's image routes for this step.

    `min_capacity` is in tokens, as in DeepSpeed's config. `drop=False` is the dropless mode.
    """
    num_layers, batch, e = logits.shape
    if not 1 <= k <= e:
        raise ValueError(f"top_k={k} must be between 1 and the number of experts ({e}).")
    probs = F.softmax(logits.float(), dim=-1)  # (L, B, E)
    top_p, top_idx = torch.topk(probs, k, dim=-1)  # (L, B, k)
    choice = top_idx.transpose(1, 2)  # (L, k, B)
    score = top_p.transpose(1, 2)  # (L, k, B)
    hot = F.one_hot(choice.reshape(num_layers, k * batch), e)  # (L, kB, E) in (choice, image) order

    if drop:
        cap = image_capacity(batch, e, k, capacity_factor, min_capacity, tokens_per_image)
        # Batch-priority: choice 0 before choice 1, high gate probability first (score < 1 keeps choices apart).
        priority = torch.argsort((torch.arange(k, device=logits.device)[None, :, None] * 2.0 - score.detach())
                                 .reshape(num_layers, -1), dim=1, stable=True)  # (L, kB)
        hot_by_priority = hot.gather(1, priority[:, :, None].expand(-1, -1, e))
        rank_by_priority = ((hot_by_priority.cumsum(1) - 1) * hot_by_priority).sum(-1)  # (L, kB)
        rank = torch.empty_like(rank_by_priority).scatter_(1, priority, rank_by_priority)
        kept = (rank < cap).reshape(num_layers, k, batch)
    else:
        kept = torch.ones_like(choice, dtype=torch.bool)
    hot_kept = hot * kept.reshape(num_layers, -1, 1)
    # batch order among kept; 0 where dropped (the row of hot_kept is all zero)
    slots = ((hot_kept.cumsum(1) - 1) * hot_kept).sum(-1).reshape(num_layers, k, batch)

    gates = score * kept
    if k > 1:  # renormalise over the kept choices, as DeepSpeed's top2/topk gating does
        gates = gates / gates.sum(dim=1, keepdim=True).clamp_min(torch.finfo(gates.dtype).eps)
    l_aux = _aux_loss(probs, choice, k)

    # The one collective of the step: every rank's kept images per (layer, expert).
    kept_counts = hot_kept.sum(1)  # (L, E)
    requested_counts = hot.sum(1)  # (L, E); counted here, not by bincount, which syncs with the host on CUDA
    ep = _group_size(ep_group)
    if ep > 1:
        gathered = [torch.empty_like(kept_counts) for _ in range(ep)]
        dist.all_gather(gathered, kept_counts.contiguous(), group=ep_group)
        counts = torch.stack(gathered)  # (ep, L, E)
        my_rank = dist.get_rank(ep_group)
    else:
        counts, my_rank = kept_counts[None], 0
    counts_host = counts.tolist()  # the step's one host sync: buffer sizes must be Python ints
    local = e // ep
    layers = []
    for n in range(num_layers):
        capacity = cap if drop else max(max(c[n]) for c in counts_host)
        filled = [[counts_host[r][n][my_rank * local + j] for j in range(local)] for r in range(ep)]
        layers.append(LayerRoutes(
            experts=choice[n], kept=kept[n], slots=slots[n], gates=gates[n], l_aux=l_aux[n],
            capacity_images=max(capacity, 1), filled_images=filled, tokens_per_image=tokens_per_image,
            num_experts=e, requested_images=requested_counts[n], kept_images=kept_counts[n],
        ))
    return ImageRoutes(layers)
