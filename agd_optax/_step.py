"""The AGD step kernel, which :func:`agd_optax.agd`, :func:`agd_optax.agd_momentum` and the
benchmarks' variants all call.

From flat leaves and their :class:`~agd_optax._plan.Plan`:

1. :func:`measure`: every norm of the step, one sum of squares per group of stacked leaves; one
   guard (a squared norm that is Inf, or below the smallest value it is exact at) sends the whole
   tree through the power-of-two rescaled sums of ``_rescale.py`` in one ``lax.cond``;
2. :func:`step_size`: ``G = (1/L) sum_k s_k N_k`` and ``eta``, formed on the scaled norms so that
   neither over- nor underflows for any finite gradient;
3. :func:`normalise`: each leaf's update ``(eta / L) s g / ||g||`` in one elementwise pass.

:func:`agd_step` chains the three under ``jax.jit`` (the plan a static argument), so the
un-jitted update of a notebook runs one compiled program, compiled once per tree. :func:`prepare`
is the update's prologue: the structure check, the mesh axes, the layouts, the accumulation dtype
and the plan.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from agd_optax._checks import check_same_structure
from agd_optax._floats import LARGE_G_LOG2, eta_of, max_keep, pow2, safe_inverse, sum_keep
from agd_optax._layouts import resolve_layouts
from agd_optax._plan import Plan, make_plan
from agd_optax._rescale import rescaled_squared_norms, stacked
from agd_optax._sharding import global_shapes, mesh_axes_per_leaf

__all__ = [
    "Norms",
    "accumulation_dtype",
    "agd_step",
    "check_init",
    "measure",
    "normalise",
    "plan_of",
    "prepare",
    "step_size",
]


def accumulation_dtype(tree: Any) -> jnp.dtype:
    """float32, or wider when a leaf is wider: norms and G never accumulate in bf16 or f16."""
    return jnp.result_type(jnp.float32, *(jnp.result_type(x) for x in jax.tree.leaves(tree)))


class Norms(NamedTuple):
    """What the guard's ``cond`` returns.

    Attributes:
      divisors: per leaf, the norm that divides it (its own, or its owner's whole norm for a
        bias) as ``r * 2**k``, packed as one array ``[2**-k, 1 / r]`` (a leading axis of 2,
        then the shape that broadcasts against the leaf; ``1 / 0`` read as 0); every ``k`` is 0
        on the plain path.
      eta, G: the step size of these norms.
    """

    divisors: list[jax.Array]
    eta: jax.Array
    G: jax.Array


def _psum(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
    return lax.psum(x, axes) if axes else x


def _pmax(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
    return lax.pmax(x, axes) if axes else x


def _flat(xs: list[jax.Array]) -> jax.Array:
    return jnp.concatenate([x.ravel() for x in xs])


def _squared_norms(leaves: list[jax.Array], plan: Plan, acc: np.dtype) -> list[jax.Array]:
    """The plain sums of squares of each group's members, stacked (see ``_rescale.py``)."""
    out = []
    for group in plan.groups:
        sums = []
        for i in group.members:
            x = lax.convert_element_type(leaves[i], acc)
            sums.append(_psum(sum_keep(x * x, group.reduce_axes), group.reduce_mesh))
        out.append(stacked(sums))
    return out


def _per_entry(plan: Plan, sums: list[jax.Array], value) -> np.ndarray:
    """A static flat vector over the groups' norms: ``value(leaf)`` at each member's."""
    return np.concatenate(
        [
            np.repeat([float(value(plan.leaves[i])) for i in group.members], q[0].size)
            for q, group in zip(sums, plan.groups)
        ]
    )


def _suspect(sq: list[jax.Array], plan: Plan, acc: np.dtype) -> jax.Array:
    """Whether a plain squared norm is Inf or below its threshold (then the rescaled path)."""
    thresholds = _per_entry(plan, sq, lambda leaf: leaf.threshold)
    flat = _flat(sq)
    suspect = jnp.any(jnp.isinf(flat) | (flat < jnp.asarray(thresholds, acc)))
    if plan.mesh_axes:  # Every shard takes the same branch, whose collectives they share.
        suspect = lax.pmax(suspect.astype(jnp.int32), plan.mesh_axes) > 0
    return suspect


def _whole_norms(
    q: jax.Array, e: jax.Array | None, leaf, acc: np.dtype
) -> tuple[jax.Array, jax.Array | None]:
    """Stacked weights' whole norms (their kernel positions' sums, on a common exponent)."""
    spatial = tuple(a + 1 for a in leaf.spatial_axes)  # Past the stacking axis.
    if e is None:
        return _psum(sum_keep(q, spatial), leaf.spatial_mesh), None
    top = _pmax(max_keep(e, spatial), leaf.spatial_mesh)
    whole = sum_keep(q * pow2(2 * (e - top), acc), spatial)
    return _psum(whole, leaf.spatial_mesh), top


def _pack(q: jax.Array, e: jax.Array | None, acc: np.dtype) -> jax.Array:
    """Norms ``sqrt(q) * 2**e`` (stacked on axis 0) as ``[2**-e, 1 / sqrt(q)]`` on axis 1."""
    shift = jnp.ones(q.shape, acc) if e is None else pow2(-e, acc)
    return jnp.stack([shift, safe_inverse(lax.sqrt(q))], axis=1)


def _norms(ssq, exp, plan: Plan, acc: np.dtype) -> Norms:
    """The branches' common end, from the groups' sums (of rescaled squares) and exponents
    (None: all 0): the divisors formed per group, each leaf's cut from its group's."""
    packs = [_pack(q, None if exp is None else exp[k], acc) for k, q in enumerate(ssq)]
    wholes = {}
    for leaf in plan.leaves:
        if leaf.owner is None:  # Not a bias.
            continue
        k = plan.where[leaf.owner][0]
        if k in wholes:
            continue
        owner = plan.leaves[leaf.owner]
        if owner.spatial_axes:
            wholes[k] = _pack(
                *_whole_norms(ssq[k], None if exp is None else exp[k], owner, acc), acc
            )
        else:
            wholes[k] = packs[k]
    divisors = []
    for i, leaf in enumerate(plan.leaves):
        if leaf.owner is not None:  # A bias: its owner's whole norms.
            k, m = plan.where[leaf.owner]
            divisors.append(wholes[k][m].reshape((2, *leaf.bias_shape)))
        else:
            k, m = plan.where[i]
            divisors.append(packs[k][m])
    return Norms(divisors, *step_size(ssq, exp, plan, acc))


def _rescaled(leaves: list[jax.Array], plan: Plan, acc: np.dtype) -> Norms:
    """The slow branch: the rescaled sums."""
    return _norms(*rescaled_squared_norms(leaves, plan, acc), plan, acc)


def measure(leaves: list[jax.Array], plan: Plan, acc: np.dtype) -> Norms:
    """Every norm of the step and its step size: from the plain sums of squares or, when one of
    them is Inf or below its threshold, from the rescaled sums (one ``lax.cond`` for the tree).

    The values taken over the whole tree (the step size) are formed in the branches and only
    returned: as outputs of the ``cond`` they reach each leaf's pass as plain values, where XLA
    would otherwise copy their computation into every leaf's kernel.
    """
    sq = _squared_norms(leaves, plan, acc)
    return lax.cond(
        _suspect(sq, plan, acc),
        lambda leaves, _: _rescaled(leaves, plan, acc),
        lambda _, sq: _norms(sq, None, plan, acc),
        leaves,
        sq,
    )


def step_size(ssq, exp, plan: Plan, acc: np.dtype) -> tuple[jax.Array, jax.Array]:
    """(eta, G) of the groups' norms ``sqrt(ssq) * 2**exp`` (``exp`` None: all 0).

    G is formed as ``2**top * sum_k s_k r_k 2**(k - top)``, with ``top`` the largest exponent
    of a weight's norm, so that the sum is finite for finite gradients; a G beyond the dtype's
    range is Inf, and eta is then ``log(G) / 2`` from the scaled sum. The other norms enter as
    0 times themselves: a NaN or Inf in any gradient makes G NaN, and so every update. The work
    is a few operations on the flat vector of norms and one dot product.
    """
    scales = _per_entry(plan, ssq, lambda leaf: leaf.scale * (leaf.kind == "weight"))
    r = lax.sqrt(_flat(ssq))
    if exp is None:
        top = jnp.int32(0)
    else:
        k = _flat(exp)
        lowest = np.int32(np.finfo(acc).minexp)
        top = _pmax(jnp.max(jnp.where(scales > 0, k, lowest)), plan.mesh_axes)
        r = r * pow2(jnp.where(scales > 0, k - top, 0), acc)
    if plan.mesh_axes:
        total, offset = jnp.zeros([], acc), 0
        for q, group in zip(ssq, plan.groups):
            part = slice(offset, offset + q.size)
            own = jnp.dot(jnp.asarray(scales[part], acc), r[part]) + 0.0 * jnp.sum(r[part])
            total, offset = total + _psum(own, group.rest_mesh), offset + q.size
    else:
        total = jnp.dot(jnp.asarray(scales, acc), r) + 0.0 * jnp.sum(r)
    total = total + 0.0 * total
    mean = total / plan.depth
    G = mean * pow2(top, acc)
    log_G = jnp.log(mean) + top.astype(acc) * np.log(2.0)
    return jnp.where(G < 2.0**LARGE_G_LOG2, eta_of(G), 0.5 * log_G), G


def normalise(
    leaves: list[jax.Array], norms: Norms, eta: jax.Array, plan: Plan, acc: np.dtype
) -> list[jax.Array]:
    """Each leaf's ``(eta / L) s g / ||g||`` in the leaf's dtype, formed as
    ``(g * 2**-k) * (s * (eta / L) / r)`` for its divisor ``r * 2**k``, so that no factor leaves
    the range (0 for a zero norm): one elementwise pass per leaf."""
    step = eta / plan.depth
    updates = []
    for g, d, leaf in zip(leaves, norms.divisors, plan.leaves):
        shift, factor = d[0], d[1] * (step * leaf.scale)
        u = (lax.convert_element_type(g, acc) * shift) * factor
        updates.append(lax.convert_element_type(u, g.dtype))
    return updates


@functools.partial(jax.jit, static_argnames=("plan", "acc"))
def agd_step(
    leaves: list[jax.Array], plan: Plan, acc: jnp.dtype
) -> tuple[list[jax.Array], jax.Array, jax.Array]:
    """AGD's step of flat gradient leaves: ``(updates without gain, eta, G)``."""
    norms = measure(leaves, plan, acc)
    return normalise(leaves, norms, norms.eta, plan, acc), norms.eta, norms.G


def plan_of(
    leaves: list[Any],
    layouts: list[Any],
    acc: Any,
    mesh_axes: list[Any] | None = None,
    global_leaves: list[Any] | None = None,
) -> Plan:
    """The plan of flat leaves with their layouts (``global_leaves``: their global shapes,
    inside ``shard_map``)."""
    shapes = [tuple(x.shape) for x in leaves]
    return make_plan(
        layouts,
        shapes,
        [(np.dtype(x.dtype), getattr(jax.typeof(x), "sharding", None)) for x in leaves],
        shapes if global_leaves is None else [tuple(x.shape) for x in global_leaves],
        mesh_axes,
        acc,
    )


class Prepared(NamedTuple):
    """What an update computes with: the flat leaves, their tree, the plan and the dtype."""

    leaves: list[jax.Array]
    treedef: Any
    plan: Plan
    acc: np.dtype


def prepare(updates: Any, params: Any, roles: Any, param_specs: Any, state_dtype: Any) -> Prepared:
    """The update's prologue, shared by every AGD transformation.

    Checks ``updates`` against ``params``, reads the mesh axes of ``param_specs`` (inside
    ``shard_map``), resolves the layouts on the global shapes (``roles`` given the parameters, or
    the updates when there are none) and plans the step, norms accumulated in ``state_dtype`` or
    wider.
    """
    if params is not None:
        check_same_structure(updates, params)
    mesh_axes = None if param_specs is None else mesh_axes_per_leaf(updates, param_specs)
    shapes = updates if mesh_axes is None else global_shapes(updates, mesh_axes)
    if callable(roles):
        roles = roles(shapes if params is None else params)
    layouts = resolve_layouts(shapes, roles)
    leaves, treedef = jax.tree.flatten(updates)
    acc = np.dtype(jnp.result_type(state_dtype, accumulation_dtype(updates)))
    plan = plan_of(leaves, layouts, acc, mesh_axes, jax.tree.leaves(shapes))
    return Prepared(leaves, treedef, plan, acc)


def check_init(params: Any, roles: Any) -> np.dtype:
    """Resolves the layouts at ``init`` (failing there, naming the leaf, not at the first update)
    and returns the accumulation dtype of the state's scalars. A tree with no leaves (the
    placeholder ``optax.tree.map_params`` initialises with) has nothing to check; ``update``
    refuses it."""
    if jax.tree.leaves(params):
        resolve_layouts(params, roles(params) if callable(roles) else roles)
    return np.dtype(accumulation_dtype(params))
