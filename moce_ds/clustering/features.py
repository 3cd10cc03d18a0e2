"""Featurising the shards of a data set for the clustering job, with a per-shard cache (DESIGN.md §1.1).

Which features: :mod:`moce_ds.clustering.feature_sources` (the one registry of feature sources).
:func:`featurize_shards` gives each rank its share of the shards and caches every finished shard as
``<cache>/<stem>.feats.npy`` [n, d] float32 + ``<stem>.index.npy`` [n] int64 + a done record (url, feature
source, image size, width), so a rerun skips them. One cache folder holds one feature source at one image size:
a folder with records of another source, image size or width is refused (:func:`check_feature_cache`), never
mixed into the k-means or silently overwritten.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from moce_ds.clustering.comm import Communicator, LocalComm
from moce_ds.clustering.feature_sources import FeatureExtractor, square_image
from moce_ds.data.images import decode_image, image_member
from moce_ds.data.keys import key_index
from moce_ds.data.shard_writer import atomic_write_json
from moce_ds.data.sources import SKIP_MARKER, read_tar_samples

__all__ = ["check_feature_cache", "decode_shard", "featurize_shards"]

logger = logging.getLogger("moce_ds")


def decode_shard(url: str, image_size: int, expected: int | None = None) -> Iterator[tuple[int, np.ndarray] | str]:
    """Yield (global index, uint8 [S, S, 3]) per good sample of one shard, or a skip reason string per bad one."""
    for s in read_tar_samples(iter([{"url": url}]), None if expected is None else {url: expected}):
        if SKIP_MARKER in s:
            yield s[SKIP_MARKER]
            continue
        try:
            index = key_index(s["__key__"])
        except ValueError:
            yield "bad_key"
            continue
        data = image_member(s)
        if data is None:
            yield "no_image"
            continue
        try:
            img = decode_image(data)
        except Exception:  # noqa: BLE001 - an undecodable image is a skipped sample, never a crash
            yield "decode_error"
            continue
        yield index, square_image(img, image_size)


def _stem(url: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", Path(url.split("::")[0]).name.removesuffix(".tar"))[-120:]


def _featurize_one(url: str, extractor: FeatureExtractor, batch_size: int,
                   expected: int | None) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    feats, index, skipped = [], [], {}
    imgs: list[np.ndarray] = []
    idx: list[int] = []

    def flush() -> None:
        if imgs:
            feats.append(extractor(np.stack(imgs), np.asarray(idx, np.int64)))
            index.extend(idx)
            imgs.clear()
            idx.clear()

    for item in decode_shard(url, extractor.image_size, expected):
        if isinstance(item, str):
            skipped[item] = skipped.get(item, 0) + 1
            continue
        idx.append(item[0])
        imgs.append(item[1])
        if len(imgs) == batch_size:
            flush()
    flush()
    x = np.concatenate(feats).astype(np.float32) if feats else np.zeros((0, 0), np.float32)
    return x, np.asarray(index, np.int64), skipped


def check_feature_cache(cache_dir: Path, extractor: FeatureExtractor) -> str | None:
    """Why the cache folder cannot serve ``extractor`` (a one-line error naming the folder and the fix), or None."""
    records = sorted((Path(cache_dir) / ".done").glob("*.json"))
    widths = set()
    for done in records:
        rec = json.loads(done.read_text())
        theirs = (rec.get("source"), rec.get("image_size"))
        if theirs != (extractor.source, extractor.image_size):
            return (f"feature cache {cache_dir} holds features of {theirs[0]} at image size {theirs[1]} "
                    f"({done.name}), not of {extractor.source} at {extractor.image_size}: pass --feature-cache "
                    f"<an empty or matching folder>, or delete {cache_dir} to recompute.")
        if rec.get("dim"):
            widths.add(int(rec["dim"]))
    if len(widths) > 1:
        return (f"feature cache {cache_dir} holds features of several widths {sorted(widths)} for one source: "
                f"delete {cache_dir} to recompute.")
    return None


def featurize_shards(urls: list[str], extractor: FeatureExtractor, cache_dir: Path | None,
                     comm: Communicator | None = None, counts: list[int] | None = None, batch_size: int = 256,
                     progress: bool = False) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """This rank's shards (every world_size-th of ``urls``) -> features [n, d], global indices [n], skip counts.

    With ``cache_dir``, a shard whose done record names the same url is loaded instead of recomputed; a folder of
    another feature source or image size raises ValueError on every rank (checked on rank 0, before any work).
    """
    comm = comm if comm is not None else LocalComm()
    mine = list(range(comm.rank, len(urls), comm.world_size))
    if cache_dir is not None:
        err = check_feature_cache(Path(cache_dir), extractor) if comm.rank == 0 else None
        err = comm.broadcast(err)  # every rank raises, so none waits in a collective
        if err:
            raise ValueError(err)
        (Path(cache_dir) / ".done").mkdir(parents=True, exist_ok=True)
    xs, ids, skipped = [], [], {}
    reused = 0
    quiet = not progress or comm.rank != 0 or not sys.stderr.isatty()  # progress on rank 0, on a terminal
    for i in tqdm(mine, desc="features", disable=quiet, leave=False):
        url = urls[i]
        stem = _stem(url)
        done = None if cache_dir is None else Path(cache_dir) / ".done" / f"{stem}.json"
        if done is not None and done.is_file():
            rec = json.loads(done.read_text())
            if rec.get("url") == url:  # source and image size: checked for the whole folder above
                xs.append(np.load(Path(cache_dir) / f"{stem}.feats.npy"))
                ids.append(np.load(Path(cache_dir) / f"{stem}.index.npy"))
                reused += 1
                for r, c in rec.get("skipped", {}).items():
                    skipped[r] = skipped.get(r, 0) + c
                continue
        x, index, sk = _featurize_one(url, extractor, batch_size, None if counts is None else counts[i])
        for r, c in sk.items():
            skipped[r] = skipped.get(r, 0) + c
        if cache_dir is not None:
            for name, arr in ((f"{stem}.feats.npy", x), (f"{stem}.index.npy", index)):
                tmp = Path(cache_dir) / f".{name}.tmp-{os.getpid()}.npy"
                np.save(tmp, arr)
                os.replace(tmp, Path(cache_dir) / name)  # whole files only; the done record comes last
            atomic_write_json(done, {"url": url, "source": extractor.source, "image_size": extractor.image_size,
                                     "num": int(index.shape[0]),
                                     "dim": int(x.shape[1]) if x.size else 0, "skipped": sk})
        xs.append(x)
        ids.append(index)
    if reused:
        logger.info("rank %d: reused cached features of %d of its %d shards", comm.rank, reused, len(mine))
    xs = [x for x in xs if x.size]
    feats = np.concatenate(xs) if xs else np.zeros((0, 0), np.float32)
    return feats, (np.concatenate(ids) if ids else np.zeros(0, np.int64)), skipped
