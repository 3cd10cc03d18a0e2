import numpy as np
import pytest
from sklearn.cluster import KMeans
from sklearn.datasets import make_blobs

from moce_ds.clustering.comm import LocalComm
from moce_ds.clustering.kmeans import assign, kmeans


@pytest.fixture(scope="module")
def blobs():
    x, _ = make_blobs(2000, n_features=16, centers=12, cluster_std=1.5, random_state=0)
    return x.astype(np.float32)


def test_matches_sklearn(blobs):
    # seeds are fixed, so this is deterministic; single runs can land in a local minimum (either library)
    ours = [kmeans(blobs, 12, iters=50, seed=s).objective[-1] for s in range(6)]
    best_sk = KMeans(12, n_init=8, random_state=0).fit(blobs).inertia_ / len(blobs)
    assert min(ours) <= best_sk * 1.01
    single_sk = [KMeans(12, n_init=1, random_state=s).fit(blobs).inertia_ / len(blobs) for s in range(6)]
    assert np.median(ours) <= np.median(single_sk) * 1.01


def test_result_consistent(blobs):
    r = kmeans(blobs, 12, seed=1)
    assert r.centroids.shape == (12, 16) and r.centroids.dtype == np.float32
    assert r.assignments.dtype == np.int64 and r.assignments.shape == (2000,)
    assert r.sizes.dtype == np.int64 and r.sizes.tolist() == np.bincount(r.assignments, minlength=12).tolist()
    a, sq = assign(blobs, r.centroids)
    assert np.array_equal(a, r.assignments)
    # objective is the mean squared distance to the assigned centroid, and is non-increasing
    assert r.objective[-1] == pytest.approx(float(sq.mean()), rel=1e-4)
    ref = ((blobs - r.centroids[a]) ** 2).sum(1)
    assert np.allclose(sq, ref, rtol=1e-3, atol=1e-3)
    assert all(b <= a_ * (1 + 1e-6) for a_, b in zip(r.objective, r.objective[1:]))


def test_deterministic(blobs):
    a, b, c = kmeans(blobs, 12, seed=7), kmeans(blobs, 12, seed=7), kmeans(blobs, 12, seed=8)
    assert np.array_equal(a.centroids, b.centroids) and a.objective == b.objective
    assert not np.array_equal(a.centroids, c.centroids)


def test_empty_cluster_reseeded():
    # two tight groups far apart; the start puts 2 centres on group A, one of them tied -> empty after iteration 0
    rng = np.random.default_rng(0)
    a = rng.normal(0, 0.01, (50, 2))
    b = rng.normal(0, 0.01, (50, 2)) + 100.0
    x = np.concatenate([a, b]).astype(np.float32)
    init = np.array([[0, 0], [0, 0], [50, 50]], np.float32)  # centre 1 ties with centre 0 -> empty
    r = kmeans(x, 3, iters=10, init=init)
    assert r.reseeded >= 1
    assert (r.sizes > 0).all(), r.sizes
    # the re-seeded centre took a far point, so both groups are split off cleanly
    assert len(set(r.assignments[:50])) + len(set(r.assignments[50:])) == 3


def test_communicator_called_once_per_iteration(blobs):
    calls = []

    class Spy(LocalComm):
        def allreduce_sum(self, a):
            calls.append(a.shape)
            return super().allreduce_sum(a)

    r = kmeans(blobs, 5, iters=5, comm=Spy(), tol=0)
    # row count + sample sizes for the init, one per iteration, final sizes
    assert len(calls) == 2 + len(r.objective) + 1
    assert calls[2] == (5 * 16 + 5 + 2,)


@pytest.mark.parametrize("spherical", [False, True])
def test_backends_agree(blobs, spherical):
    x = blobs / np.linalg.norm(blobs, axis=1, keepdims=True) if spherical else blobs  # spherical: unit rows
    c = x[::200][:10]
    a_t, sq_t = assign(x, c, spherical=spherical, backend="torch")
    a_f, sq_f = assign(x, c, spherical=spherical, backend="faiss")
    assert (a_t == a_f).mean() > 0.999
    assert np.allclose(sq_t, sq_f, rtol=1e-4, atol=1e-4)


def test_ivf_backend_runs(blobs):
    r = kmeans(blobs, 12, iters=10, backend="faiss_ivf")
    exact = kmeans(blobs, 12, iters=10, backend="torch")
    assert r.objective[-1] <= exact.objective[-1] * 1.05


def test_spherical(blobs):
    r = kmeans(blobs, 6, spherical=True)
    assert np.allclose(np.linalg.norm(r.centroids, axis=1), 1.0, atol=1e-5)
    assert 0 <= r.objective[-1] <= 4.0


def test_bad_k(blobs):
    with pytest.raises(ValueError):
        kmeans(blobs[:3], 4)
