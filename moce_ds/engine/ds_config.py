"""Reading and checking the DeepSpeed JSON, which owns batch size, precision, ZeRO and clipping."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

__all__ = ["load_ds_config", "check_ds_config", "micro_batch_size", "grad_accum_steps", "compute_dtype",
           "with_comm_dtype_default"]

# Settings the YAML owns; a DeepSpeed JSON that sets them would make two owners for one setting.
_YAML_OWNED = {"optimizer": "train.lr / train.weight_decay / train.betas", "scheduler": "train.warmup_steps / train.lr"}


def load_ds_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"DeepSpeed config '{path}' does not exist; pass --deepspeed_config ds_configs/zero2.json.")
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"DeepSpeed config '{path}' is not valid JSON (line {e.lineno}: {e.msg}).") from e
    return with_comm_dtype_default(ds)


def with_comm_dtype_default(ds: dict[str, Any]) -> dict[str, Any]:
    """bf16/fp16 runs reduce(-scatter) gradients in fp32 unless the JSON sets ``communication_data_type``:
    DeepSpeed's default is the parameters' dtype, and a bf16 sum over many ranks loses the small gradients."""
    if (ds.get("bf16", {}).get("enabled") or ds.get("fp16", {}).get("enabled")) and \
            "communication_data_type" not in ds:
        ds = dict(ds, communication_data_type="fp32")
    return ds


def check_ds_config(ds: dict[str, Any], uses_moe: bool, device_type: str = "cuda") -> None:
    """Refuse what DeepSpeed would crash on later (or silently get wrong) with a one-line fix. `device_type`: where
    this rank computes (cpu / cuda)."""
    for key, owner in _YAML_OWNED.items():
        if key in ds:
            raise ValueError(f"the DeepSpeed config sets '{key}', which the YAML config owns ({owner}): remove it.")
    if "train_batch_size" in ds:
        raise ValueError("the DeepSpeed config sets 'train_batch_size'; set 'train_micro_batch_size_per_gpu' "
                         "(and 'gradient_accumulation_steps') instead, so the global batch follows the world size.")
    if not isinstance(ds.get("train_micro_batch_size_per_gpu"), int) or ds["train_micro_batch_size_per_gpu"] < 1:
        raise ValueError("the DeepSpeed config needs 'train_micro_batch_size_per_gpu' as a positive integer.")
    zero = ds.get("zero_optimization", {})
    stage = zero.get("stage", 0)
    if uses_moe and stage == 3:
        raise ValueError("ZeRO stage 3 does not support DeepSpeed's native MoE: use ds_configs/zero2.json "
                         "(zero_optimization.stage=2) or moe.routing=dense.")
    if uses_moe and stage == 2 and not zero.get("contiguous_gradients", False):
        raise ValueError("ZeRO stage 2 with MoE needs zero_optimization.contiguous_gradients=true in the DeepSpeed "
                         "config.")
    if ds.get("fp16", {}).get("enabled") and ds.get("bf16", {}).get("enabled"):
        raise ValueError("the DeepSpeed config enables both fp16 and bf16: enable one.")
    if ds.get("fp16", {}).get("enabled") and device_type != "cuda":
        # DeepSpeed's CPU accelerator has no fp16 training: the run would train in another precision, silently
        raise ValueError(f"the DeepSpeed config enables fp16, which this {device_type} run cannot train in: use "
                         f"ds_configs/zero2.json (fp32) or ds_configs/zero2_bf16.json (bf16), or run on a GPU.")


def micro_batch_size(ds: dict[str, Any]) -> int:
    return int(ds["train_micro_batch_size_per_gpu"])


def grad_accum_steps(ds: dict[str, Any]) -> int:
    return int(ds.get("gradient_accumulation_steps", 1))


def compute_dtype(ds: dict[str, Any]) -> torch.dtype:
    if ds.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    if ds.get("fp16", {}).get("enabled"):
        return torch.float16
    return torch.float32
