"""Streaming training loader on webdataset 1.0: resampled shards -> shuffle -> decode + MAE augment + cluster join.

Every rank gets exactly ``steps_per_epoch`` batches of exactly ``batch_size`` samples (expert-parallel ranks must
route the same number of tokens, DESIGN.md §4): shards are resampled with replacement (an infinite stream), the
ragged last batch is dropped, and the epoch length is imposed on the loader, not the per-worker dataset.

Randomness is derived from (seed, epoch, rank, worker) only, so a run is reproducible and ranks / workers /
epochs all draw different shard sequences, shuffles and augmentations. Because each rank and worker resamples its
own shard stream from a distinct seed, no node or worker splitting of the shard list is needed (splitting an
infinite resampled stream would only discard draws); this also sidesteps webdataset's default node splitter,
which refuses WORLD_SIZE > 1.
"""

from __future__ import annotations

import io
import logging
import math
import random
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.functional as TF
import webdataset as wds
from PIL import Image
from torchvision.transforms import InterpolationMode

from moce_ds.data.keys import key_index

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "SKIP_REASONS", "make_train_loader", "worker_seed"]

logger = logging.getLogger("moce_ds")

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
# bad_key: a key without a parseable global index (so neither index nor cluster id can be joined)
SKIP_REASONS: tuple[str, ...] = ("decode_error", "missing_cluster", "bad_key")
_IMAGE_EXTS = ("png", "jpg", "jpeg")


def worker_seed(seed: int, epoch: int, rank: int, purpose: int) -> int:
    """A 63-bit seed distinct per (seed, epoch, rank, DataLoader worker, purpose); call inside the worker."""
    info = torch.utils.data.get_worker_info()
    worker = info.id if info is not None else 0
    return int(np.random.SeedSequence([seed, epoch, rank, worker, purpose]).generate_state(2, np.uint64)[0] >> 1)


class _WorkerSeed:
    """Picklable seed function for ``wds.ResampledShards`` (evaluated inside each worker)."""

    def __init__(self, seed: int, epoch: int, rank: int) -> None:
        self.seed, self.epoch, self.rank = seed, epoch, rank

    def __call__(self) -> int:
        return worker_seed(self.seed, self.epoch, self.rank, purpose=0)


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

    The counts of samples skipped since the last good one ride on the next good sample, and the collation sums
    them per batch, so counts made in worker processes reach the trainer with the batch.
    """

    def __init__(
        self, cluster_ids_path: Path | None, image_size: int, strict: bool, seed: int, epoch: int, rank: int
    ) -> None:
        self.cluster_ids_path = None if cluster_ids_path is None else str(cluster_ids_path)
        self.image_size = image_size
        self.strict = strict
        self.seed, self.epoch, self.rank = seed, epoch, rank
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def _skip(self, reason: str, sample: dict, detail: str, counts: dict[str, int], logged: set[str]) -> None:
        key, url = sample.get("__key__", "?"), sample.get("__url__", "?")
        msg = f"bad sample ({reason}): shard {url} key {key}: {detail}"
        if self.strict:
            raise ValueError(msg + " (strict mode; disable data.strict to skip and count such samples)")
        counts[reason] += 1
        if reason not in logged:  # why: once per reason per worker; the counts carry the rest
            logged.add(reason)
            logger.warning("%s; skipping such samples and counting them", msg)

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        # why: open the table lazily in the worker; an mmap does not survive pickling into workers
        ids = None if self.cluster_ids_path is None else np.load(self.cluster_ids_path, mmap_mode="r")
        rng = random.Random(worker_seed(self.seed, self.epoch, self.rank, purpose=2))
        counts = dict.fromkeys(SKIP_REASONS, 0)
        logged: set[str] = set()
        for sample in src:
            key = sample.get("__key__", "")
            try:
                index = key_index(key)
            except ValueError as e:
                self._skip("bad_key", sample, str(e), counts, logged)
                continue
            if ids is None:
                cluster = 0
            elif index >= ids.shape[0] or int(ids[index]) < 0:
                detail = (
                    f"index {index} is outside the table of {ids.shape[0]}"
                    if index >= ids.shape[0]
                    else (f"index {index} has no cluster id (-1)")
                )
                self._skip("missing_cluster", sample, f"{detail} in {self.cluster_ids_path}", counts, logged)
                continue
            else:
                cluster = int(ids[index])
            data = next((sample[e] for e in _IMAGE_EXTS if e in sample), None)
            if data is None:
                self._skip("decode_error", sample, f"no image member among {_IMAGE_EXTS}", counts, logged)
                continue
            try:
                with Image.open(io.BytesIO(data)) as im:
                    img = im.convert("RGB")  # forces a full decode, so truncated files fail here
            except Exception as e:  # noqa: BLE001 - any decoder failure is a bad sample
                self._skip("decode_error", sample, f"{type(e).__name__}: {e}", counts, logged)
                continue
            yield {"image": self._augment(img, rng), "cluster": cluster, "index": index, "skipped": counts}
            counts = dict.fromkeys(SKIP_REASONS, 0)

    def _augment(self, img: Image.Image, rng: random.Random) -> torch.Tensor:
        """MAE pre-training augmentation -> float32 [3, S, S]."""
        top, left, h, w = _random_resized_crop_params(rng, img.width, img.height, (0.2, 1.0), (3 / 4, 4 / 3))
        img = TF.resized_crop(img, top, left, h, w, [self.image_size, self.image_size], InterpolationMode.BICUBIC)
        if rng.random() < 0.5:
            img = TF.hflip(img)
        return (TF.to_tensor(img) - self.mean) / self.std


def _collate(samples: list[dict]) -> dict:
    skipped = dict.fromkeys(SKIP_REASONS, 0)
    for s in samples:
        for r, c in s["skipped"].items():
            skipped[r] += c
    return {
        "images": torch.stack([s["image"] for s in samples]),  # [B, 3, H, W]
        "cluster": torch.tensor([s["cluster"] for s in samples], dtype=torch.int64),  # [B]
        "index": torch.tensor([s["index"] for s in samples], dtype=torch.int64),  # [B]
        "skipped": skipped,
    }


def make_train_loader(
    urls: list[str],
    cluster_ids_path: Path | None,
    batch_size: int,
    steps_per_epoch: int,
    image_size: int,
    num_workers: int = 2,
    seed: int = 0,
    epoch: int = 0,
    shuffle_buffer: int = 1000,
    strict: bool = False,
    rank: int = 0,
    world_size: int = 1,
) -> Iterable[dict]:
    """Loader for one epoch of ``steps_per_epoch`` batches on this rank.

    Yields dicts: ``images`` float32 [B, 3, H, W] (ImageNet-normalised), ``cluster`` int64 [B] (zeros when
    ``cluster_ids_path`` is None), ``index`` int64 [B] (global image index from the key), ``skipped``
    dict[reason, int] of samples dropped since the previous batch of the same worker (``decode_error``,
    ``missing_cluster``, ``bad_key``). Build a new loader per epoch with ``epoch`` set, so the streams change.
    """
    urls = [str(u) for u in urls]
    if not urls:
        raise ValueError("make_train_loader: no shard urls given")
    if batch_size < 1 or steps_per_epoch < 1 or image_size < 1:
        raise ValueError(
            f"batch_size, steps_per_epoch, image_size must be >= 1, got {batch_size}, {steps_per_epoch}, {image_size}"
        )
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must lie in [0, world_size={world_size}), got {rank}")
    if cluster_ids_path is not None and not Path(cluster_ids_path).is_file():
        raise FileNotFoundError(f"cluster id table {cluster_ids_path} does not exist")
    handler = wds.reraise_exception if strict else wds.warn_and_continue  # unreadable tar members / shards
    dataset = wds.DataPipeline(
        wds.ResampledShards(urls, worker_seed=_WorkerSeed(seed, epoch, rank), deterministic=True),
        wds.tarfile_to_samples(handler=handler),
        _Shuffle(shuffle_buffer, seed, epoch, rank),  # before decode: the buffer holds compressed bytes
        _Process(cluster_ids_path, image_size, strict, seed, epoch, rank),
        wds.batched(batch_size, collation_fn=_collate, partial=False),
    )
    loader = wds.WebLoader(dataset, batch_size=None, shuffle=False, num_workers=num_workers, persistent_workers=False)
    # why here and not on the dataset: on the dataset the count would apply per worker
    return loader.with_epoch(steps_per_epoch)
