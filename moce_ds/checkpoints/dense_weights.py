"""Read a dense MAE to upcycle from (model.init_from), in our key names, checked against the model's size.

Three layouts:
  run   one of our dense runs: a run folder, its checkpoints/ folder or one tag folder (encoder + decoder);
  mae   the official MAE checkpoint (facebookresearch/mae): a .pth holding {"model": state_dict}, with the decoder
        (the "visualize" files) or without it (the released mae_pretrain_vit_*.pth);
  timm  a timm VisionTransformer weights file (.pth or .safetensors; plain, or under "state_dict"/"model"):
        encoder only, the classifier (head.*) dropped; the decoder starts fresh.
MAE's and timm's key names are ours already (patch_embed.proj, cls_token, pos_embed, blocks.i.{norm1, attn.qkv,
attn.proj, norm2, mlp.fc1, mlp.fc2}, norm, decoder_*), so reading is unwrapping plus a check. A file's pos_embed goes
into our fixed sin-cos buffer: a learned timm pos_embed is loaded, then kept fixed during pre-training.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from moce_ds.checkpoints.run_reader import load_pretrained, resolve_checkpoint
from moce_ds.config import load_config
from moce_ds.model.registry import MAESpec
from moce_ds.model.upcycle import DECODER_PREFIXES, check_dense_state
from moce_ds.moe.policies import routing_policy

__all__ = ["DenseWeights", "read_dense_mae"]

_FIX = "pass a dense MAE (one of our dense runs, the official MAE .pth or a timm ViT .pth/.safetensors)"
# timm's classifier side: nothing an MAE trains or uses
_CLASSIFIER = ("head.", "head_dist.", "pre_logits.", "fc_norm.")


@dataclass
class DenseWeights:
    state: dict[str, torch.Tensor]  # our dense MAE's key names (blocks.i.mlp.fc1.weight, ...), float32 on CPU
    has_decoder: bool  # False: the decoder (and mask_token) start fresh
    layout: str  # "run" | "mae" | "timm"
    description: str  # one line for the log: where from, which layout, what was dropped


def _read_run(path: Path, source: str) -> tuple[dict[str, torch.Tensor], str]:
    try:
        run_dir, _, tag = resolve_checkpoint(path)
        cfg = load_config([run_dir / "config.yaml"]) if (run_dir / "config.yaml").is_file() else None
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None
    if cfg is None:
        raise ValueError(f"{source} has no config.yaml next to its checkpoints: {_FIX}.")
    if routing_policy(cfg.moe).uses_moe:  # checked before loading: a MoE run's experts would be read for nothing
        raise ValueError(f"{source} is a MoE run (moe.routing={cfg.moe.routing}), not dense: {_FIX}, e.g. a run "
                         f"pre-trained with moe.routing=dense.")
    model = load_pretrained(path).model
    return dict(model.state_dict()), f"run checkpoint '{tag}' of {run_dir} (model.size={cfg.model.size})"


def _load_file(path: Path, source: str) -> object:
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path), device="cpu")
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip or header errors: say what was tried, in one line
        reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise ValueError(f"{source} cannot be read as a weights file with torch.load(weights_only=True) or "
                         f"safetensors ({reason}): {_FIX}, as a plain state dict or {{'model': state_dict}}.") from None


def _read_file(path: Path, source: str) -> tuple[dict[str, torch.Tensor], str, str]:
    obj = _load_file(path, source)
    wrapper = next((k for k in ("model", "state_dict") if isinstance(obj, dict) and isinstance(obj.get(k), dict)),
                   None)
    state = obj[wrapper] if wrapper else obj
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{source} holds no state dict of tensors (plain, or under 'model' / 'state_dict'): {_FIX}.")
    state = dict(state)
    has_decoder = any(k.startswith(DECODER_PREFIXES) for k in state)
    layout = "mae" if has_decoder or (wrapper == "model" and not any(k.startswith("head.") for k in state)) else "timm"
    dropped = [k for k in state if k.startswith(_CLASSIFIER)]
    if "norm.weight" not in state and "fc_norm.weight" in state:  # global-pool timm ViTs hold the last norm there
        state["norm.weight"], state["norm.bias"] = state.pop("fc_norm.weight"), state.pop("fc_norm.bias")
        dropped = [k for k in dropped if not k.startswith("fc_norm.")]
    for k in dropped:
        del state[k]
    notes = f", dropped {len(dropped)} classifier tensors ({', '.join(dropped[:3])})" if dropped else ""
    return state, layout, notes


def read_dense_mae(path: str | Path, spec: MAESpec) -> DenseWeights:
    """Read and check model.init_from against `spec`; raises ValueError (one line: the problem and the fix)."""
    path = Path(path)
    source = f"model.init_from={path}"
    if not path.exists():
        raise ValueError(f"{source} does not exist: {_FIX}.")
    if path.is_dir():
        state, where = _read_run(path, source)
        layout, notes = "run", ""
    else:
        state, layout, notes = _read_file(path, source)
        where = {"mae": "official MAE file", "timm": "timm ViT file"}[layout] + f" {path}"
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    has_decoder = check_dense_state(state, spec, source)
    decoder = "with its decoder" if has_decoder else "encoder only (the decoder starts fresh)"
    return DenseWeights(state, has_decoder, layout, f"{where}, {decoder}{notes}")
