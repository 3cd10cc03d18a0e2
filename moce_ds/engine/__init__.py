"""DeepSpeed engine set-up, the pre-training loop, checkpoints and distributed state."""

from moce_ds.engine.distributed import DistInfo, init_distributed, resolve_ep_size
from moce_ds.engine.trainer import PretrainResult, pretrain, step_seed

__all__ = ["DistInfo", "init_distributed", "resolve_ep_size", "PretrainResult", "pretrain", "step_seed"]
