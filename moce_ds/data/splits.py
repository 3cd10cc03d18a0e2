"""The one train/test split of a labelled task: stratified halves, deterministic per task name."""

from __future__ import annotations

import zlib

import numpy as np

__all__ = ["stratified_halves"]


def stratified_halves(y: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    """-> (train_idx, test_idx), sorted int64: each class split in half, the odd image going to test (so a class of
    one still has a test image); the permutation is seeded by ``name``, so a task's split never changes."""
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    train, test = [], []
    for c in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == c))
        half = len(members) // 2
        train.append(members[:half])
        test.append(members[half:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))
