"""Task customisation: cluster histogram -> expert selection -> dense timm ViT export."""

from moce_ds.checkpoints.run_reader import Pretrained, load_pretrained
from moce_ds.customize.export import dense_state_dict, save_dense, timm_kwargs, timm_vit
from moce_ds.customize.pipeline import CustomizeResult, customize
from moce_ds.customize.selection import Selection, cluster_histogram, gate_probabilities, select_experts
from moce_ds.customize.task_data import TaskData, load_task_data

__all__ = [
    "customize", "CustomizeResult", "load_pretrained", "Pretrained", "Selection", "cluster_histogram",
    "gate_probabilities", "select_experts", "dense_state_dict", "save_dense", "timm_kwargs", "timm_vit",
    "TaskData", "load_task_data",
]
