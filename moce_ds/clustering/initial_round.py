"""First clustering round for the embedded data set, from pixel features (nothing is trained yet)."""

from __future__ import annotations

import logging
import time

import numpy as np

from moce_ds.clustering.feature_sources import pixel_spec
from moce_ds.clustering.kmeans import DEFAULT_SPHERICAL, kmeans
from moce_ds.clustering.pixel_features import PIXEL_FEATURES_VERSION, pixel_features
from moce_ds.data.embedded import EmbeddedDataset
from moce_ds.data.sidecar import ClusterRound, latest_round, write_round

__all__ = ["cluster_embedded", "ensure_embedded_round"]

logger = logging.getLogger("moce_ds")


def cluster_embedded(ds: EmbeddedDataset, k: int, seed: int = 0) -> ClusterRound:
    """Pixel features of the train images -> k-means -> a new round under ``ds.root / "clusters"``."""
    t0 = time.perf_counter()
    images, index, _ = ds.train_images()  # [N, 32, 32, 3], [N], [N]
    feats = pixel_features(images)  # [N, D]
    res = kmeans(feats, k, seed=seed)  # the shared defaults: pixel rows are unit norm, so spherical
    ids = np.full(int(index.max()) + 1, -1, np.int32)  # [num_images], indexed by global index
    ids[index] = res.assignments
    extra = {
        "seed": seed,
        "objective": res.objective,
        "iterations": len(res.objective),
        "spherical": DEFAULT_SPHERICAL,
        "seconds": round(time.perf_counter() - t0, 3),
        "dataset": str(ds.root),
        "feature_extractor": pixel_spec(int(images.shape[1])),
    }
    return write_round(ds.root / "clusters", ids, res.centroids, feature_source=PIXEL_FEATURES_VERSION, extra=extra)


def ensure_embedded_round(ds: EmbeddedDataset, k: int, seed: int = 0) -> ClusterRound:
    """Reuse the latest round if it has ``k`` clusters and covers every train image, else cluster anew."""
    latest = latest_round(ds.root / "clusters")
    if latest is not None and latest.k == k and latest.manifest.get("num_images") == ds.num_train:
        logger.info("cluster round %d (k=%d) already on disk at %s; reusing it", latest.round, k, latest.path)
        return latest
    return cluster_embedded(ds, k, seed=seed)
