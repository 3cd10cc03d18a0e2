"""Checkpoints through DeepSpeed's engine (expert files included), made atomic by a completion record.

DeepSpeed writes a tag folder from every rank. Only after every rank has finished (a barrier) does rank 0
write `moce_meta.json` into it, listing every file with its size, and then point our `latest` at it. A tag
without that record, or whose files no longer match it (a crash mid-save, a truncated file), is never
loaded: resume falls back to the newest complete one. The record also carries the model's shape and the
training position, read before DeepSpeed touches anything, so an incompatible resume fails with a clear message.
"""

from __future__ import annotations

import errno
import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from moce_ds.atomic_files import atomic_write_text
from moce_ds.checkpoints import records
from moce_ds.checkpoints.records import LATEST, META, complete_tags, read_meta, verify_tag
from moce_ds.config.schema import Config
from moce_ds.engine.distributed import all_reduce_sum
from moce_ds.moe.policies import routing_policy

__all__ = ["model_signature", "checkpoint_dir", "latest_tag", "complete_tags", "verify_tag", "read_meta",
           "check_resume_compatible", "check_resume_ep_size", "written_by_ranks", "save_checkpoint",
           "prune_checkpoints", "CheckpointSpaceError"]

log = logging.getLogger("moce_ds")
_MIB = 2**20


class CheckpointSpaceError(ValueError):
    """A save that would not fit, or that failed writing: one line naming the space and the folder (a ValueError, so
    the launcher prints it as its one "error:" line). The older checkpoints are left as they were."""


def latest_tag(ckpt_dir: Path) -> str | None:
    """The newest intact checkpoint (moce_ds.checkpoints.records.latest_tag, which names every refused one), and a
    warning naming each tag folder a save left without its completion record (a crash or kill mid-save)."""
    tag = records.latest_tag(ckpt_dir)
    complete = set(complete_tags(ckpt_dir))
    for p in sorted(ckpt_dir.iterdir()) if ckpt_dir.is_dir() else []:
        if p.is_dir() and p.name not in complete:
            log.warning("checkpoint %s is skipped: no completion record (its save never finished); %s", p,
                        f"using '{tag}' instead" if tag else "no complete checkpoint is left")
    return tag


def model_signature(cfg: Config) -> dict[str, Any]:
    """What must match for a checkpoint to load into the model built from `cfg`."""
    return {"model.size": cfg.model.size, **routing_policy(cfg.moe).signature()}


def checkpoint_dir(cfg: Config) -> Path:
    return Path(cfg.output_dir) / "checkpoints"


# one ZeRO optimizer-state file per data-parallel rank (bf16_ prefix under bf16): what the meta of checkpoints
# written before world_size was recorded still tells about the ranks that wrote them
_ZERO_RANK_FILE = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt")


def written_by_ranks(meta: dict[str, Any]) -> int | None:
    """How many ranks wrote a checkpoint: recorded, or counted from its ZeRO files; None when unknown."""
    if "world_size" in meta:
        return int(meta["world_size"])
    ranks = {m.group(1) for name in meta.get("files", {}) if (m := _ZERO_RANK_FILE.fullmatch(name))}
    return len(ranks) or None


def check_resume_compatible(cfg: Config, meta: dict[str, Any], tag: str, world_size: int) -> None:
    """The checkpoint was written by this model on this many ranks (before ep_size is resolved, which would name the
    world size instead of the real cause)."""
    want, have = model_signature(cfg), meta["signature"]
    diffs = [f"{k}: checkpoint {have.get(k)!r} vs config {v!r}" for k, v in want.items() if have.get(k) != v]
    if diffs:
        raise ValueError(
            f"checkpoint '{tag}' in {cfg.output_dir} was written by a different model ({'; '.join(diffs)}): "
            f"resume with the checkpoint's settings or choose a new output_dir."
        )
    # ZeRO-2 keeps each rank's slice of the optimizer state (and each expert group's) in that rank's own file;
    # DeepSpeed does not re-partition it on load, so another world size or ep_size fails deep inside load_checkpoint
    ranks = written_by_ranks(meta)
    if ranks is not None and ranks != world_size:
        raise ValueError(
            f"checkpoint '{tag}' in {cfg.output_dir} was written by {ranks} rank(s); this run has {world_size}: "
            f"resume with --num_gpus {ranks} (changing the number of ranks on resume is not supported: ZeRO-2 "
            f"partitions the optimizer state per rank).")


def check_resume_ep_size(cfg: Config, meta: dict[str, Any], tag: str, ep_size: int) -> None:
    if "ep_size" in meta and int(meta["ep_size"]) != ep_size:
        raise ValueError(
            f"checkpoint '{tag}' in {cfg.output_dir} was written with ep_size {meta['ep_size']}; this run resolves "
            f"ep_size {ep_size}: resume with moe.ep_size={meta['ep_size']} (the expert optimizer state is "
            f"partitioned per expert-parallel group).")


def save_checkpoint(engine, cfg: Config, tag: str, position: dict[str, Any], is_main: bool, barrier,
                    layout: dict[str, int] | None = None) -> Path:
    """Every rank calls this. Returns the tag folder once the checkpoint is complete on every rank.

    `layout` ({"world_size": .., "ep_size": ..}) is recorded so a resume on another layout is refused up front."""
    ckpt_dir = checkpoint_dir(cfg)
    folder = ckpt_dir / tag
    # every rank checks (node-local disks differ); all stop together, before anything is written
    problem = _space_problem(ckpt_dir, tag)
    if all_reduce_sum(torch.tensor([float(problem is not None)]))[0] > 0:
        raise CheckpointSpaceError(problem or f"not enough disk space for checkpoint {folder} on another rank (its "
                                   f"log names it); the older checkpoints are intact.")
    if is_main and (folder / META).exists():
        (folder / META).unlink()  # re-saving a tag: it is incomplete until this save finishes
    barrier()
    meta = {"signature": model_signature(cfg), "position": position, "tag": tag, **(layout or {})}
    try:
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"moce": meta}, save_latest=False)
    except (RuntimeError, OSError) as e:  # torch's "enforce fail at inline_container.cc" is a failed write
        if not _is_write_failure(e):
            raise
        raise CheckpointSpaceError(
            f"writing checkpoint {folder} failed ({_free_mib(ckpt_dir):.0f} MiB free on its file system: most likely "
            f"out of disk space): free space there or lower train.keep_checkpoints, then continue with --resume; "
            f"{_intact(ckpt_dir, tag)}") from e
    barrier()  # every rank's files are on disk
    if is_main:
        meta["files"] = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file() and p.name != META}
        atomic_write_text(folder / META, json.dumps(meta, indent=1))
        atomic_write_text(ckpt_dir / LATEST, tag)  # informational; resume trusts the completion records
    barrier()
    return folder


def _free_mib(path: Path) -> float:
    while not path.exists() and path != path.parent:  # the first save: the folder is not there yet
        path = path.parent
    return shutil.disk_usage(path).free / _MIB


def _intact(ckpt_dir: Path, tag: str) -> str:
    older = [t for t in complete_tags(ckpt_dir) if t != tag]
    return f"the older checkpoint {older[-1]} is intact." if older else "no older checkpoint exists."


def _space_problem(ckpt_dir: Path, tag: str) -> str | None:
    """None when the file system holding `ckpt_dir` has room for another checkpoint as large as the previous one."""
    older = [t for t in complete_tags(ckpt_dir) if t != tag]
    if not older:
        return None  # nothing to measure by; a failed write is still reported by save_checkpoint
    try:
        need = sum(read_meta(ckpt_dir, older[-1])["files"].values()) / _MIB
    except (ValueError, KeyError, OSError):
        return None
    free = _free_mib(ckpt_dir)
    if free >= need:
        return None
    return (f"not enough disk space for checkpoint {ckpt_dir / tag}: {free:.0f} MiB free on its file system, the "
            f"previous checkpoint took {need:.0f} MiB; free space there or lower train.keep_checkpoints, then "
            f"continue with --resume; the older checkpoint {older[-1]} is intact.")


def _is_write_failure(e: BaseException) -> bool:
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return "inline_container.cc" in str(e) or "No space left" in str(e)


def prune_checkpoints(ckpt_dir: Path, keep: int, pinned: set[str] | frozenset[str] = frozenset()) -> None:
    """Delete all but the newest `keep` complete tags and the `pinned` ones, and leftovers of unfinished saves.
    Rank 0 only."""
    tags = complete_tags(ckpt_dir)
    keep_set = (set(tags[-keep:]) if keep > 0 else set(tags)) | (set(pinned) & set(tags))
    for p in ckpt_dir.iterdir():
        if p.is_dir() and p.name not in keep_set:
            shutil.rmtree(p, ignore_errors=True)
