"""Data: embedded default data set, shard writer, streaming loader, cluster-id sidecar (DESIGN.md §5)."""

from moce_ds.data.embedded import (
    EMBEDDED_VERSION,
    EmbeddedDataset,
    TaskSpec,
    build_embedded_dataset,
    default_cache_dir,
    embedded_tasks,
    load_task,
)
from moce_ds.data.keys import key_index, make_key
from moce_ds.data.loader import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SKIP_REASONS,
    EpochLoader,
    epoch_batches,
    make_train_loader,
    rank_shards,
)
from moce_ds.data.make_shards import make_shards
from moce_ds.data.shard_writer import write_shards
from moce_ds.data.sidecar import ClusterRound, check_round_matches, latest_round, list_rounds, load_round, write_round
from moce_ds.data.sources import ShardSource, resolve_shards

__all__ = [
    "EMBEDDED_VERSION",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SKIP_REASONS",
    "ClusterRound",
    "EmbeddedDataset",
    "EpochLoader",
    "ShardSource",
    "TaskSpec",
    "build_embedded_dataset",
    "check_round_matches",
    "default_cache_dir",
    "embedded_tasks",
    "epoch_batches",
    "key_index",
    "latest_round",
    "list_rounds",
    "load_round",
    "load_task",
    "rank_shards",
    "resolve_shards",
    "make_key",
    "make_shards",
    "make_train_loader",
    "write_round",
    "write_shards",
]
