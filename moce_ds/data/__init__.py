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
from moce_ds.data.loader import IMAGENET_MEAN, IMAGENET_STD, SKIP_REASONS, make_train_loader
from moce_ds.data.shard_writer import write_shards
from moce_ds.data.sidecar import ClusterRound, check_round_matches, latest_round, load_round, write_round

__all__ = [
    "EMBEDDED_VERSION",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SKIP_REASONS",
    "ClusterRound",
    "EmbeddedDataset",
    "TaskSpec",
    "build_embedded_dataset",
    "check_round_matches",
    "default_cache_dir",
    "embedded_tasks",
    "key_index",
    "latest_round",
    "load_round",
    "load_task",
    "make_key",
    "make_train_loader",
    "write_round",
    "write_shards",
]
