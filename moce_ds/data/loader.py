"""Streaming training loader on webdataset 1.0: shards -> shuffle -> decode + MAE augment + cluster join -> batches.

Expert-parallel ranks must route the same number of tokens (DESIGN.md §4), so every rank yields exactly
``steps_per_epoch`` batches of exactly ``batch_size`` samples, in either mode:

- **resampled** (default): each rank and worker draws shards with replacement from its own seeded stream (an
  infinite stream, so no node/worker split is needed and none can starve); the epoch length is imposed on the
  loader, not on the per-worker dataset (``with_epoch`` on the dataset would count per worker).
- **non-resampled**: each shard is read once per epoch. The shard order is permuted per epoch (same permutation
  on every rank), then split by node with the *explicit* rank/world_size (webdataset's default node splitter
  refuses WORLD_SIZE > 1, and ``split_by_node`` reads the environment) and by DataLoader worker. Workers emit
  their ragged last batch and the main process merges those, so a rank loses fewer than ``batch_size`` samples.
  The batch count comes from the manifest's per-shard counts: :func:`epoch_batches` is a bound that holds for
  every rank and every epoch's permutation, so all ranks stop at the same count without communicating. If bad
  samples push a rank below it, the rank tops up from a resampled stream of its own shards (logged).

Randomness is derived from (seed, epoch, rank, worker) only, so a run is reproducible. Bad samples (undecodable
image, no image member, no cluster id, key without index, a tar cut short) are skipped and counted per reason;
each batch's ``skipped`` carries the counts observed since the previous batch. A shard whose manifest records a
sha256 is hashed as it streams; one read to its end with another digest is counted as ``bad_shard`` (once per shard:
its samples were already delivered) with a warning naming it, or stops the run under ``strict``.
"""

from __future__ import annotations

import io
import logging
import math
import random
import signal
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.functional as TF
import webdataset as wds
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info
from torchvision.transforms import InterpolationMode

from moce_ds.data.images import (
    IMAGE_EXTS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    decode_image,
    image_member,
    normalize,
    to_uint8_chw,
)
from moce_ds.data.keys import key_index
from moce_ds.data.sources import SKIP_MARKER, ShardSource, read_tar_samples, resolve_shards

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SKIP_REASONS",
    "EpochLoader",
    "epoch_batches",
    "make_train_loader",
    "rank_shards",
    "to_tensor",
    "worker_seed",
]

logger = logging.getLogger("moce_ds")

# decode_error: image bytes that do not decode; no_image: a sample without a jpg/jpeg/png member;
# missing_cluster: index outside the round's table or -1 there; bad_key: no parseable global index;
# truncated_tar: samples lost to a shard that breaks off (cut file, failed pipe, fewer samples than the manifest);
# bad_shard: shards read to their end whose sha256 differs from the manifest's (counted per shard, not per sample)
SKIP_REASONS: tuple[str, ...] = ("decode_error", "no_image", "missing_cluster", "bad_key", "truncated_tar",
                                 "bad_shard")


def to_tensor(images: np.ndarray, mean: tuple[float, ...] = IMAGENET_MEAN,
              std: tuple[float, ...] = IMAGENET_STD, device: torch.device | str | None = None) -> torch.Tensor:
    """uint8 (N, S, S, 3) -> float32 (N, 3, S, S) on ``device`` (default CPU), normalised like pre-training (or
    with a model's own mean/std); the uint8 images travel to the device, the floats are made there."""
    x = to_uint8_chw(images)
    if device is not None:
        x = x.to(device, non_blocking=True)
    return normalize(x, mean, std)


def _zero_counts() -> dict[str, int]:
    return dict.fromkeys(SKIP_REASONS, 0)


def worker_seed(seed: int, epoch: int, rank: int, purpose: int) -> int:
    """A 63-bit seed distinct per (seed, epoch, rank, DataLoader worker, purpose); call inside the worker."""
    info = get_worker_info()
    worker = info.id if info is not None else 0
    return int(np.random.SeedSequence([seed, epoch, rank, worker, purpose]).generate_state(2, np.uint64)[0] >> 1)


# ----------------------------------------------------------------------------------------------- shard streams


def rank_shards(num_shards: int, seed: int, epoch: int, rank: int, world_size: int) -> list[int]:
    """Indices of the shards ``rank`` reads in ``epoch`` (non-resampled): one permutation shared by all ranks,
    dealt round-robin, so the ranks' shard sets are disjoint and cover every shard once."""
    order = np.random.default_rng([seed, epoch, 0x5A4D]).permutation(num_shards)
    return [int(i) for i in order[rank::world_size]]


def epoch_batches(counts: Sequence[int], batch_size: int, world_size: int) -> int:
    """Batches every rank can deliver per epoch in non-resampled mode, whatever the epoch's shard permutation.

    Each rank gets at least floor(S / W) shards; the worst such rank holds the floor(S / W) smallest shards.
    With ragged worker batches merged in the main process a rank yields floor(samples / batch_size) batches.
    """
    if world_size > len(counts):
        raise ValueError(f"non-resampled loading needs at least one shard per rank: {len(counts)} shard(s) for "
                         f"{world_size} ranks; write more shards (make_shards --num-shards) or use data.resampled=true")
    per_rank = len(counts) // world_size
    return int(sum(sorted(int(c) for c in counts)[:per_rank]) // batch_size)


class _WorkerSeed:
    """Picklable seed function for ``wds.ResampledShards`` (evaluated inside each worker)."""

    def __init__(self, seed: int, epoch: int, rank: int, purpose: int = 0) -> None:
        self.seed, self.epoch, self.rank, self.purpose = seed, epoch, rank, purpose

    def __call__(self) -> int:
        return worker_seed(self.seed, self.epoch, self.rank, purpose=self.purpose)


class _EpochShards(IterableDataset):
    """This rank's shards of one epoch, split across DataLoader workers (each shard read once per epoch)."""

    def __init__(self, urls: list[str]) -> None:
        super().__init__()
        self.urls = urls  # already this rank's share, in this epoch's order

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for url in self.urls[worker::num_workers]:
            yield {"url": url}


class _Shuffle:
    """Shuffle buffer on raw (undecoded) samples, seeded per worker at iteration time."""

    def __init__(self, bufsize: int, seed: int, epoch: int, rank: int) -> None:
        self.bufsize, self.seed, self.epoch, self.rank = bufsize, seed, epoch, rank

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        if self.bufsize <= 1:
            yield from src
            return
        rng = random.Random(worker_seed(self.seed, self.epoch, self.rank, purpose=1))
        yield from wds.filters._shuffle(src, bufsize=self.bufsize, initial=self.bufsize, rng=rng)


class _ReadTars:
    """Picklable tar stage (url dicts -> samples + skip markers; shards hashed against the manifest's sha256)."""

    def __init__(self, expected: dict[str, int] | None, sha256: dict[str, str] | None) -> None:
        self.expected, self.sha256 = expected, sha256

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        return read_tar_samples(src, self.expected, self.sha256)


# ----------------------------------------------------------------------------------------------- decode + augment


def _random_resized_crop_params(
    rng: random.Random, width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float]
) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params, drawing from an explicit RNG instead of torch's global one."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    # fallback: central crop with the ratio clamped into range
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class _Process:
    """Decode, join the cluster id, MAE-augment; skip + count bad samples (runs inside each worker).

    The counts of samples skipped since the last good one ride on the next good sample (and on a final
    counts-only item at the end of the stream), so counts made in worker processes reach the trainer.
    """

    def __init__(
        self, cluster_ids_path: Path | None, image_size: int, strict: bool, seed: int, epoch: int, rank: int,
        uint8: bool = False, draft: bool = False,
    ) -> None:
        self.cluster_ids_path = None if cluster_ids_path is None else str(cluster_ids_path)
        self.image_size = image_size
        self.strict = strict
        self.seed, self.epoch, self.rank = seed, epoch, rank
        self.uint8, self.draft = uint8, draft

    def _skip(self, reason: str, sample: dict, detail: str, counts: dict[str, int], logged: set[str],
              n: int = 1) -> None:
        key, url = sample.get("__key__", "?"), sample.get("__url__", "?")
        msg = f"bad sample ({reason}): shard {url} key {key}: {detail}"
        if self.strict:
            raise ValueError(msg + " (strict mode; disable data.strict to skip and count such samples)")
        counts[reason] += n
        if reason not in logged:  # why: once per reason per worker; the counts carry the rest
            logged.add(reason)
            logger.warning("%s; skipping such samples and counting them", msg)

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        # why: open the table lazily in the worker (an mmap does not survive pickling into workers); a plain
        # ndarray view of the map skips np.memmap's per-item subclass overhead (int32 [num_images])
        ids = None
        if self.cluster_ids_path is not None:
            ids = np.load(self.cluster_ids_path, mmap_mode="r").view(np.ndarray)
        rng = random.Random(worker_seed(self.seed, self.epoch, self.rank, purpose=2))
        counts = _zero_counts()
        logged: set[str] = set()
        for sample in src:
            if SKIP_MARKER in sample:
                self._skip(sample[SKIP_MARKER], sample, sample["detail"], counts, logged, sample.get("count", 1))
                continue
            key = sample.get("__key__", "")
            try:
                index = key_index(key)
            except ValueError as e:
                self._skip("bad_key", sample, str(e), counts, logged)
                continue
            if ids is None:
                cluster = 0
            elif index >= ids.shape[0] or ids[index] < 0:
                detail = (
                    f"index {index} is outside the table of {ids.shape[0]}"
                    if index >= ids.shape[0]
                    else f"index {index} has no cluster id (-1)"
                )
                self._skip("missing_cluster", sample, f"{detail} in {self.cluster_ids_path}", counts, logged)
                continue
            else:
                cluster = int(ids[index])
            data = image_member(sample)
            if data is None:
                have = sorted(k for k in sample if not k.startswith("__"))
                self._skip("no_image", sample, f"no image member among {IMAGE_EXTS} (has {have})", counts, logged)
                continue
            try:
                image = self._decode_augment(data, rng)  # a full decode, so truncated files fail here
            except Exception as e:  # noqa: BLE001 - any decoder failure is a bad sample
                self._skip("decode_error", sample, f"{type(e).__name__}: {e}", counts, logged)
                continue
            yield {"image": image, "cluster": cluster, "index": index, "skipped": counts}
            counts = _zero_counts()
        if any(counts.values()):
            yield {"image": None, "skipped": counts}  # trailing skips, after the last good sample

    def _decode_augment(self, data: bytes, rng: random.Random) -> torch.Tensor:
        """Decode + MAE pre-training augmentation (RandomResizedCrop(0.2, 1), bicubic, flip) -> uint8 [3, S, S]
        (``uint8``) or float32 [3, S, S] ImageNet-normalised.

        ``draft``: the crop is drawn on the full image's size (read from the header, before any decode), then the
        JPEG is decoded at the smallest 1/2^k scale that still gives the crop at least S px each way, and the crop
        is resized from there: the same random crop and flip, a fraction of the decode and resize work."""
        if not self.draft:
            img = decode_image(data)
            top, left, h, w = _random_resized_crop_params(rng, img.width, img.height, (0.2, 1.0), (3 / 4, 4 / 3))
        else:
            with Image.open(io.BytesIO(data)) as im:
                full_w, full_h = im.size
                top, left, h, w = _random_resized_crop_params(rng, full_w, full_h, (0.2, 1.0), (3 / 4, 4 / 3))
                if im.format == "JPEG":
                    s = self.image_size
                    im.draft("RGB", (math.ceil(full_w * s / w), math.ceil(full_h * s / h)))
                img = im.convert("RGB")
            if img.size != (full_w, full_h):  # decoded at a reduced scale: the crop box in its pixels
                fx, fy = img.width / full_w, img.height / full_h
                box = (left * fx, top * fy, (left + w) * fx, (top + h) * fy)
                img = img.resize((self.image_size, self.image_size), Image.BICUBIC, box=box)
                top = left = None
        if top is not None:
            img = TF.resized_crop(img, top, left, h, w, [self.image_size, self.image_size],
                                  InterpolationMode.BICUBIC)
        if rng.random() < 0.5:
            img = TF.hflip(img)
        x = TF.pil_to_tensor(img)  # uint8 [3, S, S]
        return x if self.uint8 else normalize(x[None])[0]


def _collate(samples: list[dict], skipped: dict[str, int], image_size: int, dtype: torch.dtype) -> dict:
    if not samples:  # a counts-only batch (end of a worker's stream)
        return {"images": torch.empty(0, 3, image_size, image_size, dtype=dtype),
                "cluster": torch.empty(0, dtype=torch.int64), "index": torch.empty(0, dtype=torch.int64),
                "skipped": skipped}
    return {
        "images": torch.stack([s["image"] for s in samples]),  # [B, 3, H, W] uint8 or float32
        "cluster": torch.tensor([s["cluster"] for s in samples], dtype=torch.int64),  # [B]
        "index": torch.tensor([s["index"] for s in samples], dtype=torch.int64),  # [B]
        "skipped": skipped,
    }


class _Batch:
    """Batches of ``batch_size`` (in the worker); with ``partial`` the ragged rest and trailing counts too."""

    def __init__(self, batch_size: int, partial: bool, image_size: int, dtype: torch.dtype) -> None:
        self.batch_size, self.partial, self.image_size, self.dtype = batch_size, partial, image_size, dtype

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        buf: list[dict] = []
        pending = _zero_counts()
        for s in src:
            for r, c in s["skipped"].items():
                pending[r] += c
            if s["image"] is None:
                continue
            buf.append(s)
            if len(buf) == self.batch_size:
                yield _collate(buf, pending, self.image_size, self.dtype)
                buf, pending = [], _zero_counts()
        if self.partial and (buf or any(pending.values())):
            yield _collate(buf, pending, self.image_size, self.dtype)


def _add_counts(into: dict[str, int], more: dict[str, int]) -> None:
    for r, c in more.items():
        into[r] = into.get(r, 0) + int(c)


def _full_batches(batches: Iterable[dict], batch_size: int) -> Iterator[dict]:
    """Pass full batches through; merge ragged ones (the end of each worker's stream) into full ones.

    Counts of counts-only / leftover batches ride on the next batch; a final ragged rest (< batch_size samples) is
    dropped but its counts come out as a last counts-only batch.
    """
    carry: list[dict] = []
    carry_n = 0
    pending = _zero_counts()
    for b in batches:
        n = b["images"].shape[0]
        if n == batch_size and not carry:
            _add_counts(b["skipped"], pending)
            pending = _zero_counts()
            yield b
            continue
        _add_counts(pending, b["skipped"])
        if n:
            carry.append(b)
            carry_n += n
        while carry_n >= batch_size:
            merged = {k: torch.cat([c[k] for c in carry]) for k in ("images", "cluster", "index")}
            out = {k: v[:batch_size] for k, v in merged.items()}
            rest = {k: v[batch_size:] for k, v in merged.items()}
            out["skipped"], pending = pending, _zero_counts()
            yield out
            carry_n -= batch_size
            carry = [dict(rest, skipped=_zero_counts())] if carry_n else []
    if any(pending.values()):
        yield {"images": None, "skipped": pending}


class EpochLoader:
    """One epoch of exactly ``steps`` batches for this rank (see the module docstring); ``len()`` works."""

    def __init__(self, loader: Iterable[dict], steps: int, batch_size: int, lookahead: bool,
                 topup: Iterable[dict] | None = None, rank: int = 0) -> None:
        self.loader, self.steps, self.batch_size = loader, steps, batch_size
        self.lookahead, self.topup, self.rank = lookahead, topup, rank

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[dict]:
        n = 0
        held: dict | None = None  # why: hold one batch back so trailing skip counts join the epoch's last batch
        for b in _full_batches(self.loader, self.batch_size):
            if b["images"] is None:  # counts only
                if held is not None:
                    _add_counts(held["skipped"], b["skipped"])
                continue
            if not self.lookahead:
                yield b
                n += 1
            else:
                if held is not None:
                    yield held
                    n += 1
                held = b
            if n == self.steps:
                return
        if held is not None:
            yield held
            n += 1
        if n < self.steps:
            if self.topup is None:
                raise RuntimeError(f"loader ran dry after {n} of {self.steps} batches")
            logger.warning("rank %d: bad samples left %d of %d batches this epoch; topping up %d batch(es) from a "
                           "resampled stream of this rank's shards", self.rank, n, self.steps, self.steps - n)
            for b in _full_batches(self.topup, self.batch_size):
                if b["images"] is None:
                    continue
                yield b
                n += 1
                if n == self.steps:
                    return


# ----------------------------------------------------------------------------------------------- loader


def _pipeline(shards: IterableDataset, source: ShardSource, cluster_ids_path: Path | None, batch_size: int,
              partial: bool, image_size: int, seed: int, epoch: int, shuffle_buffer: int, strict: bool,
              rank: int, uint8: bool, draft: bool) -> wds.DataPipeline:
    expected = None if source.counts is None else dict(zip(source.urls, source.counts))
    sha256 = None if source.sha256 is None else {u: d for u, d in zip(source.urls, source.sha256) if d}
    return wds.DataPipeline(
        shards,
        _ReadTars(expected, sha256),
        _Shuffle(shuffle_buffer, seed, epoch, rank),  # before decode: the buffer holds compressed bytes
        _Process(cluster_ids_path, image_size, strict, seed, epoch, rank, uint8, draft),
        _Batch(batch_size, partial, image_size, torch.uint8 if uint8 else torch.float32),
    )


def _ignore_stop_signals(worker_id: int) -> None:
    """Loader workers ignore SIGTERM/SIGINT: a scheduler signals every process of the job, and the trainer
    (which finishes its step and checkpoints first) shuts the workers down itself."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def make_train_loader(
    urls: str | Path | Sequence[str | Path] | ShardSource,
    cluster_ids_path: Path | None,
    batch_size: int,
    steps_per_epoch: int | None,
    image_size: int,
    num_workers: int = 2,
    seed: int = 0,
    epoch: int = 0,
    shuffle_buffer: int = 1000,
    strict: bool = False,
    rank: int = 0,
    world_size: int = 1,
    resampled: bool = True,
    pin_memory: bool | None = None,
    uint8: bool = False,
    draft: bool = False,
) -> EpochLoader:
    """Loader for one epoch of ``steps_per_epoch`` batches on this rank.

    ``urls``: a shard folder or manifest, a brace pattern, ``pipe:``/URL sources, or a list (see
    :func:`moce_ds.data.sources.resolve_shards`). ``steps_per_epoch=None`` in non-resampled mode: the
    :func:`epoch_batches` bound from the manifest's counts. ``pin_memory=None``: pinned when CUDA is present (copy
    with ``.to(device, non_blocking=True)``).

    ``uint8``: images leave the workers as uint8 0..255 (4x fewer bytes through shared memory and the pinned copy;
    the model normalises them on its device, :meth:`MaskedAutoencoderViT.pixels`), else float32 normalised.
    ``draft``: JPEGs are decoded at the reduced scale the random crop needs (same crops, slightly different
    pixels; see ``_Process._decode_augment``).

    Yields dicts: ``images`` uint8 or float32 [B, 3, H, W] (float: ImageNet-normalised), ``cluster`` int64 [B]
    (zeros when ``cluster_ids_path`` is None), ``index`` int64 [B] (global image index from the key), ``skipped``
    dict[reason, int] of samples dropped since the previous batch (:data:`SKIP_REASONS`). Build a new loader per
    epoch with ``epoch`` set, so the streams change.
    """
    source = urls if isinstance(urls, ShardSource) else resolve_shards(urls)
    if batch_size < 1 or image_size < 1 or (steps_per_epoch is not None and steps_per_epoch < 1):
        raise ValueError(
            f"batch_size, steps_per_epoch, image_size must be >= 1, got {batch_size}, {steps_per_epoch}, {image_size}"
        )
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must lie in [0, world_size={world_size}), got {rank}")
    if cluster_ids_path is not None and not Path(cluster_ids_path).is_file():
        raise FileNotFoundError(f"cluster id table {cluster_ids_path} does not exist")
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    common = dict(cluster_ids_path=cluster_ids_path, batch_size=batch_size, image_size=image_size, seed=seed,
                  epoch=epoch, shuffle_buffer=shuffle_buffer, strict=strict, rank=rank, uint8=uint8, draft=draft)

    if resampled:
        if steps_per_epoch is None:
            raise ValueError("resampled loading needs steps_per_epoch (the stream is infinite)")
        shards = wds.ResampledShards(source.urls, worker_seed=_WorkerSeed(seed, epoch, rank), deterministic=True)
        dataset = _pipeline(shards, source, partial=False, **common)
        loader = wds.WebLoader(dataset, batch_size=None, shuffle=False, num_workers=num_workers,
                               persistent_workers=False, pin_memory=pin_memory, worker_init_fn=_ignore_stop_signals)
        # why on the loader and not the dataset: on the dataset the count would apply per worker
        return EpochLoader(loader.with_epoch(steps_per_epoch), steps_per_epoch, batch_size, lookahead=False, rank=rank)

    if steps_per_epoch is None:
        if source.counts is None:
            raise ValueError("non-resampled loading without steps_per_epoch needs per-shard counts: pass a manifest "
                             "or shard folder, or give steps_per_epoch")
        steps_per_epoch = epoch_batches(source.counts, batch_size, world_size)
        if steps_per_epoch < 1:
            raise ValueError(f"non-resampled loading: a rank's share of {source.total} samples is less than one "
                             f"batch of {batch_size}")
    if world_size > len(source.urls):
        raise ValueError(f"non-resampled loading needs at least one shard per rank: {len(source.urls)} shard(s) for "
                         f"{world_size} ranks; write more shards or use resampled mode")
    mine = [source.urls[i] for i in rank_shards(len(source.urls), seed, epoch, rank, world_size)]
    workers = num_workers
    if 0 < len(mine) < num_workers:
        # trap: with fewer shards than workers the extra workers get nothing and the rank runs below speed
        logger.warning("rank %d has %d shard(s) for %d loader workers; using %d workers (write more shards to use "
                       "all of them)", rank, len(mine), num_workers, len(mine))
        workers = len(mine)
    dataset = _pipeline(_EpochShards(mine), source, partial=True, **common)
    # why no with_epoch here: on a finite loader it re-iterates the DataLoader, i.e. reads shards twice
    loader = wds.WebLoader(dataset, batch_size=None, shuffle=False, num_workers=workers,
                           persistent_workers=False, pin_memory=pin_memory, worker_init_fn=_ignore_stop_signals)
    # top-up, only used if bad samples leave this rank short: resampled over this rank's own shards, in process
    topup_shards = wds.ResampledShards(mine, worker_seed=_WorkerSeed(seed, epoch, rank, purpose=3), deterministic=True)
    topup = _pipeline(topup_shards, source, partial=False, **common)
    return EpochLoader(loader, steps_per_epoch, batch_size, lookahead=True, topup=topup, rank=rank)


