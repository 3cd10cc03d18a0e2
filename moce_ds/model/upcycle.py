"""Sparse upcycling: a MoE MAE whose every expert starts as a copy of its block's dense MLP.

The input is a dense MAE state dict in our key names (what moce_ds.checkpoints.dense_weights reads from our runs,
the official MAE files or timm ViT files). Shared weights are copied as they are; the gates are left alone (the
trainer starts the cluster tables from the round afterwards). With no noise, dropless routing and top-k >= 2, the
upcycled model computes exactly what the dense one does: the renormalised combine weights of identical experts
sum to 1. Top-1 multiplies the expert's output by p(e|c) < 1, so it starts close to, not equal to, the dense model.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import torch

from moce_ds.config.schema import MoEConfig
from moce_ds.model.mae import MaskedAutoencoderViT
from moce_ds.model.registry import MODEL_SIZES, MAESpec

__all__ = ["DECODER_PREFIXES", "dense_shapes", "check_dense_state", "upcycle_from_dense"]

DECODER_PREFIXES = ("decoder_", "mask_token")
# Fixed sin-cos buffers: a file without them keeps ours; a file's own (e.g. timm's learned one) is loaded and then
# stays fixed, since our model never trains position embeddings.
_OPTIONAL = ("pos_embed", "decoder_pos_embed")
_MLP = ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")


@functools.lru_cache(maxsize=8)
def dense_shapes(spec: MAESpec) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the dense MAE of `spec`, encoder and decoder (built on the meta device: no memory, ~50 ms)."""
    with torch.device("meta"):
        model = MaskedAutoencoderViT(spec, MoEConfig(routing="dense"))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _count_blocks(keys: list[str], prefix: str) -> int:
    return len({k.split(".")[1] for k in keys if k.startswith(prefix) and k.split(".")[1].isdigit()})


def _geometry(state: Mapping[str, torch.Tensor]) -> dict[str, int] | None:
    """What the weights say about the model: width, depth, patch, positions (None: not a ViT of our layout)."""
    patch = state.get("patch_embed.proj.weight")  # (D, 3, p, p)
    if patch is None or patch.dim() != 4 or "blocks.0.attn.qkv.weight" not in state:
        return None
    keys = list(state)
    geom = {"dim": patch.shape[0], "patch": patch.shape[-1], "depth": _count_blocks(keys, "blocks.")}
    if "pos_embed" in state:
        geom["positions"] = state["pos_embed"].shape[-2] - 1  # the cls token's row first
    decoder_depth = _count_blocks(keys, "decoder_blocks.")
    if "decoder_embed.weight" in state and decoder_depth:  # a partial decoder is a broken file, not another size
        geom.update(decoder_dim=state["decoder_embed.weight"].shape[0], decoder_depth=decoder_depth)
    return geom


def _spec_geometry(spec: MAESpec, with_decoder: bool) -> dict[str, int]:
    geom = {"dim": spec.embed_dim, "patch": spec.patch_size, "depth": spec.depth, "positions": spec.num_patches}
    if with_decoder:
        geom.update(decoder_dim=spec.decoder_embed_dim, decoder_depth=spec.decoder_depth)
    return geom


def _describe(geom: dict[str, int]) -> str:
    text = f"dim {geom['dim']}, depth {geom['depth']}, patch {geom['patch']}"
    if "positions" in geom:
        text += f", {geom['positions']} patches"
    if "decoder_dim" in geom:
        text += f", decoder {geom['decoder_dim']}x{geom['decoder_depth']}"
    return text


def _sizes_matching(geom: dict[str, int]) -> list[str]:
    return [name for name, spec in MODEL_SIZES.items()
            if all(_spec_geometry(spec, "decoder_dim" in geom)[k] == v for k, v in geom.items())]


def check_dense_state(state: Mapping[str, torch.Tensor], spec: MAESpec, source: str) -> bool:
    """Check a dense MAE state dict (our key names) against `spec`; returns whether it holds a decoder.

    Raises ValueError with one line that starts with `source`, names a few mismatching keys or shapes and the fix.
    """
    want = dense_shapes(spec)
    has_decoder = any(k.startswith(DECODER_PREFIXES) for k in state)
    expected = {k: s for k, s in want.items() if has_decoder or not k.startswith(DECODER_PREFIXES)}
    missing = [k for k in expected if k not in state and k not in _OPTIONAL]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {list(state[k].shape)} vs {list(expected[k])}" for k in expected
             if k in state and tuple(state[k].shape) != expected[k]]
    if not (missing or unexpected or wrong):
        return has_decoder
    geom = _geometry(state)
    dense_mae = "pass a dense MAE (one of our dense runs, the official MAE .pth or a timm ViT .pth/.safetensors)"
    if geom is None:
        raise ValueError(f"{source} is not a ViT (no patch_embed.proj.weight or blocks.0.attn.qkv.weight; its keys "
                         f"start {sorted(state)[:3]}): {dense_mae}.")
    if geom != {k: v for k, v in _spec_geometry(spec, has_decoder).items() if k in geom}:
        sizes = _sizes_matching(geom)
        fix = (f"set model.size={sizes[0]}" if sizes else
               f"no model.size has that geometry: {dense_mae} of model.size's geometry")
        shapes = f" ({'; '.join(wrong[:3])})" if wrong else ""
        raise ValueError(f"{source} holds a ViT MAE of another size ({_describe(geom)}) than model.size "
                         f"({_describe(_spec_geometry(spec, has_decoder))}){shapes}: {fix}.")
    parts = [f"missing {missing[:4]}" if missing else "", f"unexpected {unexpected[:4]}" if unexpected else "",
             f"other shapes {wrong[:3]}" if wrong else ""]
    raise ValueError(f"{source} is not a ViT MAE of our architecture ({', '.join(p for p in parts if p)}): "
                     f"{dense_mae}.")


def _expert_seed(seed: int, layer: int, global_expert: int) -> int:
    # from the global expert id, never the local slot: the same noise whatever ep_size splits the experts
    return (seed * 1_000_003 + layer * 1009 + global_expert + 7_777) % (2**63 - 1)


@torch.no_grad()
def upcycle_from_dense(model: MaskedAutoencoderViT, dense: Mapping[str, torch.Tensor], noise_std: float = 0.0,
                       seed: int = 0, ep_rank: int = 0) -> str:
    """Start `model` (any routing, any ep_size) from a dense MAE state dict; returns a line for the log.

    Shared weights (and the decoder, when `dense` has one; else it keeps its fresh init) are copied. Every local
    expert j of every MoE block (global id ep_rank * num_local + j) becomes that block's dense fc1/fc2, and with
    noise_std > 0 each weight matrix gets N(0, (noise_std * std(dense weight))^2) noise, drawn from
    (seed, block, global expert id); biases are copied exactly. Gates are not touched.
    """
    if noise_std < 0:
        raise ValueError(f"upcycle noise_std={noise_std} must be >= 0.")
    has_decoder = check_dense_state(dense, model.spec, "the dense weights")
    moe_mlps = tuple(f"blocks.{i}.mlp." for i in model.moe_blocks)
    shared = {k: v for k, v in dense.items() if not k.startswith(moe_mlps)}
    missing, _ = model.load_state_dict(shared, strict=False)  # nothing unexpected: checked above
    experts = 0
    for block, moe in model.moe_layers():
        mlp_w = {name: dense[f"blocks.{block}.mlp.{name}"] for name in _MLP}
        local = moe.deepspeed_moe.experts.deepspeed_experts
        for j, expert in enumerate(local):
            gen = torch.Generator().manual_seed(_expert_seed(seed, block, ep_rank * len(local) + j))
            for name, p in expert.named_parameters():  # fc1.weight, fc1.bias, fc2.weight, fc2.bias
                w = mlp_w[name].float()
                if noise_std > 0 and name.endswith("weight"):
                    w = w + torch.randn(w.shape, generator=gen) * (noise_std * w.std())
                p.copy_(w)
            experts += 1
    kept = len([k for k in missing if ".mlp.deepspeed_moe." not in k])  # not in the file: pos buffers, decoder
    return (f"{len(shared)} shared tensors copied{'' if has_decoder else ' (no decoder: it starts fresh)'}"
            f"{f', {kept} kept as built' if kept else ''}; {experts} local experts in blocks {model.moe_blocks} "
            f"copied from their dense MLPs (noise {noise_std:g} x weight std)")
