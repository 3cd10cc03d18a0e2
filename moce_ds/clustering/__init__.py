"""Image features and k-means clustering that produce cluster-id rounds (DESIGN.md §1.1, §1.5).

The functions ``kmeans`` and ``pixel_features`` are imported from their modules
(``from moce_ds.clustering.kmeans import kmeans``); re-exporting them here would shadow the submodules of the
same name (``import moce_ds.clustering.kmeans as km`` would then bind the function).
"""

from moce_ds.clustering.initial_round import cluster_embedded, ensure_embedded_round
from moce_ds.clustering.kmeans import KMeansResult, assign, kmeans_plus_plus
from moce_ds.clustering.pixel_features import PIXEL_FEATURE_DIM, PIXEL_FEATURES_VERSION

__all__ = [
    "PIXEL_FEATURES_VERSION",
    "PIXEL_FEATURE_DIM",
    "KMeansResult",
    "assign",
    "cluster_embedded",
    "ensure_embedded_round",
    "kmeans_plus_plus",
]
