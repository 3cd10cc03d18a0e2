"""Checkpoints through DeepSpeed's engine (expert files included), plus a small signature we check first.

`moce_meta.json` in each tag folder carries the model's shape and the training position; it is read
before DeepSpeed touches anything, so resuming with a different model fails with a clear message.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from moce_ds.config.schema import Config

__all__ = ["model_signature", "checkpoint_dir", "latest_tag", "read_meta", "check_resume_compatible",
           "save_checkpoint", "prune_checkpoints"]

log = logging.getLogger("moce_ds")
META = "moce_meta.json"


def model_signature(cfg: Config) -> dict[str, Any]:
    """What must match for a checkpoint to load into the model built from `cfg`."""
    return {
        "model.size": cfg.model.size,
        "moe.routing": cfg.moe.routing,
        "moe.num_experts": cfg.moe.num_experts,
        "moe.num_clusters": cfg.moe.num_clusters,
        "moe.layers": cfg.moe.layers,
        "moe.top_k": cfg.moe.top_k,
    }


def checkpoint_dir(cfg: Config) -> Path:
    return Path(cfg.output_dir) / "checkpoints"


def latest_tag(ckpt_dir: Path) -> str | None:
    """DeepSpeed's `latest` file names the newest complete tag; None when there is none."""
    latest = ckpt_dir / "latest"
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    return tag if (ckpt_dir / tag / META).is_file() else None


def read_meta(ckpt_dir: Path, tag: str) -> dict[str, Any]:
    return json.loads((ckpt_dir / tag / META).read_text())


def check_resume_compatible(cfg: Config, meta: dict[str, Any], tag: str) -> None:
    want, have = model_signature(cfg), meta["signature"]
    diffs = [f"{k}: checkpoint {have.get(k)!r} vs config {v!r}" for k, v in want.items() if have.get(k) != v]
    if diffs:
        raise ValueError(
            f"checkpoint '{tag}' in {cfg.output_dir} was written by a different model ({'; '.join(diffs)}): "
            f"resume with the checkpoint's settings or choose a new output_dir."
        )


def save_checkpoint(engine, cfg: Config, tag: str, position: dict[str, Any], is_main: bool) -> Path:
    """Every rank calls this (DeepSpeed writes expert and ZeRO shards per rank)."""
    ckpt_dir = checkpoint_dir(cfg)
    meta = {"signature": model_signature(cfg), "position": position, "tag": tag}
    # The meta file is written before DeepSpeed's save updates `latest`, so a tag named by `latest` has it.
    if is_main:
        (ckpt_dir / tag).mkdir(parents=True, exist_ok=True)
        tmp = ckpt_dir / tag / (META + ".tmp")
        tmp.write_text(json.dumps(meta, indent=1))
        tmp.replace(ckpt_dir / tag / META)
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"moce": meta})
    return ckpt_dir / tag


def prune_checkpoints(ckpt_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` tags (by step); never the one `latest` names. Rank 0 only."""
    current = latest_tag(ckpt_dir)
    tags = [p for p in ckpt_dir.iterdir() if p.is_dir() and (p / META).is_file()]
    tags.sort(key=lambda p: read_meta(ckpt_dir, p.name)["position"]["step"])
    for p in tags[: max(0, len(tags) - keep)]:
        if p.name != current:
            shutil.rmtree(p, ignore_errors=True)
