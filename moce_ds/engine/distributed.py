"""Distributed state in one place: init (guarded against double init), rank facts, ep_size resolution.

The only module below launchers/ that reads the launcher's environment (RANK, WORLD_SIZE, ...), via
DeepSpeed's own init.
"""

from __future__ import annotations

import atexit
import math
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator

__all__ = ["DeviceBinding", "DistInfo", "LOCAL_RANK_VARS", "bind_local_process", "init_distributed",
           "resolve_device_binding", "resolve_ep_size", "barrier", "all_reduce_sum", "broadcast_object", "free_port",
           "threads_per_rank"]

# (local rank, local world size) variables of each launcher, in the order DeepSpeed trusts them: its own launcher
# and torchrun set LOCAL_RANK / LOCAL_WORLD_SIZE (deepspeed: LOCAL_SIZE), Open MPI's mpirun
# OMPI_COMM_WORLD_LOCAL_*, Slurm's srun SLURM_*.
LOCAL_RANK_VARS = (
    ("LOCAL_RANK", "LOCAL_WORLD_SIZE"),
    ("OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"),
    ("SLURM_LOCALID", "SLURM_NTASKS_PER_NODE"),
)


@dataclass(frozen=True)
class DeviceBinding:
    """Which accelerator this process drives: cuda:``device_index`` (None: the CPU)."""

    local_rank: int  # rank among this node's processes: the device index and the metrics port offset
    local_world_size: int | None  # processes on this node, when the launcher says
    source: str  # the variable the local rank came from ("" when there was none: one process)
    device_index: int | None


def _int_var(env: Mapping[str, str], name: str) -> int | None:
    v = env.get(name)
    if v is None or v == "":
        return None
    try:
        return int(v)
    except ValueError:  # e.g. SLURM_NTASKS_PER_NODE="2(x3)" on uneven allocations: not one number
        return None


def resolve_device_binding(env: Mapping[str, str], device_count: int, rank: int = 0) -> DeviceBinding:
    """The device binding of this process from its launcher's environment, as DeepSpeed's engine binds it
    (``set_device(LOCAL_RANK)``; it copies OMPI_COMM_WORLD_LOCAL_RANK into LOCAL_RANK and refuses a mismatch).

    ``device_count``: accelerators this process sees (0 on CPU); ``rank``: the global rank, the local rank of a
    CPU process whose launcher set none. SLURM_LOCALID counts srun's tasks, so a launcher started by srun
    (``srun torchrun ...``) wins over it. Raises ValueError, naming the variables and the fix, when the launchers'
    variables disagree, or when the local rank or the ranks per node exceed the visible devices (``rank %
    device_count`` would silently put two ranks on one GPU, or NCCL and DeepSpeed on different ones).
    """
    found = [(r, _int_var(env, r), _int_var(env, w)) for r, w in LOCAL_RANK_VARS if _int_var(env, r) is not None]
    if len(found) > 1 and found[-1][0] == "SLURM_LOCALID":
        found = found[:-1]
    if not found:
        world = _int_var(env, "WORLD_SIZE") or 1
        if world > 1 and device_count > 0:
            raise ValueError(f"WORLD_SIZE={world} but none of {', '.join(r for r, _ in LOCAL_RANK_VARS)} is set: "
                             f"launch with deepspeed, torchrun, mpirun or srun, or set LOCAL_RANK per process.")
        found = [("", rank if world > 1 else 0, None)]
    source, local_rank, local_world = found[0]
    if source == "LOCAL_RANK" and local_world is None:
        local_world = _int_var(env, "LOCAL_SIZE")  # the deepspeed launcher's name for it
    if local_world is None:  # e.g. DeepSpeed's MPI discovery set LOCAL_RANK only: mpirun's size then
        local_world = next((w for _, _, w in found if w is not None), None)
    for name, other, _ in found[1:]:
        if other != local_rank:
            raise ValueError(f"{source}={local_rank} but {name}={other}: the launchers disagree on this process's "
                             f"local rank; start one launcher per process (unset the other's variables).")
    if local_rank < 0:
        raise ValueError(f"{source}={local_rank}: a local rank is >= 0")
    if local_world is not None and local_rank >= local_world:
        raise ValueError(f"{source}={local_rank} but the node runs {local_world} processes: inconsistent launcher "
                         f"variables")
    if device_count <= 0:
        return DeviceBinding(local_rank, local_world, source, None)
    hint = ("launch at most one rank per visible GPU (deepspeed --num_gpus / torchrun --nproc-per-node / "
            "mpirun -npernode / srun --ntasks-per-node), and do not narrow CUDA_VISIBLE_DEVICES per rank: "
            "DeepSpeed binds rank LOCAL_RANK to device LOCAL_RANK")
    if local_world is not None and local_world > device_count:
        raise ValueError(f"{local_world} processes on this node but {device_count} visible device(s): {hint}.")
    if local_rank >= device_count:
        raise ValueError(f"{source}={local_rank} but this process sees {device_count} device(s): {hint}.")
    return DeviceBinding(local_rank, local_world, source, local_rank)


def threads_per_rank(cores: int, local_world_size: int | None) -> int:
    """CPU threads for each of ``local_world_size`` ranks sharing ``cores`` cores (at least 1)."""
    return max(1, cores // max(1, local_world_size or 1))


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # the cores this process may run on (taskset, cgroup cpusets)
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def bind_local_process(threads: int = 0, env: Mapping[str, str] | None = None, rank: int = 0) -> DeviceBinding:
    """Bind this process to its local rank's accelerator (``torch.cuda.set_device``) and size its CPU thread pools.

    For processes that do not go through :func:`init_distributed` (``mpirun python launchers/cluster.py``), and
    called by it. ``threads``: torch and faiss threads per rank; 0 leaves an OMP_NUM_THREADS the user set, else
    gives each of the node's ranks cores // local world size (8 ranks of 64 threads each on 64 cores thrash).
    """
    env = os.environ if env is None else env
    accel = get_accelerator()
    count = accel.device_count() if accel.device_name() != "cpu" else 0
    binding = resolve_device_binding(env, count, rank)
    if binding.device_index is not None and accel.device_name() == "cuda":
        torch.cuda.set_device(binding.device_index)
    if not threads and "OMP_NUM_THREADS" not in env and (binding.local_world_size or 1) > 1:
        threads = threads_per_rank(_cores(), binding.local_world_size)
    if threads:
        from moce_ds.clustering.kmeans import set_threads  # torch's and faiss's OpenMP pools

        set_threads(threads)
    return binding


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
    # DeepSpeed's init has set LOCAL_RANK by now (from mpirun's variables or its MPI discovery when it had to)
    binding = bind_local_process(rank=rank)
    index = binding.device_index
    device = torch.device(accel.device_name(index)) if index is not None else torch.device("cpu")
    return DistInfo(rank, world, binding.local_rank, backend, device)


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
