"""Load a pre-training checkpoint (written with any ep_size) into one process, all experts local.

DeepSpeed writes the shared weights (gates included) to `mp_rank_00_model_states.pt` and every expert to
`layer_L_expert_E_mp_rank_00_model_states.pt` with its *global* expert id, so rebuilding the model with
ep_size=1 and reading every expert file gives the same model whatever ep_size wrote it. A bf16/fp16 run's weights
come from the optimizer's fp32 masters (moce_ds.checkpoints.zero_masters), not the low-precision module copies.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from moce_ds.checkpoints.records import latest_tag
from moce_ds.checkpoints.zero_masters import fp32_master_weights
from moce_ds.config import Config, load_config
from moce_ds.data.sidecar import ClusterRound, latest_round, list_rounds, load_round_at
from moce_ds.model import MaskedAutoencoderViT, build_model

__all__ = ["Pretrained", "load_pretrained", "resolve_checkpoint"]

log = logging.getLogger("moce_ds")


@dataclass
class Pretrained:
    cfg: Config
    model: MaskedAutoencoderViT  # eval mode, ep_size=1, float32
    tag: str
    ckpt_dir: Path
    round: ClusterRound | None


def resolve_checkpoint(path: Path, tag: str | None = None) -> tuple[Path, Path, str]:
    """A run folder, its checkpoints/ folder or one tag folder -> (run_dir, checkpoints_dir, tag)."""
    path = Path(path)
    if (path / "moce_meta.json").is_file():  # a tag folder
        return path.parent.parent, path.parent, path.name
    ckpts = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    run_dir = ckpts.parent
    if tag is None:
        tag = latest_tag(ckpts)  # the newest complete, intact checkpoint
        if tag is None:
            raise ValueError(f"{path} holds no complete checkpoint: pass a run folder written by "
                             f"launchers/pretrain.py or a checkpoint tag folder.")
    if not (ckpts / tag / "mp_rank_00_model_states.pt").is_file():
        raise ValueError(f"checkpoint {ckpts / tag} is incomplete (no mp_rank_00_model_states.pt).")
    return run_dir, ckpts, tag


def _round_for(meta: dict, run_dir: Path, cfg: Config, centroids: Path | None) -> ClusterRound | None:
    if centroids is not None:  # an explicit round folder wins
        return load_round_at(centroids)
    saved = meta.get("position", {}).get("cluster_round")
    if saved and Path(saved).is_dir():
        return load_round_at(Path(saved))
    if cfg.data.path:
        return latest_round(Path(cfg.data.path) / "clusters")
    # the embedded set: its newest round with the gate table's k
    from moce_ds.data.embedded import EMBEDDED_VERSION, default_cache_dir

    root = (Path(cfg.data.cache_dir) if cfg.data.cache_dir else default_cache_dir()) / f"embedded-{EMBEDDED_VERSION}"
    for path in reversed(list_rounds(root / "clusters")):
        rnd = load_round_at(path)
        if rnd.k == cfg.moe.num_clusters:
            return rnd
    return None


def load_pretrained(path: Path, tag: str | None = None, centroids: Path | None = None) -> Pretrained:
    run_dir, ckpts, tag = resolve_checkpoint(path, tag)
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise ValueError(f"{run_dir} has no config.yaml next to its checkpoints; cannot rebuild the model.")
    cfg = load_config([config_file])
    cfg.moe.ep_size = 1
    model = build_model(cfg, ep_size=1)
    state = torch.load(ckpts / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)["module"]
    for layer_file in sorted((ckpts / tag).glob("layer_*_expert_*_mp_rank_00_model_states.pt")):
        state.update(torch.load(layer_file, map_location="cpu", weights_only=True))
    if any(v.is_floating_point() and v.dtype != torch.float32 for v in state.values()):
        # a bf16/fp16 run saved its weights in that precision: take the optimizer's fp32 masters where it has them
        masters = fp32_master_weights(ckpts / tag, state)
        if masters is None:
            log.warning("checkpoint %s holds %s weights and no ZeRO-1/2 fp32 masters: using them upcast to fp32",
                        ckpts / tag, next(v.dtype for v in state.values() if v.is_floating_point()))
        else:
            state.update(masters)
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint {ckpts / tag} does not match its config.yaml: missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]}.")
    meta_file = ckpts / tag / "moce_meta.json"
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    model.eval()
    return Pretrained(cfg, model, tag, ckpts, _round_for(meta, run_dir, cfg, centroids))
