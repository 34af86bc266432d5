"""Timing an update alone and a whole training step, and the bytes of an optimizer's state."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import agd_optax
from benchmarks.overhead.zoo import OPTIMIZERS, num_params


def host_arrays(shapes: Any, seed: int) -> Any:
    """Standard normal float32 NumPy arrays of the given shapes."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: rng.standard_normal(x.shape, dtype=np.float32), shapes)


def to_device(host: Any, dtype) -> Any:
    """Fresh device arrays (copies, safe to donate) of ``host`` in ``dtype``."""
    return jax.tree.map(lambda a: jnp.array(a, dtype=dtype), host)


# --------------------------------------------------------------------------------------------------
# 1. The update alone.


def _update_loop(tx: optax.GradientTransformation, steps: int):
    """``steps`` updates in one jitted scan; each step's gradient is ``grads * (1 + i / steps)``."""

    def loop(params, state, grads):
        def body(carry, i):
            p, s = carry
            scale = 1.0 + i.astype(jnp.float32) / steps
            g = jax.tree.map(lambda x: x * scale.astype(x.dtype), grads)
            u, s = tx.update(g, s, p)
            return (optax.apply_updates(p, u), s), None

        (params, state), _ = jax.lax.scan(body, (params, state), jnp.arange(steps))
        return params, state

    return jax.jit(loop, donate_argnums=(0, 1))


def time_updates(
    names: Sequence[str], shapes: Any, dtype, steps: int, repeats: int
) -> dict[str, float]:
    """Median seconds per update of each optimizer (interleaved), on arrays of ``shapes``."""
    host = host_arrays(shapes, seed=0)
    grads = to_device(host_arrays(shapes, seed=1), dtype)
    loops, carries = {}, {}
    for name in names:
        tx = OPTIMIZERS[name]()
        params = to_device(host, dtype)
        state = tx.init(params)
        state = jax.tree.map(jnp.copy, state)  # States aliasing the params cannot be donated.
        loops[name] = _update_loop(tx, steps)
        carries[name] = jax.block_until_ready(loops[name](params, state, grads))  # Warm-up.
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(repeats):
        for name in names:
            t0 = time.perf_counter()
            carries[name] = jax.block_until_ready(loops[name](*carries[name], grads))
            times[name].append((time.perf_counter() - t0) / steps)
    del carries
    return {name: statistics.median(ts) for name, ts in times.items()}


# --------------------------------------------------------------------------------------------------
# 2. A whole training step.


def _train_models(size: str) -> dict[str, dict[str, Any]]:
    """Model, input shape and batch of each whole-step workload, per ``--size``."""
    if size == "tiny":
        return {
            "mlp": dict(arch="fcn", depth=3, width=64, input_shape=(64,), classes=10, batch=16),
            # A small 1-D convnet in smoke runs: compiling a ResNet's step takes half a minute.
            "cnn1d": dict(arch="cnn1d", depth=3, width=8, input_shape=(32, 1), classes=10, batch=4),
        }
    if size == "small":
        return {
            "mlp": dict(arch="fcn", depth=4, width=1024, input_shape=(784,), classes=10, batch=128),
            "resnet50": dict(
                arch="resnet50", width=64, input_shape=(64, 64, 3), classes=1000, batch=8
            ),
        }
    return {
        "mlp": dict(arch="fcn", depth=8, width=4096, input_shape=(784,), classes=10, batch=1024),
        "resnet50": dict(
            arch="resnet50", width=64, input_shape=(224, 224, 3), classes=1000, batch=128
        ),
    }


def time_train_steps(spec: dict[str, Any], steps: int, repeats: int) -> dict[str, float]:
    """Median seconds per training step (forward, backward, update) for AGD and SGD-momentum."""
    from flax import nnx

    from benchmarks.models import make_model

    key_x, key_y = jax.random.split(jax.random.key(0))
    x = jax.random.normal(key_x, (spec["batch"], *spec["input_shape"]), jnp.float32)
    y = jax.random.randint(key_y, (spec["batch"],), 0, spec["classes"])
    runs, states = {}, {}
    for name in ("sgd_momentum", "agd"):
        model = make_model(
            spec["arch"],
            num_classes=spec["classes"],
            input_shape=spec["input_shape"],
            depth=spec.get("depth"),
            width=spec["width"],
            rngs=nnx.Rngs(0),
        )
        tx = (
            agd_optax.agd(roles=agd_optax.nnx_roles(model)) if name == "agd" else OPTIMIZERS[name]()
        )
        optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
        graphdef, state = nnx.split((model, optimizer))

        def loop(state, graphdef=graphdef):
            def body(state, _):
                model, optimizer = nnx.merge(graphdef, state)

                def loss_fn(model):
                    logits = model(x)
                    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

                loss, grads = nnx.value_and_grad(loss_fn)(model)
                optimizer.update(model, grads)
                return nnx.state((model, optimizer)), loss

            return jax.lax.scan(body, state, length=steps)

        runs[name] = jax.jit(loop, donate_argnums=0)
        states[name], _ = jax.block_until_ready(runs[name](jax.tree.map(jnp.copy, state)))
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name in runs:
            t0 = time.perf_counter()
            states[name], _ = jax.block_until_ready(runs[name](states[name]))
            times[name].append((time.perf_counter() - t0) / steps)
    return {name: statistics.median(ts) for name, ts in times.items()}


# --------------------------------------------------------------------------------------------------
# 3. State bytes.


def state_bytes(tx: optax.GradientTransformation, shapes: Any, dtype) -> tuple[float, int]:
    """(bytes per parameter of the state's arrays, bytes of its scalars), for params in ``dtype``."""
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype), shapes)
    state = jax.eval_shape(tx.init, params)
    per_param = fixed = 0
    for leaf in jax.tree.leaves(state):
        nbytes = math.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize
        if leaf.ndim == 0:
            fixed += nbytes
        else:
            per_param += nbytes
    return per_param / num_params(shapes), fixed
