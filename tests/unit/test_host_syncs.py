"""Host syncs of a training micro-step, counted on CPU: every call that would make the host wait for a GPU."""

from __future__ import annotations

import contextlib
from collections import Counter

import pytest
import torch

from moce_ds.config import load_config
from moce_ds.engine.step_loop import SYNCS_PER_MICRO_STEP, forward_and_vote
from moce_ds.model import build_model

# Tensor methods that copy device memory to the host (or branch on it), and ops whose output size depends on data.
_METHODS = ("item", "tolist", "cpu", "numpy", "nonzero", "masked_select", "__bool__", "__int__", "__float__")
_FUNCTIONS = ("nonzero", "masked_select", "unique", "bincount")


@contextlib.contextmanager
def count_syncs():
    counts: Counter = Counter()
    saved = []

    def wrap(owner, name, label):
        original = getattr(owner, name)

        def counted(*a, **kw):
            counts[label] += 1
            return original(*a, **kw)
        saved.append((owner, name, original))
        setattr(owner, name, counted)

    for name in _METHODS:
        wrap(torch.Tensor, name, name)
    for name in _FUNCTIONS:
        wrap(torch, name, f"torch.{name}")
    getitem = torch.Tensor.__getitem__

    def masked_getitem(self, index):  # boolean-mask indexing: the output size needs the mask's sum on the host
        parts = index if isinstance(index, tuple) else (index,)
        if any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts):
            counts["bool index"] += 1
        return getitem(self, index)
    saved.append((torch.Tensor, "__getitem__", getitem))
    torch.Tensor.__getitem__ = masked_getitem
    try:
        yield counts
    finally:
        for owner, name, original in reversed(saved):
            setattr(owner, name, original)


def _micro_step(model, images, cluster) -> None:
    """What the step loop does per micro-step, with a plain module for the engine and autograd's backward."""
    out, vote = forward_and_vote(model, images, cluster, stop_requested=False)
    assert vote.nonfinite == vote.stop == vote.bad_clusters == 0
    out.loss.backward()
    interval = torch.zeros(3, dtype=torch.float64)
    interval += torch.stack([out.loss, out.recon_loss, out.aux_loss]).detach().double()


@pytest.mark.parametrize("routing, budget", [("dense", SYNCS_PER_MICRO_STEP), ("token", None),
                                             ("cluster", SYNCS_PER_MICRO_STEP + 1)])
def test_a_micro_step_stays_within_its_host_sync_budget(routing, budget):
    model = build_model(load_config([], [f"moe.routing={routing}", "moe.num_clusters=8"]))
    images, cluster = torch.randn(4, 3, 32, 32), torch.tensor([0, 3, 7, 3])
    _micro_step(model, images, cluster)  # warm-up: lazy initialisation outside the count
    with count_syncs() as counts:
        _micro_step(model, images, cluster)
    if budget is None:  # DeepSpeed's own token gating syncs inside its top-k; nothing of ours is added to it
        ours = counts.copy()
        with count_syncs() as gate_only:
            model(images, cluster)
        ours.subtract(gate_only)
        assert sum(ours.values()) <= SYNCS_PER_MICRO_STEP, dict(counts)
    else:
        # the vote's one read; cluster routing adds the routing plan's buffer sizes (moe/routing.py)
        assert sum(counts.values()) <= budget, dict(counts)


def test_bad_cluster_ids_are_voted_and_still_a_clear_error():
    model = build_model(load_config([], ["moe.num_clusters=8"]))
    images, cluster = torch.randn(2, 3, 32, 32), torch.tensor([1, 8])
    out, vote = forward_and_vote(model, images, cluster, stop_requested=True)  # no error inside the forward
    assert vote.bad_clusters == 1 and vote.stop == 1 and vote.nonfinite == 0
    with pytest.raises(ValueError, match="cluster id 8 is outside the gate's table of 8 clusters"):
        model.check_clusters(cluster)
    good = forward_and_vote(model, images, torch.tensor([1, 7]), stop_requested=False)[1]
    assert good.bad_clusters == 0
