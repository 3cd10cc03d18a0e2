"""Cluster-id rounds stored beside the image shards (DESIGN.md §5).

Layout::

    <root>/round_0000/ids.npy          int32 [num_images], indexed by the global image index; -1 = no id
    <root>/round_0000/centroids.npy    float32 [k, d]
    <root>/round_0000/manifest.json    round, k, feature_source, created, num_images, cluster_sizes, extra meta

A round is written into ``<root>/.round_XXXX.tmp-<pid>`` and renamed into place, so a crash never leaves a
half-written round visible; a refresh adds a round and never rewrites image shards.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moce_ds.data.shard_writer import atomic_write_json

__all__ = ["ClusterRound", "check_round_matches", "latest_round", "list_rounds", "load_round", "load_round_at",
           "round_dir", "write_round"]

logger = logging.getLogger("moce_ds")

_ROUND_RE = re.compile(r"^round_(\d{4,})$")


def round_dir(root: Path, r: int) -> Path:
    return Path(root) / f"round_{r:04d}"


@dataclass
class ClusterRound:
    round: int
    k: int
    path: Path
    manifest: dict

    def ids(self, mmap: bool = True) -> np.ndarray:
        """int32 [num_images] cluster id per global image index (-1 = none); memory-mapped by default."""
        return np.load(self.path / "ids.npy", mmap_mode="r" if mmap else None)

    def centroids(self) -> np.ndarray:
        """float32 [k, d]."""
        return np.load(self.path / "centroids.npy")


def _round_number(path: Path) -> int | None:
    """``.../round_0012`` -> 12; None for any other name (temp folders of interrupted writes included)."""
    m = _ROUND_RE.match(Path(path).name)
    return None if m is None else int(m.group(1))


def list_rounds(root: Path) -> list[Path]:
    """The complete round folders under ``root``, oldest first (by number, not by name); [] if ``root`` is missing.

    The one place that decides what a round folder is: open one with :func:`load_round_at`."""
    if not Path(root).is_dir():
        return []
    found = []
    for p in Path(root).iterdir():
        r = _round_number(p)
        # why: only complete rounds have a manifest (it is renamed into place with the folder)
        if r is not None and p.is_dir() and (p / "manifest.json").is_file():
            found.append((r, p))
    return [p for _, p in sorted(found)]


def load_round(root: Path, r: int) -> ClusterRound:

    path = round_dir(root, r)
    mpath = path / "manifest.json"
    if not mpath.is_file():
        raise FileNotFoundError(f"cluster round {r} not found: {mpath} does not exist")
    with open(mpath) as f:
        manifest = json.load(f)
    return ClusterRound(round=int(manifest["round"]), k=int(manifest["k"]), path=path, manifest=manifest)


def load_round_at(path: Path) -> ClusterRound:
    """A round folder (``<root>/round_NNNN``) -> the round."""
    path = Path(path)
    r = _round_number(path)
    if r is None:
        raise FileNotFoundError(f"{path} is not a cluster round folder (expected <clusters>/round_NNNN)")
    return load_round(path.parent, r)


def latest_round(root: Path) -> ClusterRound | None:
    """Newest complete round under ``root``, or None; temp folders of interrupted writes are ignored."""
    rounds = list_rounds(root)
    return load_round_at(rounds[-1]) if rounds else None


def write_round(
    root: Path,
    ids: np.ndarray,
    centroids: np.ndarray,
    feature_source: str,
    extra: dict | None = None,
) -> ClusterRound:
    """Write the next round (latest + 1, or 0) atomically and return it.

    ids: int [num_images] (-1 = no id), each other value in [0, k); centroids: float [k, d].
    """
    root = Path(root)
    ids = np.asarray(ids)
    centroids = np.asarray(centroids, dtype=np.float32)
    if ids.ndim != 1:
        raise ValueError(f"ids must be 1-D [num_images], got shape {ids.shape}")
    if centroids.ndim != 2:
        raise ValueError(f"centroids must be 2-D [k, d], got shape {centroids.shape}")
    k = int(centroids.shape[0])
    if ids.size and (ids.min() < -1 or ids.max() >= k):
        raise ValueError(f"ids must lie in [-1, {k}) for k={k}, got range [{ids.min()}, {ids.max()}]")
    ids32 = ids.astype(np.int32)
    rounds = list_rounds(root)
    r = _round_number(rounds[-1]) + 1 if rounds else 0
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".round_{r:04d}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        np.save(tmp / "ids.npy", ids32)
        np.save(tmp / "centroids.npy", centroids)
        sizes = np.bincount(ids32[ids32 >= 0], minlength=k)
        manifest = dict(extra or {})
        # why: core fields win over a colliding extra key so readers can trust them
        manifest.update(
            round=r,
            k=k,
            dim=int(centroids.shape[1]),
            feature_source=str(feature_source),
            created=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            num_images=int(ids32.shape[0]),
            num_unassigned=int((ids32 < 0).sum()),
            cluster_sizes=[int(s) for s in sizes],
        )
        atomic_write_json(tmp / "manifest.json", manifest)
        os.rename(tmp, round_dir(root, r))  # fails loudly if a concurrent writer took round r
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # the id table spans every image index of the shards; those that did not decode hold -1 (the job names them)
    logger.info("wrote cluster round %d (k=%d, ids for %d of the %d image indexes, source %s) to %s", r, k,
                int((ids32 >= 0).sum()), ids32.shape[0], feature_source, root)
    return load_round(root, r)


def check_round_matches(round: ClusterRound, num_clusters: int) -> None:
    """Raise ValueError if the round's k differs from the model's number of clusters."""
    if round.k != num_clusters:
        raise ValueError(
            f"cluster round {round.round} at {round.path} has k={round.k} clusters but the model expects "
            f"moe.num_clusters={num_clusters}: set moe.num_clusters={round.k} or re-cluster with k={num_clusters}"
        )
