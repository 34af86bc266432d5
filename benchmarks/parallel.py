"""Meshes and shardings: the same program on one CPU, one GPU, several devices or hosts."""

from __future__ import annotations

import collections
from collections.abc import Iterator

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def make_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D data-parallel mesh over all devices (or the first ``num_devices``)."""
    devices = jax.devices()
    n = len(devices) if num_devices is None else num_devices
    if not 1 <= n <= len(devices):
        raise ValueError(f"asked for {n} devices, {len(devices)} available")
    return Mesh(np.asarray(devices[:n]), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def shard_batch(mesh: Mesh, *arrays: np.ndarray) -> tuple[jax.Array, ...]:
    """Host arrays (this process's part of the global batch) to global arrays sharded on 'data'."""
    sharding = batch_sharding(mesh)
    return tuple(jax.make_array_from_process_local_data(sharding, a) for a in arrays)


def prefetch_to_device(mesh: Mesh, batches: Iterator[tuple[np.ndarray, ...]], size: int = 2):
    """Shards the next ``size`` batches onto the devices while the current step runs."""
    queue: collections.deque = collections.deque()
    for batch in batches:
        queue.append(shard_batch(mesh, *batch))
        if len(queue) >= size:
            yield queue.popleft()
    while queue:
        yield queue.popleft()


def replicate(mesh: Mesh, tree):
    return jax.device_put(tree, replicated(mesh))


def data_size(mesh: Mesh) -> int:
    return mesh.shape[DATA_AXIS]
