"""Checkpoints through DeepSpeed's engine (expert files included), made atomic by a completion record.

DeepSpeed writes a tag folder from every rank. Only after every rank has finished (a barrier) does rank 0
write `moce_meta.json` into it, listing every file with its size, and then point our `latest` at it. A tag
without that record, or whose files no longer match it (a crash mid-save, a truncated file), is never
loaded: resume falls back to the newest complete one. The record also carries the model's shape and the
training position, read before DeepSpeed touches anything, so an incompatible resume fails with a clear message.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from moce_ds.checkpoints.records import LATEST, META, complete_tags, latest_tag, read_meta, verify_tag
from moce_ds.config.schema import Config
from moce_ds.moe.policies import routing_policy

__all__ = ["model_signature", "checkpoint_dir", "latest_tag", "complete_tags", "verify_tag", "read_meta",
           "check_resume_compatible", "save_checkpoint", "prune_checkpoints"]

log = logging.getLogger("moce_ds")


def model_signature(cfg: Config) -> dict[str, Any]:
    """What must match for a checkpoint to load into the model built from `cfg`."""
    return {"model.size": cfg.model.size, **routing_policy(cfg.moe).signature()}


def checkpoint_dir(cfg: Config) -> Path:
    return Path(cfg.output_dir) / "checkpoints"


def check_resume_compatible(cfg: Config, meta: dict[str, Any], tag: str) -> None:
    want, have = model_signature(cfg), meta["signature"]
    diffs = [f"{k}: checkpoint {have.get(k)!r} vs config {v!r}" for k, v in want.items() if have.get(k) != v]
    if diffs:
        raise ValueError(
            f"checkpoint '{tag}' in {cfg.output_dir} was written by a different model ({'; '.join(diffs)}): "
            f"resume with the checkpoint's settings or choose a new output_dir."
        )


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def save_checkpoint(engine, cfg: Config, tag: str, position: dict[str, Any], is_main: bool, barrier) -> Path:
    """Every rank calls this. Returns the tag folder once the checkpoint is complete on every rank."""
    ckpt_dir = checkpoint_dir(cfg)
    folder = ckpt_dir / tag
    if is_main and (folder / META).exists():
        (folder / META).unlink()  # re-saving a tag: it is incomplete until this save finishes
    barrier()
    meta = {"signature": model_signature(cfg), "position": position, "tag": tag}
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"moce": meta}, save_latest=False)
    barrier()  # every rank's files are on disk
    if is_main:
        meta["files"] = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file() and p.name != META}
        _atomic_write(folder / META, json.dumps(meta, indent=1))
        _atomic_write(ckpt_dir / LATEST, tag)  # informational; resume trusts the completion records
    barrier()
    return folder


def prune_checkpoints(ckpt_dir: Path, keep: int, pinned: set[str] | frozenset[str] = frozenset()) -> None:
    """Delete all but the newest `keep` complete tags and the `pinned` ones, and leftovers of unfinished saves.
    Rank 0 only."""
    tags = complete_tags(ckpt_dir)
    keep_set = (set(tags[-keep:]) if keep > 0 else set(tags)) | (set(pinned) & set(tags))
    for p in ckpt_dir.iterdir():
        if p.is_dir() and p.name not in keep_set:
            shutil.rmtree(p, ignore_errors=True)
