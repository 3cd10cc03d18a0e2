"""Which device a stage outside pre-training runs on, and how it runs inference there (issue 17 item 3).

Clustering features, evaluation features and fine-tuning take ``device`` from the run or a flag: ``None``/"cpu"
(the default), "cuda", "cuda:N" or "auto" (this process's current GPU when torch sees one, else the CPU).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["autocast", "inference", "resolve_device"]


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cpu")
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but torch sees no CUDA device: pass --device cpu or auto")
    return dev


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (fp32 weights, matmuls in bf16: safe for features and fine-tuning); none on CPU,
    where bf16 matmuls are slower than fp32 on most hosts."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def inference(device: torch.device) -> Iterator[None]:
    """torch.inference_mode + :func:`autocast`: a frozen forward with no autograd bookkeeping."""
    with torch.inference_mode(), autocast(device):
        yield
