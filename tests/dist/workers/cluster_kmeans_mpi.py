"""k-means over MPI ranks on a contiguous split of the rows in data.npz; rank 0 saves the result."""

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from moce_ds.clustering.comm import MPIComm  # noqa: E402
from moce_ds.clustering.kmeans import kmeans  # noqa: E402

torch.set_num_threads(1)
src, out = Path(sys.argv[1]), Path(sys.argv[2])
comm = MPIComm()
z = np.load(src)
x, init, k = z["x"], z["init"], int(z["k"])
rows = np.array_split(np.arange(x.shape[0]), comm.world_size)[comm.rank]  # rank r holds block r, in order
given = kmeans(x[rows], k, iters=30, tol=0, init=init, comm=comm, spherical=False)  # blobs: Euclidean
own = kmeans(x[rows], k, iters=50, seed=0, comm=comm, spherical=False)
a_given, a_own = comm.gather(given.assignments), comm.gather(own.assignments)
if comm.rank == 0:
    np.savez(out, given_assign=np.concatenate(a_given), given_obj=np.array(given.objective),
             given_centroids=given.centroids, own_assign=np.concatenate(a_own), own_obj=np.array(own.objective),
             ranks=comm.world_size)
