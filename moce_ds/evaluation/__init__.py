"""Downstream evaluation: frozen-feature linear probe and k-NN, short fine-tune."""

from moce_ds.evaluation.encoders import Encoder, extract_features, load_encoder
from moce_ds.evaluation.probes import finetune, knn, linear_probe
from moce_ds.evaluation.run import evaluate

__all__ = ["Encoder", "load_encoder", "extract_features", "linear_probe", "knn", "finetune", "evaluate"]
