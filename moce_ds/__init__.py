"""moce-ds: MoCE (Mixture of Cluster-conditional Experts) MAE pre-training on DeepSpeed."""

__version__ = "0.1.0"
__all__ = ["__version__"]
