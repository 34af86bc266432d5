"""The rescaled pass: every norm taken on gradients rescaled by a power of two.

The plain step squares the gradient, so in float32 a leaf whose entries reach about 1e19
overflows to Inf, and one whose entries are all below about 1e-19 underflows to 0 (or to a few
subnormal bits), although the norm itself is a normal number. Here the entries summed into each
norm (a weight's kernel position and stack slice, a norm-layer parameter) are first multiplied by
a power of two ``c = 2**-k`` read off that norm's plain sum of squares ``q`` (:func:`scales`), so
that the sum of the scaled squares neither overflows nor loses to underflow anything that counts:

* ``q`` a positive float: ``c`` is ``1 / sqrt(q)`` rounded down to a power of two, so the scaled
  sum lies in about [1/4, 1] (and ``c >= 2**63`` in float32 when ``q`` is subnormal);
* ``q`` 0 (every square flushed): every entry is below about ``2**-75`` in float32 and, being a
  normal number, above ``tiny``; one power of two (about ``2**(76 + log2(n) / 2)`` for a norm of
  ``n`` entries) fits that whole range into the squares' range;
* ``q`` Inf (or NaN): every entry is below the largest float and the largest one above
  ``sqrt(max / n)``; again one power of two (about ``2**-(65 + log2(n) / 2)``) fits them.

The bounds of the last two cases are taken for the tree's longest norm and hold for every
shorter one (a shorter norm's scaled sum stays well inside the range), so one pair serves
the whole tree. Multiplying by a power of two is exact, so wherever the plain sums are exact
both agree to rounding; this holds for norms of up to ``2**33`` entries each in float32. A norm is kept as
``(sum of scaled squares, c)``, its value ``sqrt(sum) / c``; the step forms every product that
could leave the range (G, ``g / ||g||``) on the scaled values (``_step.py``).

The rescaled pass is the plain pass again (the same sums of squares, with these ``c`` in place
of 1: the second turn of the loop in ``_step.measure``), made only when a plain squared norm is
Inf or below its threshold (``LeafPlan.threshold``), so the usual step pays no extra pass over
the gradients; and the powers of two come from the plain sums, not from another pass for each
leaf's largest entry.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax import lax

from agd_optax._floats import Constants, _bits

__all__ = ["bounds", "scales"]


def bounds(summed: int, dtype: np.dtype) -> tuple[float, float]:
    """The powers of two ``c`` for a plain sum of squares of ``summed`` entries that is Inf (or
    NaN), and that is 0 (see the module)."""
    info = np.finfo(dtype)
    n = math.log2(max(summed, 1))
    lo = 2.0 ** -(math.floor((info.maxexp + n) / 2) + 1)
    hi = 2.0 ** (math.ceil((n + info.nmant - info.minexp) / 2) + 1)
    return lo, hi


def scales(q: jax.Array, lo: jax.Array, hi: jax.Array, consts: Constants) -> jax.Array:
    """The powers of two ``c`` of the module's docstring, one per plain sum of squares ``q``,
    in ``q``'s dtype and shape: ``1 / sqrt(q)`` rounded down to a power of two, clamped to
    ``[lo, hi]`` (scalars, or arrays of ``q``'s shape: see :func:`bounds`)."""
    ints, mantissa, _ = _bits(q.dtype)
    mask = consts.full(q.shape, ~((1 << mantissa) - 1), ints)  # Sign and exponent bits.
    bits = lax.bitwise_and(lax.bitcast_convert_type(lax.rsqrt(q), ints), mask)
    return lax.clamp(lo, lax.bitcast_convert_type(bits, q.dtype), hi)
