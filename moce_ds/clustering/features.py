"""Global image features for clustering, and the per-shard feature cache of the offline job (DESIGN.md §1.1).

Feature sources (the ``feature_source`` string in a round's manifest names the one used):

- ``pixel``: :mod:`moce_ds.clustering.pixel_features` (``pixel_features_v1``), when nothing is trained yet;
- a run folder / checkpoint of ours: :func:`moce_ds.checkpoints.run_reader.load_pretrained` rebuilds the MoCE encoder
  (any ep_size it was trained with, all experts local); feature = mean of the encoder's patch tokens of the
  *unmasked* image, L2-normalised; MoE blocks route each image by its id in the checkpoint's round;
- ``timm:<model name>`` plus a weights file: mean of the patch tokens of ``forward_features``, L2-normalised.

:func:`featurize_shards` gives each rank its share of the shards and caches every finished shard as
``<cache>/<stem>.feats.npy`` [n, d] float32 + ``<stem>.index.npy`` [n] int64 + a done record, so a rerun skips them.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from moce_ds.clustering.comm import Communicator, LocalComm
from moce_ds.clustering.pixel_features import PIXEL_FEATURES_VERSION, pixel_features
from moce_ds.data.keys import key_index
from moce_ds.data.loader import IMAGENET_MEAN, IMAGENET_STD, to_tensor
from moce_ds.data.shard_writer import atomic_write_json
from moce_ds.data.sources import SKIP_MARKER, read_tar_samples

__all__ = ["FeatureExtractor", "decode_shard", "encoder_features", "featurize_shards", "make_extractor"]

logger = logging.getLogger("moce_ds")

_IMAGE_EXTS = ("jpg", "jpeg", "png")


@dataclass
class FeatureExtractor:
    """images uint8 [B, S, S, 3] + global indices int64 [B] -> float32 [B, d] unit rows."""

    source: str  # written to the round's manifest, and part of the cache key
    space: str  # rounds whose space is equal can be matched by centroid distance
    image_size: int  # images are resized (shorter side) + centre-cropped to this before featurising
    fn: object = field(repr=False)  # Callable[[np.ndarray, np.ndarray], np.ndarray]

    def __call__(self, images: np.ndarray, index: np.ndarray) -> np.ndarray:
        return self.fn(images, index)  # type: ignore[operator]


@torch.no_grad()
def encoder_features(model: torch.nn.Module, images: torch.Tensor, cluster: torch.Tensor | None) -> torch.Tensor:
    """MoCE/MAE encoder: images [B, 3, S, S], cluster [B] -> float32 [B, D] mean of unmasked patch tokens, unit norm."""
    latent = model.forward_features(images, cluster)  # [B, 1+L, D]
    feats = latent[:, 1:, :].float().mean(dim=1)  # drop the cls token: the design's "patch tokens"
    return torch.nn.functional.normalize(feats, dim=1)


def _checkpoint_extractor(path: str) -> FeatureExtractor:
    from moce_ds.checkpoints.run_reader import load_pretrained

    pre = load_pretrained(Path(path))
    model = pre.model
    ids = None
    if pre.cfg.moe.routing == "cluster":
        if pre.round is None:
            raise ValueError(f"checkpoint {path} routes by cluster but its clustering round was not found")
        ids = np.asarray(pre.round.ids(mmap=False))

    def fn(images: np.ndarray, index: np.ndarray) -> np.ndarray:
        cluster = None
        if ids is not None:
            inside = index < ids.shape[0]
            c = np.where(inside, ids[np.minimum(index, ids.shape[0] - 1)], -1)
            cluster = torch.from_numpy(np.maximum(c, 0).astype(np.int64))  # no id yet: route like cluster 0
        x = to_tensor(images)
        return encoder_features(model, x, cluster).numpy()

    spec = model.spec
    source = f"moce_ds:{Path(path).resolve()}@{pre.tag}"
    return FeatureExtractor(source, f"moce_ds:{pre.cfg.model.size}:{spec.embed_dim}", spec.img_size, fn)


def _timm_extractor(name: str, weights: str | None) -> FeatureExtractor:
    import timm

    model = timm.create_model(name, pretrained=False, num_classes=0)
    if weights:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state
        state = {k: v for k, v in state.items() if not k.startswith(("head.", "fc.", "classifier."))}
        missing, _ = model.load_state_dict(state, strict=False)
        if missing:
            raise ValueError(f"weights {weights} do not fit timm model {name}: missing {missing[:4]}")
    else:
        logger.warning("timm:%s without a weights file: features of a randomly initialised model", name)
    model.eval()
    cfg = model.pretrained_cfg
    size = int(cfg.get("input_size", (3, 224, 224))[-1])
    mean, std = tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))
    prefix = int(getattr(model, "num_prefix_tokens", 1))

    @torch.no_grad()
    def fn(images: np.ndarray, index: np.ndarray) -> np.ndarray:
        tokens = model.forward_features(to_tensor(images, mean, std))
        feats = tokens[:, prefix:, :].mean(1) if tokens.ndim == 3 else tokens.flatten(1)  # CNNs: [B, C] pooled
        return torch.nn.functional.normalize(feats.float(), dim=1).numpy()

    tag = Path(weights).name if weights else "random"
    return FeatureExtractor(f"timm:{name}:{tag}", f"timm:{name}", size, fn)


def make_extractor(features: str, weights: str | None = None, image_size: int = 32) -> FeatureExtractor:
    """``pixel`` | a run folder / checkpoint folder of ours | ``timm:<name>`` (with ``weights``)."""
    if features in ("pixel", PIXEL_FEATURES_VERSION):
        return FeatureExtractor(PIXEL_FEATURES_VERSION, PIXEL_FEATURES_VERSION, image_size,
                                lambda images, index: pixel_features(images))
    if features.startswith("timm:"):
        return _timm_extractor(features[len("timm:"):], weights)
    if Path(features).exists():
        return _checkpoint_extractor(features)
    raise ValueError(f"--features {features!r} is neither 'pixel', 'timm:<model name>' nor an existing run or "
                     f"checkpoint folder")


def _square(img: Image.Image, size: int) -> np.ndarray:
    """Shorter side to ``size`` (bicubic), centre crop -> uint8 [size, size, 3]."""
    w, h = img.size
    if (w, h) != (size, size):
        s = size / min(w, h)
        img = img.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
        w, h = img.size
        left, top = (w - size) // 2, (h - size) // 2
        img = img.crop((left, top, left + size, top + size))
    return np.asarray(img, dtype=np.uint8)


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
        data = next((s[e] for e in _IMAGE_EXTS if e in s), None)
        if data is None:
            yield "no_image"
            continue
        try:
            with Image.open(io.BytesIO(data)) as im:
                img = im.convert("RGB")
        except Exception:  # noqa: BLE001 - an undecodable image is a skipped sample, never a crash
            yield "decode_error"
            continue
        yield index, _square(img, image_size)


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


def featurize_shards(urls: list[str], extractor: FeatureExtractor, cache_dir: Path | None,
                     comm: Communicator | None = None, counts: list[int] | None = None, batch_size: int = 256,
                     progress: bool = False) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """This rank's shards (every world_size-th of ``urls``) -> features [n, d], global indices [n], skip counts.

    With ``cache_dir``, a shard whose done record names the same feature source is loaded instead of recomputed.
    """
    comm = comm if comm is not None else LocalComm()
    mine = list(range(comm.rank, len(urls), comm.world_size))
    if cache_dir is not None:
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
            if rec.get("source") == extractor.source and rec.get("url") == url:
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
            atomic_write_json(done, {"url": url, "source": extractor.source, "num": int(index.shape[0]),
                                     "dim": int(x.shape[1]) if x.size else 0, "skipped": sk})
        xs.append(x)
        ids.append(index)
    if reused:
        logger.info("rank %d: reused cached features of %d of its %d shards", comm.rank, reused, len(mine))
    xs = [x for x in xs if x.size]
    feats = np.concatenate(xs) if xs else np.zeros((0, 0), np.float32)
    return feats, (np.concatenate(ids) if ids else np.zeros(0, np.int64)), skipped
