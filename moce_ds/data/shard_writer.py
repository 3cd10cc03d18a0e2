"""Write (key, png bytes, label) samples into WebDataset tar shards plus a manifest."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import tarfile
from collections.abc import Iterable
from pathlib import Path

from moce_ds.atomic_files import atomic_write_json
from moce_ds.data.keys import key_index

__all__ = ["add_member", "atomic_write_json", "sha256_file", "write_shards"]

logger = logging.getLogger("moce_ds")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # why: byte-identical shards for identical input (stable sha256)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def write_shards(
    samples: Iterable[tuple[str, bytes, int | None]],
    out_dir: Path,
    prefix: str = "shard",
    max_per_shard: int = 1000,
) -> dict:
    """Write ``(key, png_bytes, label_or_None)`` samples into ``{prefix}-{i:05d}.tar`` shards.

    Each shard is written under a temp name and renamed once complete; ``manifest.json`` (shards with
    name, num_samples, sha256; total) is written last and atomically, so its presence means the set
    is complete. Keys must be unique and contain no dots. Returns the manifest dict.
    """
    if max_per_shard < 1:
        raise ValueError(f"max_per_shard must be >= 1, got {max_per_shard}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shards: list[dict] = []
    seen: set[str] = set()
    tar: tarfile.TarFile | None = None
    tmp_path: Path | None = None
    count = 0

    def close_current() -> None:
        nonlocal tar, tmp_path, count
        if tar is None or tmp_path is None:
            return
        tar.close()
        final = out_dir / f"{prefix}-{len(shards):05d}.tar"
        os.replace(tmp_path, final)
        shards.append({"name": final.name, "num_samples": count, "sha256": sha256_file(final)})
        tar, tmp_path, count = None, None, 0

    try:
        for key, png, label in samples:
            if "." in key:
                raise ValueError(f"sample key {key!r} contains a dot; webdataset would split it")
            key_index(key)  # why: fail at write time, not when the trainer joins cluster ids
            if key in seen:
                raise ValueError(f"duplicate sample key {key!r}")
            seen.add(key)
            if tar is None:
                tmp_path = out_dir / f".{prefix}-{len(shards):05d}.tar.tmp-{os.getpid()}"
                tar = tarfile.open(tmp_path, "w")  # noqa: SIM115 - spans loop iterations; closed below
            add_member(tar, f"{key}.png", png)
            if label is not None:
                add_member(tar, f"{key}.cls", str(int(label)).encode())
            count += 1
            if count >= max_per_shard:
                close_current()
        close_current()
    except BaseException:
        if tar is not None:
            tar.close()
        if tmp_path is not None and tmp_path.exists():
            tmp_path.unlink()
        raise
    manifest = {"prefix": prefix, "shards": shards, "total": sum(s["num_samples"] for s in shards)}
    atomic_write_json(out_dir / "manifest.json", manifest)
    logger.info("wrote %d samples into %d shards under %s", manifest["total"], len(shards), out_dir)
    return manifest
