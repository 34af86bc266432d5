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


def prefetch_to_device(
    mesh: Mesh, batches: Iterator[tuple[np.ndarray, ...]], size: int | None = None
):
    """Shards the next ``size`` batches onto the devices while the current step runs (default:
    2 on accelerators; none on CPU, where the copies would take the cores the step runs on)."""
    if size is None:
        size = 0 if mesh.devices.flat[0].platform == "cpu" else 2
    if size == 0:
        yield from (shard_batch(mesh, *batch) for batch in batches)
        return
    queue: collections.deque = collections.deque()
    for batch in batches:
        queue.append(shard_batch(mesh, *batch))
        if len(queue) >= size:
            yield queue.popleft()
    while queue:
        yield queue.popleft()


def fsdp_sharding(mesh: Mesh, shape: tuple[int, ...]) -> NamedSharding:
    """Splits a leaf over the data axis along its largest axis that divides evenly (FSDP style);
    leaves too small or with no such axis (scalars, small biases) are replicated."""
    n = data_size(mesh)
    candidates = [a for a in range(len(shape)) if shape[a] >= n and shape[a] % n == 0]
    if n == 1 or not candidates:
        return replicated(mesh)
    axis = max(candidates, key=lambda a: (shape[a], -a))
    spec = [None] * len(shape)
    spec[axis] = DATA_AXIS
    return NamedSharding(mesh, PartitionSpec(*spec))


def fsdp_shardings(mesh: Mesh, tree):
    return jax.tree.map(lambda x: fsdp_sharding(mesh, tuple(x.shape)), tree)


def data_size(mesh: Mesh) -> int:
    return mesh.shape[DATA_AXIS]


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """``jax.distributed.initialize`` for multi-process runs: every argument None auto-detects
    (Slurm, Open MPI, TPU pods, Kubernetes); on CPU the processes talk through gloo."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # Only affects CPU devices.
    jax.distributed.initialize(
        coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
    )
