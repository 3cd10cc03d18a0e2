"""faiss-gpu per rank without a GPU (issue 17 item 2): the rank's own GPU, one resource object per k-means."""

import numpy as np
import pytest

import moce_ds.clustering.kmeans as km
from moce_ds.clustering.comm import LocalComm


def test_faiss_gpu_for():
    assert km.faiss_gpu_for(3, 8) == 3
    assert km.faiss_gpu_for(0, 0) is None
    with pytest.raises(ValueError, match="one rank per GPU"):
        km.faiss_gpu_for(2, 2)


class _FakeGpuFaiss:
    """The real faiss, plus a recording stand-in for its GPU calls (the index stays on the CPU)."""

    def __init__(self, real):
        self._real, self.resources, self.devices = real, 0, []

    def __getattr__(self, name):
        return getattr(self._real, name)

    def StandardGpuResources(self):  # noqa: N802 - faiss's name
        self.resources += 1
        return object()

    def index_cpu_to_gpu(self, res, device, index):
        self.devices.append(device)
        return index

    def index_cpu_to_all_gpus(self, *a, **k):
        raise AssertionError("k-means must not spread one rank over all GPUs")


def test_kmeans_uses_its_rank_gpu_and_one_resource(monkeypatch):
    fake = _FakeGpuFaiss(km.import_faiss())
    monkeypatch.setattr(km, "import_faiss", lambda: fake)
    monkeypatch.setattr(km, "_faiss_gpus", lambda: 4)

    class Rank2(LocalComm):
        local_rank = 2

    x = np.random.default_rng(0).standard_normal((600, 8)).astype(np.float32)
    res = km.kmeans(x, 5, iters=6, tol=0.0, comm=Rank2(), spherical=False)
    assert len(res.objective) == 6
    assert fake.resources == 1  # not one per Lloyd iteration
    assert set(fake.devices) == {2} and len(fake.devices) == 1  # the index is refilled, not re-copied
