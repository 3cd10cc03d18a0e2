"""Data-parallel k-means over 2 real MPI ranks (mpirun + mpi4py) against one process and scikit-learn."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.cluster import KMeans
from sklearn.datasets import make_blobs

from moce_ds.clustering.kmeans import kmeans, kmeans_plus_plus

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.timeout(300),
              pytest.mark.skipif(shutil.which("mpirun") is None, reason="needs Open MPI's mpirun")]


def mpirun(n: int, args: list[str]) -> subprocess.CompletedProcess:
    cmd = ["mpirun", "-n", str(n), "--oversubscribe"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-run-as-root")
    proc = subprocess.run([*cmd, sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def two_rank(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mpi_kmeans")
    x, _ = make_blobs(6000, n_features=32, centers=20, cluster_std=2.0, random_state=3)
    x = x.astype(np.float32)
    init = kmeans_plus_plus(x, 20, np.random.default_rng(5))
    np.savez(tmp / "data.npz", x=x, init=init, k=20)
    mpirun(2, [str(ROOT / "tests" / "dist" / "workers" / "cluster_kmeans_mpi.py"), str(tmp / "data.npz"),
               str(tmp / "out.npz")])
    return x, init, dict(np.load(tmp / "out.npz"))


def test_two_ranks_equal_one_process_from_the_same_start(two_rank):
    x, init, out = two_rank
    assert int(out["ranks"]) == 2
    single = kmeans(x, 20, iters=30, tol=0, init=init, spherical=False)
    agree = (out["given_assign"] == single.assignments).mean()
    assert agree >= 0.99, agree
    assert out["given_obj"][-1] == pytest.approx(single.objective[-1], rel=1e-3)
    assert np.allclose(out["given_centroids"], single.centroids, atol=1e-3)


def test_two_rank_objective_within_one_percent_of_sklearn(two_rank):
    x, _, out = two_rank
    sk = KMeans(20, n_init=1, random_state=0).fit(x).inertia_ / len(x)
    assert out["own_obj"][-1] <= sk * 1.01, (out["own_obj"][-1], sk)


def test_launcher_under_mpirun_writes_one_round(tmp_path, embedded_cache):
    from moce_ds.data.sidecar import latest_round

    out = tmp_path / "clusters"
    mpirun(2, [str(ROOT / "launchers" / "cluster.py"), "--data", "embedded", "--cache-dir", str(embedded_cache),
               "--k", "16", "--out", str(out), "--threads", "1"])
    rnd = latest_round(out)
    m = json.loads((rnd.path / "manifest.json").read_text())
    assert rnd.round == 0 and m["ranks"] == 2 and m["comm"] == "mpi" and m["num_unassigned"] == 0
    assert sum(m["cluster_sizes"]) == m["num_images"] == 5008
    # both ranks featurised half the shards into the shared cache
    assert len(list(out.glob("features/*/.done/*.json"))) == 8
