"""Shared building blocks for the benchmark models.

Conventions follow the Automatic Gradient Descent paper (Bernstein et al., 2023):
ReLU scaled by sqrt(2), no biases and affine-free BatchNorm unless ``bias=True``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
from flax import nnx

Initializer = Callable[..., jax.Array]

SQRT2 = math.sqrt(2.0)

BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


def scaled_relu(x: jax.Array) -> jax.Array:
    """ReLU scaled by sqrt(2), so that it preserves the second moment of a symmetric input."""
    return SQRT2 * jax.nn.relu(x)


def _init_kwargs(kernel_init: Initializer | None) -> dict:
    return {} if kernel_init is None else {"kernel_init": kernel_init}


def linear(
    in_features: int,
    out_features: int,
    *,
    bias: bool,
    kernel_init: Initializer | None,
    rngs: nnx.Rngs,
) -> nnx.Linear:
    """``nnx.Linear``; Flax's default kernel init if ``kernel_init`` is None."""
    return nnx.Linear(
        in_features, out_features, use_bias=bias, rngs=rngs, **_init_kwargs(kernel_init)
    )


def conv(
    in_features: int,
    out_features: int,
    kernel_size: Sequence[int],
    *,
    strides: int | Sequence[int] = 1,
    bias: bool,
    kernel_init: Initializer | None,
    rngs: nnx.Rngs,
) -> nnx.Conv:
    """``nnx.Conv`` with symmetric ``k // 2`` zero padding (PyTorch ``padding=k//2``).

    Explicit symmetric padding matches PyTorch exactly for strided convolutions, where
    Flax's ``'SAME'`` would pad asymmetrically.
    """
    kernel_size = tuple(kernel_size)
    padding = tuple((k // 2, k // 2) for k in kernel_size)
    return nnx.Conv(
        in_features,
        out_features,
        kernel_size,
        strides=strides,
        padding=padding,
        use_bias=bias,
        rngs=rngs,
        **_init_kwargs(kernel_init),
    )


def batch_norm(num_features: int, *, bias: bool, rngs: nnx.Rngs) -> nnx.BatchNorm:
    """``nnx.BatchNorm`` (momentum 0.9, eps 1e-5); affine parameters only if ``bias``.

    Starts in training mode; switch with ``model.train()`` / ``model.eval()``.
    """
    return nnx.BatchNorm(
        num_features,
        momentum=BN_MOMENTUM,
        epsilon=BN_EPSILON,
        use_scale=bias,
        use_bias=bias,
        rngs=rngs,
    )
