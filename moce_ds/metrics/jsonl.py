"""Append-only JSON-lines metrics log (one object per line, flushed, so a crash loses at most one line)."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from moce_ds.atomic_files import atomic_write_text

__all__ = ["JsonlWriter", "read_jsonl", "append_jsonl", "supersede_after"]

log = logging.getLogger("moce_ds")


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class JsonlWriter:
    """Appends to ``path``. ``keep_through_step``: a run resumed from that step first moves the records of later
    steps (trained again from the checkpoint) to ``<name>.superseded.jsonl``, so the log holds each step once."""

    def __init__(self, path: Path, keep_through_step: int | None = None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        if keep_through_step is not None:
            supersede_after(path, keep_through_step)
        self._f = path.open("a", buffering=1)

    def write(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps(_clean(record)) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def supersede_after(path: Path, step: int) -> int:
    """Move the lines of ``path`` whose record has a "step" above ``step`` (and a torn last line, from a crash
    mid-write) to ``<stem>.superseded.jsonl`` beside it, appended in their order; the rest is rewritten atomically.
    Returns how many lines moved."""
    if not path.is_file():
        return 0
    keep, moved = [], []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            later = isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] > step
        except json.JSONDecodeError:
            later = True
        (moved if later else keep).append(line)
    if not moved:
        return 0
    with path.with_name(path.stem + ".superseded.jsonl").open("a") as f:
        f.write("".join(line + "\n" for line in moved))
    atomic_write_text(path, "".join(line + "\n" for line in keep))
    log.warning("resumed at step %d: %d later record(s) of %s, trained again from the checkpoint, moved to %s",
                step, len(moved), path, path.with_name(path.stem + ".superseded.jsonl"))
    return len(moved)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def append_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> Path:
    """Append records to a JSON-lines file (creating its folder), one object per line; returns the path."""
    writer = JsonlWriter(Path(path))
    try:
        for record in records:
            writer.write(record)
    finally:
        writer.close()
    return writer.path
