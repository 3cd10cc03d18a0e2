"""Which shards and which cluster round a pre-training run reads (the embedded set when data.path is empty)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from moce_ds.config.schema import Config
from moce_ds.data.loader import epoch_batches
from moce_ds.data.sidecar import ClusterRound, check_round_matches, latest_round, load_round
from moce_ds.data.sources import ShardSource, resolve_shards
from moce_ds.engine.distributed import DistInfo, barrier, broadcast_object
from moce_ds.moe.policies import routing_policy

__all__ = ["TrainingData", "epoch_round", "prepare_training_data", "steps_per_epoch"]

log = logging.getLogger("moce_ds")


@dataclass
class TrainingData:
    urls: list[str]
    num_samples: int
    round: ClusterRound | None  # the round found at start-up; epoch_round() re-picks it at every epoch start
    description: str
    shard_counts: list[int] | None = None  # samples per shard, from the manifest
    clusters_root: Path | None = None  # where the rounds live (<shards>/clusters)
    shard_sha256: list[str | None] | None = None  # per shard, from the manifest: checked while the loader streams

    @property
    def source(self) -> ShardSource:
        return ShardSource(self.urls, self.shard_counts, sha256=self.shard_sha256)


def _embedded(cfg: Config, info: DistInfo) -> TrainingData:
    from moce_ds.clustering.initial_round import ensure_embedded_round
    from moce_ds.data.embedded import build_embedded_dataset, default_cache_dir

    cache = Path(cfg.data.cache_dir) if cfg.data.cache_dir else default_cache_dir()
    error = None
    if info.is_main:  # one rank builds; the others wait and then load what it wrote
        try:
            ds = build_embedded_dataset(cache, seed=cfg.data.cluster_seed)
            ensure_embedded_round(ds, cfg.moe.num_clusters, seed=cfg.data.cluster_seed)
        except Exception as e:  # every rank must learn of the failure, or the others wait forever
            error = f"{type(e).__name__}: {e}"
    barrier()
    error = broadcast_object(error)
    if error:
        raise RuntimeError(f"building the embedded data set failed on rank 0: {error}")
    ds = build_embedded_dataset(cache, seed=cfg.data.cluster_seed)
    clusters = ds.root / "clusters"
    counts = digests = None
    if (ds.root / "shards" / "manifest.json").is_file():
        src = resolve_shards(ds.root / "shards")
        counts, digests = src.counts, src.sha256
    return TrainingData(ds.shard_urls, ds.num_train, latest_round(clusters),
                        f"embedded set at {ds.root} ({ds.num_train} images)", counts, clusters, digests)


def _sharded(cfg: Config) -> TrainingData:
    path = Path(cfg.data.path)
    manifest = path if path.suffix == ".json" else path / "manifest.json"
    if not manifest.is_file():
        raise ValueError(f"data.path='{path}' has no manifest.json: point it at a folder written by "
                         f"launchers/make_shards.py (or leave data.path empty for the embedded set).")
    src = resolve_shards(manifest)
    missing = [u for u in src.urls if "://" not in u and not u.startswith("pipe:") and not Path(u).is_file()]
    if missing:
        raise ValueError(f"data.path='{path}': {len(missing)} shard(s) named in manifest.json are missing, "
                         f"e.g. {missing[0]}; re-run make_shards.py to complete them.")
    root = manifest.parent
    return TrainingData(src.urls, int(src.total), latest_round(root / "clusters"),
                        f"{len(src.urls)} shards in {root}", src.counts, root / "clusters", src.sha256)


def prepare_training_data(cfg: Config, info: DistInfo) -> TrainingData:
    data = _embedded(cfg, info) if not cfg.data.path else _sharded(cfg)
    if routing_policy(cfg.moe).needs_clusters:
        if data.round is None:
            raise ValueError(f"moe.routing=cluster needs cluster ids, and {data.description} has no clustering "
                             f"round: run launchers/cluster.py on it first.")
        check_round_matches(data.round, cfg.moe.num_clusters)
        _check_round_covers(data.round, data)
    if not cfg.data.resampled and data.shard_counts is None:
        raise ValueError(f"data.resampled=false needs per-shard sample counts, and {data.description} has no "
                         f"shard manifest: write the shards with launchers/make_shards.py or use data.resampled=true.")
    return data


def _check_round_covers(rnd: ClusterRound, data: TrainingData) -> None:
    """A round holds one id per image, indexed by the key's global index (0..N-1); fewer ids than the shards' images
    means images the round never saw (shards added since, or a truncated ids.npy): each would be skipped per sample.
    """
    have = int(rnd.ids(mmap=True).shape[0])
    if have < data.num_samples:
        shards = data.clusters_root.parent if data.clusters_root is not None else data.description
        raise ValueError(
            f"cluster round {rnd.round} at {rnd.path} has ids for {have} images but {data.description} holds "
            f"{data.num_samples}: give the new images ids with `python launchers/cluster.py --data {shards} "
            f"--assign-only`, or re-cluster with launchers/cluster.py (a truncated ids.npy: restore or re-cluster).")


def steps_per_epoch(cfg: Config, data: TrainingData, micro: int, accum: int, world_size: int) -> int:
    """Optimizer steps per epoch, the same on every rank.

    Resampled: the data set's size over the global batch. Non-resampled: the micro-batches every rank can deliver
    from its share of the shards whatever the epoch's shard permutation (loader.epoch_batches), in whole steps.
    """
    if cfg.data.resampled:
        return data.num_samples // (micro * accum * world_size)
    return epoch_batches(data.shard_counts, micro, world_size) // accum


def epoch_round(cfg: Config, data: TrainingData, current: ClusterRound | None) -> ClusterRound | None:
    """The cluster round to route with from this epoch on; call at every epoch start, on every rank.

    Rank 0 picks the newest complete round (a refresh may have written one since the last epoch) and broadcasts
    its number, so all ranks switch at the same boundary even if their views of the folder differ; each rank then
    loads that round and refuses one whose k does not match the gate table. Without cluster routing: ``current``.
    """
    if not routing_policy(cfg.moe).needs_clusters or data.clusters_root is None:
        return current
    newest = latest_round(data.clusters_root)
    picked = broadcast_object(None if newest is None else newest.round)  # rank 0's choice on every rank
    if picked is None:
        return current
    if current is not None and picked == current.round:
        return current
    rnd = load_round(data.clusters_root, int(picked))
    check_round_matches(rnd, cfg.moe.num_clusters)
    _check_round_covers(rnd, data)
    if current is not None:
        log.info("cluster round %d -> %d (k=%d, %s)", current.round, rnd.round, rnd.k,
                 rnd.manifest.get("feature_source", "?"))
    return rnd
