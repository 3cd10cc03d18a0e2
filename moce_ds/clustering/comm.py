"""The few collectives data-parallel k-means needs, behind one small interface (DESIGN.md §3 "two communicators").

The offline job runs under ``mpirun`` (:class:`MPIComm`, mpi4py); the in-training refresh runs inside the
pre-training job (:class:`TorchComm`, torch.distributed: gloo on CPU, NCCL on GPUs); one process needs neither
(:class:`LocalComm`). ``moce_ds.clustering.kmeans.kmeans`` only sees this interface, so there is one k-means.
Arrays travel as float64 (sums of many float32 rows lose digits otherwise); objects travel pickled.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np

__all__ = ["Communicator", "LocalComm", "MPIComm", "TorchComm"]


@runtime_checkable
class Communicator(Protocol):
    rank: int
    world_size: int
    name: str
    local_rank: int  # rank among the processes of this node: the GPU faiss-gpu's index goes to

    def allreduce_sum(self, a: np.ndarray) -> np.ndarray:
        """Element-wise sum over ranks of a float64 array of the same shape on every rank."""

    def broadcast(self, obj: Any, root: int = 0) -> Any:
        """``root``'s object on every rank."""

    def gather(self, obj: Any, root: int = 0) -> list[Any] | None:
        """Every rank's object, in rank order, on ``root``; None elsewhere."""

    def barrier(self) -> None: ...


class LocalComm:
    """One process: every collective is the identity."""

    rank, world_size, name, local_rank = 0, 1, "local", 0

    def allreduce_sum(self, a: np.ndarray) -> np.ndarray:
        return np.asarray(a, dtype=np.float64)

    def broadcast(self, obj: Any, root: int = 0) -> Any:
        return obj

    def gather(self, obj: Any, root: int = 0) -> list[Any] | None:
        return [obj]

    def barrier(self) -> None:
        pass


class MPIComm:
    """mpi4py over ``MPI.COMM_WORLD`` (or a given communicator); the wheel loads the system MPI."""

    name = "mpi"

    def __init__(self, comm: Any = None) -> None:
        from mpi4py import MPI  # imported here: MPI_Init runs at import, and only MPI jobs should pay for it

        self._mpi = MPI
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.rank, self.world_size = self.comm.Get_rank(), self.comm.Get_size()
        self.local_rank = self.comm.Split_type(MPI.COMM_TYPE_SHARED).Get_rank()  # ranks sharing this node's memory

    def allreduce_sum(self, a: np.ndarray) -> np.ndarray:
        send = np.ascontiguousarray(a, dtype=np.float64)
        out = np.empty_like(send)
        self.comm.Allreduce(send, out, op=self._mpi.SUM)  # buffer interface: no pickling of the k*d sums
        return out

    def broadcast(self, obj: Any, root: int = 0) -> Any:
        return self.comm.bcast(obj, root=root)

    def gather(self, obj: Any, root: int = 0) -> list[Any] | None:
        return self.comm.gather(obj, root=root)

    def barrier(self) -> None:
        self.comm.Barrier()


class TorchComm:
    """torch.distributed's default group (already initialised by the caller, e.g. the trainer)."""

    name = "torch.distributed"

    def __init__(self) -> None:
        import torch
        import torch.distributed as dist

        if not dist.is_initialized():
            raise RuntimeError("TorchComm needs torch.distributed to be initialised (moce_ds.engine.init_distributed)")
        self._torch, self._dist = torch, dist
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        # NCCL reduces device tensors only; gloo reduces CPU tensors
        backend = dist.get_backend()
        self.device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        self.local_rank = torch.cuda.current_device() if torch.cuda.is_available() else self.rank

    def allreduce_sum(self, a: np.ndarray) -> np.ndarray:
        t = self._torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64)).to(self.device)
        self._dist.all_reduce(t, op=self._dist.ReduceOp.SUM)
        return t.cpu().numpy()

    def broadcast(self, obj: Any, root: int = 0) -> Any:
        box = [obj]
        self._dist.broadcast_object_list(box, src=root, device=self.device)
        return box[0]

    def gather(self, obj: Any, root: int = 0) -> list[Any] | None:
        # all_gather_object rather than gather_object: the latter is missing on some backends' CPU paths
        out: list[Any] = [None] * self.world_size
        self._dist.all_gather_object(out, obj)
        return out if self.rank == root else None

    def barrier(self) -> None:
        self._dist.barrier()
