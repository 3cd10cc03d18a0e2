"""Featurise new images the way a clustering round's features were made, so they can be assigned to its centroids."""

from __future__ import annotations

import numpy as np

from moce_ds.clustering.pixel_features import PIXEL_FEATURES_VERSION, pixel_features

__all__ = ["features_for_source"]


def features_for_source(feature_source: str, images: np.ndarray) -> np.ndarray:
    """images uint8 (N, H, W, 3) -> float32 (N, d) in the round's feature space."""
    if feature_source == PIXEL_FEATURES_VERSION:
        return pixel_features(images)
    raise ValueError(f"clustering rounds made from '{feature_source}' features cannot featurise new images yet; "
                     f"supported: {PIXEL_FEATURES_VERSION}.")
