"""Meshes and shardings: the same program on one CPU, one GPU, several devices or hosts; and the
processes of a multi-process run, which start together and stop together."""

from __future__ import annotations

import atexit
import collections
import os
import sys
import threading
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
    if one_device(mesh):  # One transfer for all the arrays.
        return tuple(jax.device_put(arrays, sharding))
    return tuple(jax.make_array_from_process_local_data(sharding, a) for a in arrays)


def one_device(mesh: Mesh) -> bool:
    """Whether ``mesh`` is one device of a single process (no collectives, no other parts)."""
    return mesh.devices.size == 1 and jax.process_count() == 1


def prefetch_to_device(
    mesh: Mesh, batches: Iterator[tuple[np.ndarray, ...]], size: int | None = None
):
    """Shards the next ``size`` batches onto the devices while the current step runs (default:
    2 on accelerators; none on CPU, where the copies would take the cores the step runs on).
    On a single CPU device the batches stay on the host as they are: ``Trainer.train_step``
    passes each one to its step's call, which places it (the cheapest way on the host)."""
    if size is None:
        size = 0 if mesh.devices.flat[0].platform == "cpu" else 2
    if size == 0:
        if one_device(mesh):
            yield from batches
        else:
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


class DistributedError(RuntimeError):
    """The processes of a multi-process run could not start together."""


FAILURE_KEY = "agd_optax/failed"  # Set by the first process that fails, read by all.
WATCH_EVERY_S = 0.2  # How often each process looks for a failure of another.
LEAVE_WAIT_S = 60.0  # How long a stopping process waits for the others to stop with it.


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    timeout: int = 300,
) -> None:
    """``jax.distributed.initialize`` for multi-process runs: every argument None auto-detects
    (Slurm, Open MPI, TPU pods, Kubernetes); on CPU the processes talk through gloo.

    Says who waits for what, and gives up after ``timeout`` seconds with an error naming the
    coordinator's address (``DistributedError``; JAX itself would abort the process). Once
    started, every process watches for a failure announced by another (``announce_failure``)
    and stops with its cause."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # Only affects CPU devices.
    who = "this process" if process_id is None else f"process {process_id}"
    address = coordinator_address or "the address the cluster gives"
    count = "all the processes" if num_processes is None else f"all {num_processes} processes"
    if process_id == 0:
        waits = f"serves as the coordinator at {address} and waits for {count} to join"
    else:
        waits = f"waits for the coordinator at {address} and for {count} to join"
    print(f"{who} {waits} (up to {timeout} s)", file=sys.stderr, flush=True)

    def give_up() -> None:
        print(
            f"error: {who} gave up after {timeout} s waiting for the coordinator at {address} "
            f"and {count}. Start every process with the same --coordinator-address and "
            "--num-processes, each with its own --process-id, and check that process 0 runs and "
            "can be reached there (--distributed-timeout sets the wait).",
            file=sys.stderr,
            flush=True,
        )
        os._exit(1)

    watchdog = threading.Timer(timeout, give_up)
    watchdog.daemon = True
    watchdog.start()
    try:
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
            initialization_timeout=timeout + 60,  # The watchdog's error comes first.
        )
    except ValueError as e:
        if coordinator_address is None:
            raise DistributedError(
                "--distributed found no cluster to join (no Slurm, Open MPI, TPU pod or "
                "Kubernetes set this process up): give every process --coordinator-address "
                "HOST:PORT (where process 0 listens), --num-processes N and --process-id I "
                f"(0 to N-1). ({e})"
            ) from None
        raise DistributedError(f"--distributed: {e}") from None
    finally:
        watchdog.cancel()
    _watch_for_failures()


def _client():
    from jax._src import distributed

    return distributed.global_state.client


def _watch_for_failures() -> None:
    """A daemon thread that waits for another process to announce a failure, then prints it and
    stops this process with the others (whatever it is waiting for: a collective, a barrier of a
    checkpoint)."""
    client, me = _client(), jax.process_index()
    if client is None or jax.process_count() < 2:
        return

    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(WATCH_EVERY_S):  # Polls: no call left blocking when the run ends.
            try:
                message = client.key_value_try_get(FAILURE_KEY)
            except Exception as e:  # noqa: BLE001 - not set yet; or shut down, coordinator gone.
                if "NOT_FOUND" in str(e):
                    continue
                return
            if message.startswith(f"process {me} "):
                return  # Its own announcement: it is already stopping.
            print(f"error: stopped because {message}", file=sys.stderr, flush=True)
            _leave_and_exit(1)

    thread = threading.Thread(target=watch, name="failure-watch", daemon=True)
    thread.start()

    def end_watch() -> None:  # Before jax.distributed.shutdown (registered earlier, runs later).
        stop.set()
        thread.join(timeout=5)

    atexit.register(end_watch)


_leaving = threading.Lock()


def _leave_and_exit(code: int) -> None:
    """Ends this process of a multi-process run together with the others: every process that
    stops leaves the cluster through JAX's shutdown barrier, so none goes (taking the coordinator
    with it, or seen by it as crashed) while another is still on its way out; a process that
    ended first would make JAX abort the others. Gives up waiting after ``LEAVE_WAIT_S``. Never
    returns; a second caller (the watch and the main thread) waits for the first."""
    _leaving.acquire()
    sys.stdout.flush()
    sys.stderr.flush()
    give_up = threading.Timer(LEAVE_WAIT_S, os._exit, (code,))
    give_up.daemon = True
    give_up.start()
    try:
        jax.distributed.shutdown()
    except Exception:  # noqa: BLE001 - another process is gone already: this one stops anyway.
        pass
    os._exit(code)


def announce_failure(message: str) -> None:
    """Tells the other processes of a multi-process run that this one failed and why; each prints
    the cause and stops, and this process stops with them (exit code 1: it does not return). A
    no-op in a single process."""
    client = _client() if jax.distributed.is_initialized() else None
    if client is None or jax.process_count() < 2:
        return
    try:
        client.key_value_set(FAILURE_KEY, f"process {jax.process_index()} failed: {message}")
    except Exception:  # noqa: BLE001 - another process failed first, and said so.
        pass
    _leave_and_exit(1)
