"""Distributed state in one place: init (guarded against double init), rank facts, ep_size resolution.

The only module below launchers/ that reads the launcher's environment (RANK, WORLD_SIZE, ...), via
DeepSpeed's own init.
"""

from __future__ import annotations

import atexit
import math
import os
import socket
from dataclasses import dataclass

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator

__all__ = ["DistInfo", "init_distributed", "resolve_ep_size", "barrier", "all_reduce_sum", "broadcast_object",
           "free_port"]


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistInfo:
    """Initialise torch.distributed through DeepSpeed (gloo on CPU, NCCL on GPUs); a no-op when already up."""
    accel = get_accelerator()
    backend = accel.communication_backend_name()
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, verbose=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    if accel.device_name() == "cpu":
        atexit.register(_unlink_cpu_allreduce_buffer, rank)
    local_rank = rank % max(1, accel.device_count()) if accel.device_name() != "cpu" else rank
    device = torch.device(accel.device_name(local_rank)) if accel.device_name() != "cpu" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return DistInfo(rank, world, local_rank, backend, device)


def _unlink_cpu_allreduce_buffer(rank: int) -> None:
    """Remove this rank's /dev/shm segment of DeepSpeed's CPU shared-memory all-reduce at exit.

    DeepSpeed 0.19's CPU comm op (ops/csrc/cpu/comm/shm.cpp) creates one ~65 MB segment per rank and run, named
    after the master address and port, and never unlinks it: a box that launches a few hundred runs fills its
    RAM with them (measured here: 323 segments, 21 GB, until the machine stalled). The peers mapped it at init,
    so removing the name at exit frees the memory once every rank has exited.
    """
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not addr or not port:
        return
    try:
        os.unlink(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}")
    except OSError:  # never created (one rank, or a path that did not use it) or already gone
        pass


def resolve_ep_size(requested: int, num_experts: int, world_size: int) -> int:
    """0 means automatic: the largest divisor of num_experts that also divides the world size."""
    if requested == 0:
        return math.gcd(num_experts, world_size)
    if num_experts % requested:
        raise ValueError(
            f"moe.num_experts={num_experts} is not divisible by moe.ep_size={requested}: "
            f"set moe.ep_size to a divisor of {num_experts} (or 0 for automatic)."
        )
    if world_size % requested:
        raise ValueError(
            f"moe.ep_size={requested} does not divide the world size {world_size}: launch a multiple of "
            f"{requested} ranks or set moe.ep_size to a divisor of {world_size} (0: automatic)."
        )
    return requested


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place and returned. Small host-side tensors (votes, log stats) are fine on gloo; NCCL
    reduces device tensors only, so they make a round trip to the current GPU there."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl" and t.device.type == "cpu":
            on_gpu = t.to(torch.device("cuda", torch.cuda.current_device()))
            dist.all_reduce(on_gpu, op=dist.ReduceOp.SUM)
            t.copy_(on_gpu)
        else:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj: object, src: int = 0) -> object:
    """Rank `src`'s object on every rank (e.g. an error message, so all ranks stop together)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def free_port() -> int:
    """A TCP port free on this host right now, for a launcher's --master_port (tests, benchmarks)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
