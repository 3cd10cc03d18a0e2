"""Which shards and which cluster round a pre-training run reads (the embedded set when data.path is empty)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from moce_ds.config.schema import Config
from moce_ds.data.sidecar import ClusterRound, check_round_matches, latest_round
from moce_ds.engine.distributed import DistInfo, barrier, broadcast_object

__all__ = ["TrainingData", "prepare_training_data"]

log = logging.getLogger("moce_ds")


@dataclass
class TrainingData:
    urls: list[str]
    num_samples: int
    round: ClusterRound | None
    description: str


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
    rnd = latest_round(ds.root / "clusters")
    return TrainingData(ds.shard_urls, ds.num_train, rnd, f"embedded set at {ds.root} ({ds.num_train} images)")


def _sharded(cfg: Config) -> TrainingData:
    root = Path(cfg.data.path)
    manifest = root / "manifest.json"
    if not manifest.is_file():
        raise ValueError(f"data.path='{root}' has no manifest.json: point it at a folder written by "
                         f"launchers/make_shards.py (or leave data.path empty for the embedded set).")
    meta = json.loads(manifest.read_text())
    urls = [str(root / s["name"]) for s in meta["shards"]]
    missing = [u for u in urls if not Path(u).is_file()]
    if missing:
        raise ValueError(f"data.path='{root}': {len(missing)} shard(s) named in manifest.json are missing, "
                         f"e.g. {missing[0]}; re-run make_shards.py to complete them.")
    return TrainingData(urls, int(meta["total"]), latest_round(root / "clusters"), f"{len(urls)} shards in {root}")


def prepare_training_data(cfg: Config, info: DistInfo) -> TrainingData:
    data = _embedded(cfg, info) if not cfg.data.path else _sharded(cfg)
    if cfg.moe.routing == "cluster":
        if data.round is None:
            raise ValueError(f"moe.routing=cluster needs cluster ids, and {data.description} has no clustering "
                             f"round: run launchers/cluster.py on it first.")
        check_round_matches(data.round, cfg.moe.num_clusters)
    return data
