"""Float arithmetic the step kernel is built from: exact powers of two and binary exponents read
off the bits, sums and maxima that keep their reduced axes, and eta of a given G.

Written with ``jax.lax`` primitives rather than ``jax.numpy`` (whose functions trace as nested
``jit`` calls, a dozen operations for ``frexp`` or ``ldexp``): the kernel applies these once per
leaf, and what it traces per leaf is what XLA compiles per leaf.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = [
    "LARGE_G_LOG2",
    "Constants",
    "eta_of",
    "exponents",
    "exponents_of_inverse",
    "max_keep",
    "pow2",
    "pow2_down",
    "root_of_even_pow2",
    "safe_inverse",
    "sum_keep",
]

# Above this G, eta is computed as log(G) / 2: they differ by about 1 / (2 sqrt(G)) = 2**-51,
# and sqrt(4 G) would overflow float32 near G = 8.5e37.
LARGE_G_LOG2 = 100


def eta_of(G: jax.Array) -> jax.Array:
    """eta = log((1 + sqrt(1 + 4 G)) / 2), the step of a given G (SPEC.md), computed as
    ``log1p(2 G / (1 + sqrt(1 + 4 G)))``: the same number, without the cancellation that makes
    the textbook form 0 in float32 once G is below about 3e-8 (eta is then about G)."""
    return jnp.log1p(2.0 * G / (1.0 + jnp.sqrt(1.0 + 4.0 * G)))


def _bits(dtype: np.dtype) -> tuple[np.dtype, int, int]:
    info = np.finfo(dtype)
    return np.dtype(f"int{info.bits}"), int(info.nmant), int(info.maxexp) - 1  # int, mantissa, bias


def pow2(n: jax.Array, dtype: np.dtype) -> jax.Array:
    """``2.0**n`` in ``dtype`` for int32 ``n`` in the normal range ``[minexp, maxexp - 1]``,
    exact, built from its bits."""
    ints, mantissa, bias = _bits(dtype)
    biased = lax.convert_element_type(n + bias, ints)
    return lax.bitcast_convert_type(lax.shift_left(biased, ints.type(mantissa)), dtype)


def pow2_down(n: jax.Array, dtype: np.dtype) -> jax.Array:
    """``2.0**n`` in ``dtype`` for int32 ``n <= 0``, as :func:`pow2`, with ``n`` below the normal
    range raised to its lowest (``minexp``). For the factors that bring a norm down to the scale
    of the largest it is summed with: a term below ``2**minexp`` times the largest is far beneath
    the sum's rounding, and ``pow2`` alone would wrap such an ``n`` into the sign bit."""
    return pow2(lax.max(n, np.int32(np.finfo(dtype).minexp)), dtype)


def exponents(m: jax.Array) -> jax.Array:
    """int32 ``k`` with ``m * 2**-k`` in [0.5, 1) for a normal ``m >= 0`` (``frexp``'s exponent),
    clipped to ``[minexp + 1, maxexp - 2]`` so that ``2**-k`` is normal (0 and subnormals give
    the lowest, Inf and NaN the highest)."""
    info = np.finfo(m.dtype)
    ints, mantissa, bias = _bits(m.dtype)
    biased = lax.shift_right_logical(lax.bitcast_convert_type(m, ints), ints.type(mantissa))
    k = lax.convert_element_type(biased, np.int32) - np.int32(bias - 1)
    return lax.clamp(np.int32(info.minexp + 1), k, np.int32(info.maxexp - 2))


def root_of_even_pow2(c: jax.Array) -> jax.Array:
    """``sqrt(c)`` of a normal power of two ``c = 2**(2 j)``, exact, from its bits: halving the
    biased exponent and adding back half the bias (a few integer operations, which XLA copies
    into each consumer's kernel, where ``lax.sqrt`` would be a kernel of its own)."""
    ints, mantissa, bias = _bits(c.dtype)
    half = lax.shift_right_logical(lax.bitcast_convert_type(c, ints), ints.type(1))
    return lax.bitcast_convert_type(half + ints.type(bias << (mantissa - 1)), c.dtype)


def exponents_of_inverse(c: jax.Array) -> jax.Array:
    """int32 ``k`` of a normal power of two ``c = 2**-k``."""
    ints, mantissa, bias = _bits(c.dtype)
    biased = lax.shift_right_logical(lax.bitcast_convert_type(c, ints), ints.type(mantissa))
    return np.int32(bias) - lax.convert_element_type(biased, np.int32)


def safe_inverse(x: jax.Array) -> jax.Array:
    """1/x where x > 0 and 0 where x == 0: a zero gradient gives a zero update, never NaN."""
    positive = x > 0
    one, zero = np.ones((), x.dtype), np.zeros((), x.dtype)
    inverse = lax.div(one, lax.select(positive, x, lax.broadcast(one, x.shape)))
    return lax.select(positive, inverse, lax.broadcast(zero, x.shape))


def _keep(y: jax.Array, axes: Sequence[int]) -> jax.Array:
    return lax.expand_dims(y, tuple(sorted(axes)))


def sum_keep(x: jax.Array, axes: Sequence[int]) -> jax.Array:
    """The sum over ``axes``, kept as size-1 axes."""
    return _keep(lax.reduce_sum(x, tuple(axes)), axes) if axes else x


def max_keep(x: jax.Array, axes: Sequence[int]) -> jax.Array:
    """The maximum over ``axes``, kept as size-1 axes."""
    return _keep(lax.reduce_max(x, tuple(axes)), axes) if axes else x


class Constants:
    """Constants made once in a trace and shared by every leaf that uses them: each would
    otherwise be an operation of its own per leaf, and what XLA takes to compile the update
    grows with its operations."""

    def __init__(self) -> None:
        self._made: dict[tuple, jax.Array] = {}

    def full(self, shape: Sequence[int], value: float | int, dtype: Any) -> jax.Array:
        key = (tuple(shape), value, np.dtype(dtype))
        if key not in self._made:
            self._made[key] = jnp.asarray(np.full(tuple(shape), value, dtype))
        return self._made[key]

    def scalar(self, value: float | int, dtype: Any) -> jax.Array:
        return self.full((), value, dtype)
