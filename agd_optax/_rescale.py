"""The guard's slow path: every norm taken on gradients rescaled by a power of two.

The plain step squares the gradient, so in float32 a leaf whose entries reach about 1e19
overflows to Inf, and one whose entries are all below about 1e-19 underflows to 0 (or to a few
subnormal bits), although the norm itself is a normal number. Here each group of entries summed
into one norm (a weight's kernel position and stack slice, a norm-layer parameter) is first
multiplied by ``2**-k``, with ``2**k`` the power of two just above its largest magnitude, so its
largest square lies in [1/4, 1) and nothing that matters over- or underflows. Multiplying by a
power of two is exact, so wherever the plain sums are exact both agree to rounding. A norm is
kept as ``(sum of scaled squares, k)``, its value ``sqrt(sum) * 2**k``; the step forms every
product that could leave the range (G, ``g / ||g||``) on the scaled values (``_step.py``).

It only runs when a plain squared norm is Inf or below its threshold (``LeafPlan.threshold``),
in one ``lax.cond`` for the whole tree, so the usual step pays no extra pass over the gradients.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from agd_optax._floats import exponents, max_keep, pow2, sum_keep
from agd_optax._plan import Plan

__all__ = ["rescaled_squared_norms", "stacked"]


def _psum(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
    return lax.psum(x, axes) if axes else x


def _pmax(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
    return lax.pmax(x, axes) if axes else x


def stacked(xs: list[jax.Array]) -> jax.Array:
    """Arrays of one shape stacked on a new leading axis."""
    return lax.expand_dims(xs[0], (0,)) if len(xs) == 1 else jnp.stack(xs)


def rescaled_squared_norms(
    leaves: list[jax.Array], plan: Plan, acc: np.dtype
) -> tuple[list[jax.Array], list[jax.Array]]:
    """Per group of the plan, its members' norms (stacked first, reduced axes kept with size 1)
    as sums of rescaled squares and their int32 exponents. Each leaf is reduced on its own and
    only its norms are stacked: stacking the gradients themselves would let XLA's sharding
    propagation carry one leaf's sharding to another's update."""
    sums, exps = [], []
    for group in plan.groups:
        s, e = [], []
        for i in group.members:
            x = lax.convert_element_type(leaves[i], acc)
            k = exponents(_pmax(max_keep(lax.abs(x), group.reduce_axes), group.reduce_mesh))
            scaled = x * pow2(-k, acc)
            s.append(_psum(sum_keep(scaled * scaled, group.reduce_axes), group.reduce_mesh))
            e.append(k)
        sums.append(stacked(s))
        exps.append(stacked(e))
    return sums, exps
