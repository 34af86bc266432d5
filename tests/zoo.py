"""A zoo of small problems shared by the tests and the benchmarks.

Each problem has Flax-style parameter names, so AGD infers every role, and a loss that AGD must
drive down from AGD's own initialisation.
"""

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

import agd_optax


@dataclasses.dataclass(frozen=True)
class Problem:
    name: str
    init: Callable[[jax.Array], Any]  # key -> params
    loss: Callable[[Any], jax.Array]  # params -> scalar
    target: float  # the loss must fall below target * initial loss within `steps` steps
    steps: int


def _regression_data(key, n=128, d_in=8, d_out=4):
    kx, kw = jax.random.split(key)
    x = jax.random.normal(kx, (n, d_in))
    w = jax.random.normal(kw, (d_in, d_out)) / math.sqrt(d_in)
    return x, jnp.tanh(x @ w) * 2.0


def matrix_parabola() -> Problem:
    """A single dense weight fit to a linear map: 0.5 * ||x W - y||^2 / n."""
    x, y = _regression_data(jax.random.key(1))
    y = x @ jax.random.normal(jax.random.key(2), (8, 4))

    def init(key):
        return {"dense": {"kernel": agd_optax.dense_init()(key, (8, 4))}}

    def loss(p):
        return 0.5 * jnp.mean(jnp.sum((x @ p["dense"]["kernel"] - y) ** 2, axis=-1))

    return Problem("matrix_parabola", init, loss, target=0.05, steps=200)


def mlp(bias: bool = False, layer_norm: bool = False) -> Problem:
    """A 3-layer MLP (sqrt(2)-scaled ReLU) regressing a smooth target; optionally with biases and
    LayerNorm (scale and offset) after the hidden layers."""
    x, y = _regression_data(jax.random.key(3))
    sizes = [(8, 32), (32, 32), (32, 4)]

    def init(key):
        keys = jax.random.split(key, len(sizes))
        p = {}
        for i, (k, shape) in enumerate(zip(keys, sizes)):
            layer = {"kernel": agd_optax.dense_init()(k, shape)}
            if bias:
                layer["bias"] = jnp.zeros(shape[1])
            p[f"dense{i}"] = layer
            if layer_norm and i < len(sizes) - 1:
                p[f"norm{i}"] = {"scale": jnp.ones(shape[1]), "bias": jnp.zeros(shape[1])}
        return p

    def loss(p):
        h = x
        for i in range(len(sizes)):
            h = h @ p[f"dense{i}"]["kernel"]
            if bias:
                h = h + p[f"dense{i}"]["bias"][None, :]
            if i < len(sizes) - 1:
                if layer_norm:
                    mu = h.mean(-1, keepdims=True)
                    h = (h - mu) / jnp.sqrt(h.var(-1, keepdims=True) + 1e-6)
                    h = h * p[f"norm{i}"]["scale"][None, :] + p[f"norm{i}"]["bias"][None, :]
                h = math.sqrt(2.0) * jax.nn.relu(h)
        return jnp.mean(jnp.sum((h - y) ** 2, axis=-1))

    name = "mlp" + ("_bias" if bias else "") + ("_layernorm" if layer_norm else "")
    return Problem(name, init, loss, target=0.25, steps=300)


def tiny_cnn() -> Problem:
    """A two-conv network classifying which half of an 8x8 image is brighter (cross-entropy)."""
    key = jax.random.key(4)
    x = jax.random.normal(key, (64, 8, 8, 2))
    y = (x[:, :4].mean(axis=(1, 2, 3)) > x[:, 4:].mean(axis=(1, 2, 3))).astype(jnp.int32)

    def init(key):
        k1, k2, k3 = jax.random.split(key, 3)
        return {
            "conv0": {"kernel": agd_optax.conv_init()(k1, (3, 3, 2, 8))},
            "conv1": {"kernel": agd_optax.conv_init()(k2, (3, 3, 8, 8))},
            "head": {"kernel": agd_optax.dense_init()(k3, (8, 2))},
        }

    def conv(h, k):
        return jax.lax.conv_general_dilated(
            h, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    def loss(p):
        h = math.sqrt(2.0) * jax.nn.relu(conv(x, p["conv0"]["kernel"]))
        h = math.sqrt(2.0) * jax.nn.relu(conv(h, p["conv1"]["kernel"]))
        logits = h.mean(axis=(1, 2)) @ p["head"]["kernel"]
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))

    return Problem("tiny_cnn", init, loss, target=0.6, steps=300)


# The suite compiles without LLVM optimisation (conftest.py): its programs are small and compile
# faster so. A long training loop runs faster optimised (the tiny CNN's 300 steps: ~30 s of CPU
# unoptimised, ~5 s optimised), so the convergence runs compile with XLA's default level:
# ``jax.jit(fn, compiler_options=zoo.OPTIMIZED)``.
OPTIMIZED = {"xla_backend_optimization_level": 3}


def all_problems() -> list[Problem]:
    return [matrix_parabola(), mlp(), mlp(bias=True), mlp(bias=True, layer_norm=True), tiny_cnn()]
