"""Reading the completion records of our checkpoints: which tags are complete and intact, and their metadata.

`moce_ds.engine.checkpoint` writes the records (after every rank's files are on disk); everything that only
reads a checkpoint (customisation, clustering features, evaluation, the run report, upcycling) uses this
module and never imports the engine.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

__all__ = ["META", "LATEST", "read_meta", "verify_tag", "complete_tags", "latest_tag"]

log = logging.getLogger("moce_ds")
META = "moce_meta.json"
LATEST = "latest"


def read_meta(ckpt_dir: Path, tag: str) -> dict[str, Any]:
    return json.loads((ckpt_dir / tag / META).read_text())


def verify_tag(ckpt_dir: Path, tag: str) -> str | None:
    """None when the tag is complete and intact; otherwise why not."""
    folder = ckpt_dir / tag
    if not (folder / META).is_file():
        return "no completion record (the save never finished)"
    try:
        files = read_meta(ckpt_dir, tag)["files"]
    except (json.JSONDecodeError, KeyError):
        return f"unreadable {META}"
    for name, size in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} were written"
    return None


def complete_tags(ckpt_dir: Path) -> list[str]:
    """Tags with a completion record, oldest first (by step)."""
    if not ckpt_dir.is_dir():
        return []
    tags = [p.name for p in ckpt_dir.iterdir() if p.is_dir() and (p / META).is_file()]
    steps = {}
    for t in tags:
        try:
            steps[t] = read_meta(ckpt_dir, t)["position"]["step"]
        except (json.JSONDecodeError, KeyError):
            steps[t] = -1
    return sorted(tags, key=lambda t: steps[t])


def latest_tag(ckpt_dir: Path) -> str | None:
    """The newest intact checkpoint; a broken newer one is skipped with a warning (never loaded)."""
    for tag in reversed(complete_tags(ckpt_dir)):
        problem = verify_tag(ckpt_dir, tag)
        if problem is None:
            return tag
        log.warning("checkpoint %s is refused: %s; falling back to an older one", ckpt_dir / tag, problem)
    return None
