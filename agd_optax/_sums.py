"""The step's reductions of each leaf: its sums of squares, and the NaN and Inf check of the
leaves whose norms the step does not take.

XLA's CPU backend splits a reduction over an axis longer than 32 into three kernels (the squares
materialised, a windowed partial sum and a final sum: its tree-reduction rewrite) unless the leaf
is large enough for its YNNPACK reduction; the same sums taken on a view of the leaf whose
reduced axes are factors of at most 32 are one kernel (:func:`_view`), which compiles and, on
small leaves, runs faster. Inside ``shard_map`` each sum is completed over the mesh axes that
shard the axes it reduces.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax import lax

from agd_optax._plan import Plan

__all__ = ["joined", "nonfinite", "pmax", "psum", "squared_norms"]


def psum(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
    """``lax.psum`` over ``axes`` (none: ``x``)."""
    return lax.psum(x, axes) if axes else x


def pmax(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
    """``lax.pmax`` over ``axes`` (none: ``x``)."""
    return lax.pmax(x, axes) if axes else x


_WIDEST = 32  # The longest axis XLA's CPU backend reduces in one kernel (see the module).


def _factors(n: int) -> tuple[int, ...] | None:
    """``n`` as a product of factors of at most ``_WIDEST``, or None if a prime factor is larger."""
    parts = []
    while n > _WIDEST:
        f = next((f for f in range(_WIDEST, 1, -1) if n % f == 0), None)
        if f is None:
            return None
        parts.append(f)
        n //= f
    return (*parts, n)


def _view(x: jax.Array, axes: tuple[int, ...]) -> tuple[jax.Array, tuple[int, ...]]:
    """``x`` with each run of adjacent ``axes`` that has an axis longer than ``_WIDEST`` viewed
    as factors of at most ``_WIDEST``, and the viewed positions of ``axes``: the same sums in
    one reduction kernel. The view is behind ``lax.optimization_barrier`` (XLA would fold it
    back into the reduction); an explicitly sharded array is left as it is."""
    spec = getattr(getattr(jax.typeof(x), "sharding", None), "spec", None)
    if spec is not None and any(p is not None for p in spec):
        return x, axes
    shape: list[int] = []
    viewed: list[int] = []
    a = 0
    while a < x.ndim:
        b = a + 1
        if a in axes:
            while b < x.ndim and b in axes:
                b += 1
        run = tuple(x.shape[a:b])
        parts = _factors(math.prod(run)) if a in axes and max(run) > _WIDEST else None
        parts = run if parts is None else parts
        if a in axes:
            viewed.extend(range(len(shape), len(shape) + len(parts)))
        shape.extend(parts)
        a = b
    if tuple(shape) == x.shape:
        return x, axes
    return lax.optimization_barrier(lax.reshape(x, tuple(shape))), tuple(viewed)


def joined(xs: list[jax.Array]) -> jax.Array:
    """Per-leaf arrays as one vector of all their entries, behind ``lax.optimization_barrier``:
    XLA would otherwise see through the vector to its pieces and rewrite a reduction of it (the
    step size's sums, the largest norm, the guard's test, the NaN checks' sum) as one chain of
    an operation per leaf, which took about a sixth of the 2,000-leaf ``agd_momentum`` update's
    compile."""
    return lax.optimization_barrier(lax.concatenate([lax.reshape(x, (x.size,)) for x in xs], 0))


def squared_norms(
    source: list[jax.Array],
    cs: list[jax.Array],
    indices: tuple[int, ...],
    plan: Plan,
    acc: np.dtype,
) -> list[jax.Array]:
    """The sums of squares of the entries of the leaves at ``indices``, each times its ``c``
    (laid out along its norms, or one scalar), laid out along the leaf's ``kept_axes``: one
    reduction of the leaf itself.

    One reduction per array: XLA's CPU backend sums a reduction of one operand in vector lanes,
    to float32 rounding at any length, but a reduction of several operands (one kernel reading
    two arrays side by side) one entry after another, which loses about ``n * eps`` of a sum of
    ``n`` entries (1e-3 at 4 million)."""
    sums = []
    for i, c in zip(indices, cs):
        leaf = plan.leaves[i]
        x = lax.convert_element_type(source[i], acc)
        dims = leaf.kept_axes if c.ndim else ()  # A scalar c: one for every norm of the leaf.
        x, axes = _view(lax.mul(x, lax.broadcast_in_dim(c, x.shape, dims)), leaf.reduce_axes)
        sums.append(psum(lax.reduce_sum(lax.mul(x, x), axes), leaf.reduce_mesh))
    return sums


def nonfinite(source: list[jax.Array], skip: tuple[int, ...], plan: Plan, acc: np.dtype):
    """0, or NaN when an entry of a leaf of ``source`` outside ``skip`` is NaN or Inf (None if
    every leaf is in ``skip``): each leaf's sum of its entries times 0, a sum that cannot
    overflow, where a sum of squares would for large finite entries."""
    parts = []
    for i, x in enumerate(source):
        if i not in skip:
            x, axes = _view(lax.convert_element_type(x, acc), tuple(range(x.ndim)))
            parts.append(lax.reduce_sum(lax.mul(x, lax.full(x.shape, 0.0, acc)), axes))
    if not parts:
        return None
    # One reduction of one vector of the checks (summed as a stack, they were one chain of an
    # addition per leaf).
    return psum(lax.reduce_sum(joined(parts), (0,)), plan.mesh_axes)
