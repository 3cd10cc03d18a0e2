"""Rank-to-device binding from each launcher's environment (issue 17 item 1), and threads per rank."""

import pytest

from moce_ds.engine.distributed import bind_local_process, resolve_device_binding, threads_per_rank

CASES = [  # (launcher, env, visible devices, rank) -> (local rank, local world size, device index)
    ("deepspeed", {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_SIZE": "4"}, 4, 5, (1, 4, 1)),
    ("torchrun, 2 ranks on 8 GPUs", {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"},
     8, 1, (1, 2, 1)),
    ("torchrun, uneven nodes", {"RANK": "6", "WORLD_SIZE": "7", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "3"}, 4, 6,
     (2, 3, 2)),
    ("mpirun", {"OMPI_COMM_WORLD_RANK": "9", "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_LOCAL_SIZE": "8"},
     8, 9, (1, 8, 1)),
    ("mpirun + deepspeed discovery", {"LOCAL_RANK": "3", "OMPI_COMM_WORLD_LOCAL_RANK": "3",
                                      "OMPI_COMM_WORLD_LOCAL_SIZE": "4"}, 4, 3, (3, 4, 3)),
    ("srun", {"SLURM_PROCID": "13", "SLURM_LOCALID": "5", "SLURM_NTASKS_PER_NODE": "8"}, 8, 13, (5, 8, 5)),
    ("srun, uneven tasks per node", {"SLURM_LOCALID": "1", "SLURM_NTASKS_PER_NODE": "2(x3)"}, 2, 1, (1, None, 1)),
    ("srun torchrun (torchrun's ranks win)", {"SLURM_LOCALID": "0", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "4"}, 4,
     3, (3, 4, 3)),
    ("one process, no launcher", {}, 1, 0, (0, None, 0)),
    ("CPU, two ranks", {"LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "WORLD_SIZE": "2"}, 0, 1, (1, 2, None)),
    ("CPU, no local variable", {"WORLD_SIZE": "2", "RANK": "1"}, 0, 1, (1, None, None)),
]


@pytest.mark.parametrize("launcher,env,devices,rank,want", CASES, ids=[c[0] for c in CASES])
def test_binding_per_launcher(launcher, env, devices, rank, want):
    b = resolve_device_binding(env, devices, rank)
    assert (b.local_rank, b.local_world_size, b.device_index) == want


ERRORS = [
    ("local rank beyond visible GPUs", {"LOCAL_RANK": "4"}, 4, "sees 4 device"),
    ("more ranks per node than GPUs", {"LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "8"}, 4, "8 processes on this node"),
    ("one GPU per rank via CUDA_VISIBLE_DEVICES", {"SLURM_LOCALID": "1", "SLURM_NTASKS_PER_NODE": "2"}, 1,
     "CUDA_VISIBLE_DEVICES"),
    ("launchers disagree", {"LOCAL_RANK": "1", "OMPI_COMM_WORLD_LOCAL_RANK": "2"}, 4, "disagree"),
    ("rank beyond local world", {"LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "2"}, 4, "inconsistent"),
    ("GPUs, several ranks, no local rank", {"WORLD_SIZE": "2", "RANK": "1"}, 2, "LOCAL_RANK"),
]


@pytest.mark.parametrize("case,env,devices,match", ERRORS, ids=[e[0] for e in ERRORS])
def test_binding_errors(case, env, devices, match):
    with pytest.raises(ValueError, match=match):
        resolve_device_binding(env, devices)


def test_threads_per_rank():
    assert threads_per_rank(64, 8) == 8
    assert threads_per_rank(2, 4) == 1
    assert threads_per_rank(16, None) == 16


def test_bind_sets_threads_per_rank_on_cpu(monkeypatch):
    import torch

    import moce_ds.clustering.kmeans as km
    import moce_ds.engine.distributed as d

    seen = []
    monkeypatch.setattr(km, "set_threads", seen.append)
    monkeypatch.setattr(d, "_cores", lambda: 16)
    before = torch.get_num_threads()
    b = bind_local_process(env={"LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"})
    assert (b.local_rank, b.device_index, seen) == (1, None, [4])
    seen.clear()
    bind_local_process(env={"LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "OMP_NUM_THREADS": "2"})
    assert seen == []  # the user's setting is kept
    assert torch.get_num_threads() == before
