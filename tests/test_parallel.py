"""Data-parallel, FSDP, pmap and shard_map AGD give the single-device results; two processes too."""

import functools
import json
import os
import re
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from fake_data import write_cifar
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import agd_optax
from benchmarks import parallel
from benchmarks.config import Config
from benchmarks.run import train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _params_close(a, b, rtol=2e-5, atol=2e-6):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def _config(tmp_path, name, **overrides):
    values = dict(
        epochs=2, width=64, progress=False, checkpoint=False, workdir=str(tmp_path / name)
    )
    return Config(**(values | overrides))


def test_eight_devices_equal_one_device_fcn(tmp_path):
    assert jax.device_count() == 8
    one = train_and_evaluate(_config(tmp_path, "one"), mesh=parallel.make_mesh(1))
    eight = train_and_evaluate(_config(tmp_path, "eight"), mesh=parallel.make_mesh(8))
    fsdp = train_and_evaluate(
        _config(tmp_path, "fsdp", shard_params=True), mesh=parallel.make_mesh(8)
    )
    assert eight["num_devices"] == 8
    _params_close(one["params"], eight["params"])
    _params_close(one["params"], fsdp["params"])
    assert abs(one["test_accuracy"] - fsdp["test_accuracy"]) < 1e-6


def test_batchnorm_statistics_are_global_under_data_parallel_jit():
    """With the batch split over 8 devices, BatchNorm normalises with, and keeps running averages
    of, the statistics of the whole batch: outputs and statistics equal the one-device ones."""
    from flax import nnx

    def run(mesh):
        model = nnx.Sequential(
            nnx.Linear(4, 16, rngs=nnx.Rngs(0)), nnx.BatchNorm(16, rngs=nnx.Rngs(0))
        )
        graphdef, state = nnx.split(model)
        state = jax.device_put(state, parallel.replicated(mesh))
        x = jax.random.normal(jax.random.key(1), (64, 4)) * jnp.arange(1.0, 5.0)[None]

        @jax.jit
        def f(state, x):
            model = nnx.merge(graphdef, state)
            return model(x), nnx.state(model)

        return f(state, parallel.shard_batch(mesh, np.asarray(x))[0])

    out1, state1 = run(parallel.make_mesh(1))
    out8, state8 = run(parallel.make_mesh(8))
    np.testing.assert_allclose(out1, out8, rtol=1e-5, atol=1e-5)
    _params_close(state1, state8)


@pytest.mark.slow
def test_batchnorm_resnet_data_parallel_and_fsdp(tmp_path):
    """A whole ResNet with BatchNorm, FSDP on 8 devices against one device (slow to compile on
    CPU; the BatchNorm test above and the FCN test cover the same behaviour quickly)."""
    write_cifar(tmp_path / "data", "cifar10", n_per_batch=16)
    common = dict(
        dataset="cifar10",
        data_dir=str(tmp_path / "data"),
        arch="resnet18",
        width=4,
        depth=None,
        epochs=1,
        train_bs=16,
        test_bs=16,
        max_steps_per_epoch=3,
        augment=False,
        bias=True,
    )
    one = train_and_evaluate(_config(tmp_path, "one", **common), mesh=parallel.make_mesh(1))
    fsdp = train_and_evaluate(
        _config(tmp_path, "fsdp", shard_params=True, **common), mesh=parallel.make_mesh(8)
    )
    _params_close(one["params"], fsdp["params"], rtol=1e-4, atol=1e-5)


def test_fsdp_shardings_split_one_axis():
    mesh = parallel.make_mesh(8)
    assert parallel.fsdp_sharding(mesh, (256, 64)).spec == P("data", None)
    assert parallel.fsdp_sharding(mesh, (3, 3, 16, 64)).spec == P(None, None, None, "data")
    assert parallel.fsdp_sharding(mesh, (10,)).spec == P()
    assert parallel.fsdp_sharding(mesh, ()).spec == P()


def _problem():
    keys = jax.random.split(jax.random.key(0), 4)
    params = {
        "conv": {"kernel": agd_optax.conv_init()(keys[0], (3, 3, 8, 16))},
        "dense": {"kernel": agd_optax.dense_init()(keys[1], (16, 8)), "bias": jnp.zeros(8)},
        "norm": {"scale": jnp.ones(16), "bias": jnp.zeros(16)},
    }
    x = jax.random.normal(keys[2], (32, 6, 6, 8))
    y = jax.random.normal(keys[3], (32, 8))

    def loss(p, x, y):
        h = jax.lax.conv_general_dilated(
            x, p["conv"]["kernel"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        h = jax.nn.relu(h).mean(axis=(1, 2))
        h = (h - h.mean(-1, keepdims=True)) * p["norm"]["scale"][None] + p["norm"]["bias"][None]
        return jnp.mean((h @ p["dense"]["kernel"] + p["dense"]["bias"][None] - y) ** 2)

    return params, x, y, loss


@functools.cache
def _reference_steps(steps=3):
    """AGD on one device, the same steps as the parallel runs: the parameters and the state."""
    params, x, y, loss = _problem()
    tx = agd_optax.agd()

    @jax.jit  # One compilation, not one per operation.
    def step(params, state):
        updates, state = tx.update(jax.grad(loss)(params, x, y), state, params)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    for _ in range(steps):
        params, state = step(params, state)
    return params, state


def test_agd_inside_pmap_with_averaged_gradients():
    params, x, y, loss = _problem()
    want, want_state = _reference_steps()
    n = jax.local_device_count()
    tx = agd_optax.agd()

    def step(params, state, x, y):
        grads = jax.lax.pmean(jax.grad(loss)(params, x, y), "batch")
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    p_step = jax.pmap(step, axis_name="batch")
    # Copies per device, made and read back on the host (no compilation per leaf).
    replicate = lambda t: jax.tree.map(lambda a: np.stack([np.asarray(a)] * n), t)  # noqa: E731
    p, s = replicate(params), replicate(tx.init(params))
    xs, ys = x.reshape(n, -1, *x.shape[1:]), y.reshape(n, -1, *y.shape[1:])
    for _ in range(3):
        p, s = p_step(p, s, xs, ys)
    _params_close(want, jax.tree.map(lambda a: np.asarray(a)[0], p))
    np.testing.assert_allclose(
        np.asarray(optax.tree.get(s, "eta"))[0], optax.tree.get(want_state, "eta"), rtol=1e-5
    )


def test_agd_inside_shard_map_on_parameter_shards():
    params, x, y, loss = _problem()
    want, want_state = _reference_steps()
    mesh = jax.make_mesh((2, 4), ("data", "model"))
    specs = {
        "conv": {"kernel": P(None, None, None, "model")},
        "dense": {"kernel": P("model", None), "bias": P()},
        "norm": {"scale": P("model"), "bias": P("model")},
    }
    tx = agd_optax.agd(param_specs=specs)

    def step(full, params, state, x, y):
        # The loss sees whole parameters (a real model would gather them in its layers); AGD
        # updates the local shards and completes its norms across the "model" axis.
        grads = jax.lax.pmean(jax.grad(loss)(full, x, y), "data")
        grads = jax.tree.map(
            lambda g, spec: _local_shard(g, spec), grads, specs, is_leaf=lambda s: isinstance(s, P)
        )
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    def _local_shard(g, spec):
        if "model" not in spec:
            return g
        axis = list(spec).index("model")
        size = g.shape[axis] // jax.lax.axis_size("model")
        return jax.lax.dynamic_slice_in_dim(g, jax.lax.axis_index("model") * size, size, axis)

    f = jax.jit(
        jax.shard_map(
            step,
            mesh=mesh,
            in_specs=(P(), specs, P(), P("data"), P("data")),
            out_specs=(specs, P()),
            check_vma=False,
        )
    )
    put = lambda t, s: jax.tree.map(  # noqa: E731
        lambda a, sp: jax.device_put(a, NamedSharding(mesh, sp)),
        t,
        s,
        is_leaf=lambda v: isinstance(v, P),
    )
    p = put(params, specs)
    state = jax.device_put(tx.init(params), NamedSharding(mesh, P()))
    xs = jax.device_put(x, NamedSharding(mesh, P("data")))
    ys = jax.device_put(y, NamedSharding(mesh, P("data")))
    for _ in range(3):
        full = jax.device_put(p, NamedSharding(mesh, P()))
        p, state = f(full, p, state, xs, ys)
    _params_close(want, p)
    np.testing.assert_allclose(
        optax.tree.get(state, "eta"), optax.tree.get(want_state, "eta"), rtol=1e-5
    )


def test_param_specs_that_do_not_fit_raise():
    params = {"dense": {"kernel": jnp.zeros((4, 4))}}
    tx = agd_optax.agd(param_specs={"dense": {"kernel": P("x", None, None)}})
    with pytest.raises(ValueError, match="'dense/kernel'.*more entries"):
        tx.update(params, tx.init(params))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_train_and_checkpoint(tmp_path):
    """Two CPU processes of two devices each, jax.distributed on localhost, against one process
    of four devices: same metrics, one set of files, checkpoints of every epoch."""
    port = _free_port()
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
    flags.append("--xla_force_host_platform_device_count=2")
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join(flags))
    args = [
        sys.executable,
        "-m",
        "benchmarks.train",
        "--epochs",
        "2",
        "--width",
        "64",
        "--no-progress",
        "--workdir",
        str(tmp_path / "multi"),
        "--distributed",
        "--coordinator-address",
        f"localhost:{port}",
        "--num-processes",
        "2",
    ]
    procs = [
        subprocess.Popen(
            args + ["--process-id", str(i)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert "test accuracy" in outs[0] and "on 4 device(s)" in outs[0]
    assert "test accuracy" not in outs[1]  # The summary is printed once.
    summary = json.loads((tmp_path / "multi" / "summary.json").read_text())
    assert sorted(os.listdir(tmp_path / "multi" / "checkpoints")) == ["1", "2"]

    single = train_and_evaluate(_config(tmp_path, "single"), mesh=parallel.make_mesh(4))
    assert summary["test_accuracy"] == pytest.approx(single["test_accuracy"], abs=1e-6)
    assert summary["test_loss"] == pytest.approx(single["test_loss"], rel=1e-4)


def _processes(n, port, workdir, flags=(), preludes=None, device_count=1, ids=None):
    """Processes ``ids`` (default: all) of ``n`` of ``benchmarks.train --distributed`` on
    localhost, each after its prelude (code run before the program, in that process)."""
    xla = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
    xla.append(f"--xla_force_host_platform_device_count={device_count}")
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join(xla))
    procs = []
    for i in range(n) if ids is None else ids:
        prelude = (preludes or {}).get(i, "")
        code = f"{prelude}\nimport runpy\nrunpy.run_module('benchmarks.train', run_name='__main__')"
        args = [
            *("--epochs", "2", "--width", "64", "--no-progress", "--checkpoint-every", "1"),
            *("--workdir", str(workdir), "--distributed"),
            *("--coordinator-address", f"localhost:{port}", "--num-processes", str(n)),
            *("--process-id", str(i), *flags),
        ]
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", code, *args],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    return procs


def test_a_cluster_that_does_not_form_fails_clearly(tmp_path):
    """--distributed with no cluster names the flags to give; a process whose coordinator does
    not answer, and a coordinator whose other process never comes, say who waits for what and
    give up after --distributed-timeout with the address."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    for name in [k for k in env if k.startswith(("SLURM_", "OMPI_", "TPU_", "KUBERNETES_"))]:
        del env[name]
    lone = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.train", "--distributed", "--no-progress"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    flags = ["--distributed-timeout", "2"]
    port = _free_port()
    (client,) = _processes(2, port, tmp_path / "a", flags, ids=[1])  # Process 0 never starts.
    (server,) = _processes(2, _free_port(), tmp_path / "b", flags, ids=[0])  # Nor 1 here.
    outs = [p.communicate(timeout=120)[0] for p in (lone, client, server)]
    assert [p.returncode for p in (lone, client, server)] == [1, 1, 1], outs
    assert "error: --distributed found no cluster to join" in outs[0]
    for flag in ("--coordinator-address", "--num-processes", "--process-id"):
        assert flag in outs[0]
    assert "Traceback" not in outs[0]
    assert f"process 1 waits for the coordinator at localhost:{port}" in outs[1]
    assert (
        f"error: process 1 gave up after 2 s waiting for the coordinator at localhost:{port}"
        in (outs[1])
    )
    assert "process 0 serves as the coordinator at" in outs[2]
    assert "error: process 0 gave up after 2 s" in outs[2] and "--distributed-timeout" in outs[2]


# From the first checkpoint on, files over 8 kB cannot be written (as on a full disk).
LIMIT_FILE_SIZE = """
import resource, signal
from benchmarks import checkpointing
save = checkpointing.Checkpoints.save
def limited(self, *args, **kwargs):
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (8_000, 8_000))
    return save(self, *args, **kwargs)
checkpointing.Checkpoints.save = limited
"""


def test_a_failed_checkpoint_save_on_process_0_stops_both_processes_with_its_cause(tmp_path):
    procs = _processes(2, _free_port(), tmp_path / "run", preludes={0: LIMIT_FILE_SIZE})
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [1, 1], outs
    # Epoch 1's or 2's: how large orbax lets a file grow before it fails varies.
    cause = rf"could not save the checkpoint of epoch (\d) in {tmp_path / 'run' / 'checkpoints'}/\1"
    assert re.search(f"error: {cause}", outs[0]), outs[0]
    assert re.search(f"error: stopped because process 0 failed: {cause}", outs[1]), outs[1]
    assert "File too large" in outs[1]


def test_a_failure_in_one_of_four_processes_stops_them_all_with_its_cause(tmp_path):
    """Process 2 of 4 fails before training (its data cannot be read); the other three, waiting
    for it in a collective, stop with its error."""
    fail = (
        "import benchmarks.run\n"
        "def make_task(config):\n"
        "    raise OSError('cannot read the data: the disk is gone')\n"
        "benchmarks.run.make_task = make_task"
    )
    procs = _processes(4, _free_port(), tmp_path / "run", preludes={2: fail})
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [1, 1, 1, 1], outs
    assert "OSError: cannot read the data" in outs[2]
    for i in (0, 1, 3):
        assert (
            "error: stopped because process 2 failed: OSError: cannot read the data: the disk is "
            "gone" in outs[i]
        ), outs[i]
