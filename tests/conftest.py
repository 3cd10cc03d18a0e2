import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def embedded_cache(tmp_path_factory) -> Path:
    """One embedded data set (with its k=16 cluster round) shared by every test that trains on it."""
    from moce_ds.clustering.initial_round import ensure_embedded_round
    from moce_ds.data.embedded import build_embedded_dataset

    cache = tmp_path_factory.mktemp("embedded_cache")
    ds = build_embedded_dataset(cache, seed=0)
    ensure_embedded_round(ds, 16, seed=0)
    return cache


@pytest.fixture(scope="session")
def two_rank_run(tmp_path_factory, embedded_cache) -> tuple[Path, Path]:
    """40 steps of MoCE on 2 real ranks (ep_size=2, ZeRO-2); returns (run folder, DeepSpeed config)."""
    from tests.dist.launch import WORKER, run_deepspeed, two_rank_overrides, write_ds_config

    run = tmp_path_factory.mktemp("run") / "uninterrupted"
    ds = write_ds_config(tmp_path_factory.mktemp("ds") / "ds.json")
    run_deepspeed(WORKER, [str(ds), *two_rank_overrides(run, embedded_cache, 40)])
    return run, ds


@pytest.fixture(scope="session")
def user_data_k16(tmp_path_factory, embedded_cache) -> Path:
    """A user data folder (shards + manifest + one cluster round with k=16)."""
    root = tmp_path_factory.mktemp("userdata")
    src = embedded_cache / "embedded-v1"
    for p in (src / "shards").iterdir():
        (root / p.name).symlink_to(p)
    shutil.copytree(src / "clusters", root / "clusters")
    rounds = sorted((root / "clusters").glob("round_*"))
    for extra in rounds[1:]:
        shutil.rmtree(extra)
    assert json.loads((rounds[0] / "manifest.json").read_text())["k"] == 16
    return root


@pytest.fixture(autouse=True)
def _reset_moce_logger():
    """setup_logging() (called in-process by launchers and the trainer) stops propagation; undo it per test
    so caplog sees the `moce_ds` logger whatever ran before."""
    import logging

    yield
    logger = logging.getLogger("moce_ds")
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    logger.propagate = True


def deepspeed_shm_segments() -> set[str]:
    """This user's /dev/shm segments of DeepSpeed's CPU all-reduce (see moce_ds.engine.distributed)."""
    shm = Path("/dev/shm")
    return {p.name for p in shm.glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*")} if shm.is_dir() else set()


@pytest.fixture(autouse=True, scope="session")
def _remove_leaked_shm_segments():
    """Ranks the tests kill on purpose (SIGKILL) cannot remove their segment at exit; remove them after the session."""
    before = deepspeed_shm_segments()
    yield
    for name in deepspeed_shm_segments() - before:
        Path("/dev/shm", name).unlink(missing_ok=True)
