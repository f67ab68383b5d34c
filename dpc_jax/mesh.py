"""The device mesh and how arrays are placed on it: one 1-D ('data',) mesh of all devices of all
hosts; constants replicated, batches split along their first axis. Training and evaluation both
place their arrays with these."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


def make_mesh() -> Mesh:
    """A 1-D ('data',) mesh over all devices of all hosts."""
    return Mesh(np.asarray(jax.devices()), ("data",))


def replicate(tree, mesh: Mesh):
    return jax.device_put(tree, NamedSharding(mesh, P()))


def shard_batch(x: np.ndarray, mesh: Mesh):
    """The global host batch `x` (the same on every process) split over 'data' along its first
    axis; each process transfers only the rows of its own devices."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, NamedSharding(mesh, P("data")),
                                        lambda index: x[index])
