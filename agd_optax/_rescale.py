"""The rescaled pass: every norm taken on gradients rescaled by a power of two.

The plain step squares the gradient, so in float32 a leaf whose entries reach about 1e19
overflows to Inf, and one whose entries are all below about 1e-19 underflows to 0 (or to a few
subnormal bits), although the norm itself is a normal number. Here the entries summed into each
norm (a weight's kernel position and stack slice, a norm-layer parameter) are first multiplied by
a power of two ``c`` read off that norm's plain sum of squares ``q`` (:func:`scales`), one of
three for the whole tree, so that the sum of the scaled squares neither overflows nor loses to
underflow anything that counts:

* ``q`` Inf (or NaN): every entry is below the largest float and the largest one above
  ``sqrt(max / n)`` for a norm of ``n`` entries; one power of two ``lo`` (about
  ``2**-(65 + log2(n) / 2)``) fits them into the squares' range;
* ``q`` below its threshold (``LeafPlan.threshold``, about ``n * tiny / eps``; 0 when every
  square flushed): every entry is below ``sqrt(q)`` and, being a normal number, above ``tiny``;
  one power of two ``hi`` (about ``2**(76 + log2(n) / 2)``) lifts the smallest normal entry's
  square well into the normal numbers while the scaled sum ``q * hi**2`` stays below about
  ``2**(49 + 2 log2(n))``, far from the largest float;
* otherwise 1: the plain sum is exact to rounding already.

The bounds are taken for the tree's longest norm and hold for every shorter one (a shorter
norm's scaled sum stays well inside the range), so one pair serves the whole tree, and choosing
``c`` is two comparisons: no per-leaf transcendental for XLA to compile. Multiplying by a power
of two is exact, so wherever the plain sums are exact both agree to rounding; this holds for
norms of up to ``2**33`` entries each in float32. A norm is kept as ``(sum of scaled squares,
c)``, its value ``sqrt(sum) / c``; the step forms every product that could leave the range (G,
``g / ||g||``) on the scaled values (``_step.py``).

The rescaled pass is the plain pass again (the same sums of squares, with these ``c`` in place
of 1: the second turn of the loop in ``_step.measure``), made only when a plain squared norm is
Inf or below its threshold, so the usual step pays no extra pass over the gradients; and the
powers of two come from the plain sums, not from another pass for each leaf's largest entry.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from agd_optax._floats import exponents, pow2
from agd_optax._sums import pmax

__all__ = ["bounds", "common_scale", "scales"]


def bounds(summed: int, dtype: np.dtype) -> tuple[float, float]:
    """The powers of two ``(lo, hi)`` for the plain sums of squares of up to ``summed`` entries
    that are Inf (or NaN), and that are below their threshold (see the module), each an even
    power of two, whose square root ``_step.normalise`` splits between its two products."""
    info = np.finfo(dtype)
    n = math.log2(max(summed, 1))
    down = math.floor((info.maxexp + n) / 2) + 1
    up = math.ceil((n + info.nmant - info.minexp) / 2) + 1
    # Even exponents (one binade further out at most): the square root of each is exact.
    return 2.0 ** -(down + down % 2), 2.0 ** (up + up % 2)


def scales(
    q: jax.Array, threshold: jax.Array, lo: jax.Array, hi: jax.Array, one: jax.Array
) -> jax.Array:
    """The powers of two ``c`` of the module's docstring, one per plain sum of squares ``q``,
    in ``q``'s dtype and shape: ``lo`` where ``q`` is Inf or NaN, ``hi`` where it is below
    ``threshold``, ``one`` elsewhere (each an array of ``q``'s shape; see :func:`bounds`)."""
    return lax.select(lax.is_finite(q), lax.select(lax.lt(q, threshold), hi, one), lo)


def common_scale(
    q: jax.Array, threshold: float, bound: tuple[float, float], mesh_axes: tuple[str, ...], acc
) -> jax.Array:
    """One power of two for every norm in G, from their plain sums ``q``: ``lo`` of ``bound``
    when one is Inf or NaN, ``hi`` when the largest is below ``threshold`` (the largest of
    their thresholds, so every scaled sum stays below ``threshold * hi**2``, far from the
    largest float), else ``2**-(e // 2)`` for the largest's binary exponent ``e``, which brings
    the largest near 1.

    G is a sum, so one power of two serves all its norms, where each divisor needs its own:
    every norm within about ``2**50`` of the largest is then exact to rounding, and a smaller
    one, whose squares may be flushed, is below G's rounding. The bounds are :func:`bounds`:
    with ``lo`` the largest sum fits the range, with ``hi`` the smallest normal entries' squares
    are normal numbers (``mesh_axes``: inside ``shard_map``, those the sums are spread over)."""
    m = pmax(jnp.max(q), mesh_axes)
    lo, hi = (jnp.asarray(b, acc) for b in bound)
    near = pow2(-lax.shift_right_arithmetic(exponents(m), np.int32(1)), acc)
    return lax.select(lax.is_finite(m), lax.select(m < threshold, hi, near), lo)
