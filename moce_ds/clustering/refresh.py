"""In-training centroid refresh (DESIGN.md §1.5, issue 4 point 3).

Every ``cluster.refresh_every`` epochs the pre-training job featurises its images with its *current* encoder on
all ranks, runs the same k-means as the offline job over torch.distributed (:class:`TorchComm`), matches the new
clusters to the round in use and writes the next round; ``epoch_round`` switches the loader to it at the next
epoch start. Expert-parallel MoE layers exchange tokens between ranks, so every rank must run the same number of
equally sized batches: ranks pad their last batches (padding rows are dropped) and the MoE layers run dropless,
so no token of a featurised image is dropped and a feature does not depend on its batch.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np
import torch

from moce_ds.clustering.comm import TorchComm
from moce_ds.clustering.feature_sources import ClusterIds, checkpoint_spec, encoder_features, pixel_spec
from moce_ds.clustering.features import decode_shard
from moce_ds.clustering.job import gather_ids, write_matched_round
from moce_ds.clustering.kmeans import kmeans
from moce_ds.clustering.pixel_features import PIXEL_FEATURES_VERSION, pixel_features
from moce_ds.data.loader import IMAGENET_MEAN, IMAGENET_STD
from moce_ds.data.sidecar import ClusterRound, load_round_at
from moce_ds.moe.policies import routing_policy

__all__ = ["refresh_due", "refresh_round"]

logger = logging.getLogger("moce_ds")


def refresh_due(cfg, epoch_done: int) -> bool:
    """After ``epoch_done`` finished epochs (1-based count), is a refresh due?"""
    every = cfg.cluster.refresh_every
    return bool(every) and routing_policy(cfg.moe).needs_clusters and epoch_done % every == 0


def _local_images(urls: list[str], counts: list[int] | None, rank: int, world: int, size: int,
                  cap: int) -> tuple[np.ndarray, np.ndarray]:
    """This rank's shards (every world-th) decoded -> uint8 [n, S, S, 3], global index int64 [n] (at most cap)."""
    imgs, idx = [], []
    for i in range(rank, len(urls), world):
        for item in decode_shard(urls[i], size, None if counts is None else counts[i]):
            if isinstance(item, str):
                continue  # the training loader counts bad samples; here they just get no new id
            idx.append(item[0])
            imgs.append(item[1])
            if cap and len(idx) >= cap:
                break
        if cap and len(idx) >= cap:
            break
    if not imgs:
        return np.zeros((0, size, size, 3), np.uint8), np.zeros(0, np.int64)
    return np.stack(imgs), np.asarray(idx, np.int64)


@torch.no_grad()
def _encode_lockstep(model, images: np.ndarray, cluster: np.ndarray, batch: int, comm: TorchComm,
                     dtype: torch.dtype, device: torch.device) -> np.ndarray:
    """Encoder features of every image, in batches of exactly ``batch`` on every rank -> float32 [n, D]."""
    n = images.shape[0]
    steps = int(comm.allreduce_sum(np.eye(comm.world_size)[comm.rank] * math.ceil(n / batch)).max())
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    out = []
    for s in range(steps):
        sel = np.arange(s * batch, (s + 1) * batch) % max(n, 1)  # wrap around: padding rows, dropped below
        real = max(0, min(batch, n - s * batch))
        if n == 0:  # a rank without images still takes part in the experts' all-to-all
            x = torch.zeros(batch, 3, images.shape[1], images.shape[2], device=device)
            c = torch.zeros(batch, dtype=torch.int64, device=device)
        else:
            x = torch.from_numpy(images[sel]).to(device).permute(0, 3, 1, 2).float().div_(255.0)
            c = torch.from_numpy(cluster[sel]).to(device)
        feats = encoder_features(model, ((x - mean) / std).to(dtype), c)  # [batch, D]
        out.append(feats[:real].cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, model.spec.embed_dim), np.float32)


def refresh_round(cfg, model: torch.nn.Module, urls: list[str], counts: list[int] | None, current: ClusterRound,
                  epoch: int, step: int, batch: int, dtype: torch.dtype, device: torch.device) -> ClusterRound:
    """Featurise with the current encoder on every rank, k-means over torch.distributed, write the next round
    (ids matched to ``current``). Call on every rank at the same point; returns the new round (every rank).

    The round records the checkpoint the trainer saves at this ``step`` as its feature source (the weights that
    made its features), so customisation and the report can featurise new images the same way later; the
    trainer saves that checkpoint right after the refresh and never prunes it while a round names it.
    """
    t0 = time.perf_counter()
    comm = TorchComm()
    c = cfg.cluster
    cap = math.ceil(c.max_images / comm.world_size) if c.max_images else 0
    images, index = _local_images(urls, counts, comm.rank, comm.world_size, model.spec.img_size, cap)
    if c.features == "pixel":
        feats, spec = pixel_features(images), pixel_spec(model.spec.img_size)
        source = space = PIXEL_FEATURES_VERSION
    else:
        # The MoE layers route an image by its current cluster; one without an id gets its nearest centroid
        # (the feature-source registry's one policy).
        ids = ClusterIds(current)
        cluster = ids(images, index)
        if ids.assigned:
            logger.info("refresh: %d images without an id in round %d were assigned to its nearest centroid",
                        ids.assigned, current.round)
        with routing_policy(cfg.moe).inference(model):
            feats = _encode_lockstep(model, images, cluster, batch, comm, dtype, device)
        run_dir = Path(cfg.output_dir)
        spec = checkpoint_spec(run_dir, f"step{step:08d}", cfg.model.size, model.spec.img_size, cfg.moe.routing,
                               current.path)
        source = f"moce_ds:{run_dir.resolve()}@step{step:08d}"
        space = f"moce_ds:{cfg.model.size}:{model.spec.embed_dim}"
    t_feat = time.perf_counter() - t0
    res = kmeans(feats, cfg.moe.num_clusters, iters=c.iters, seed=c.seed + epoch, spherical=c.spherical, tol=c.tol,
                 comm=comm)
    ids_now = current.ids(mmap=True)
    table = gather_ids(index, res.assignments, comm, int(ids_now.shape[0]))
    path = None
    if comm.rank == 0:
        extra = {"feature_extractor": spec, "seed": c.seed + epoch, "spherical": c.spherical, "tol": c.tol,
                 "ranks": comm.world_size, "comm": comm.name, "refresh_after_epoch": epoch,
                 "feature_seconds": round(t_feat, 3), "seconds": round(time.perf_counter() - t0, 3)}
        rnd = write_matched_round(current.path.parent, table, res, source, space, extra)
        path = str(rnd.path)
        logger.info("refresh after epoch %d: round %d from %d images in %.1f s (objective %.4g)", epoch, rnd.round,
                    int((table >= 0).sum()), time.perf_counter() - t0, res.objective[-1])
    path = comm.broadcast(path)
    comm.barrier()
    return load_round_at(Path(path))
