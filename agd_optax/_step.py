"""The AGD step kernel, which :func:`agd_optax.agd`, :func:`agd_optax.agd_momentum` and the
benchmarks' variants all call.

From flat leaves and their :class:`~agd_optax._plan.Plan`:

1. :func:`measure`: every norm the step uses, one sum of squares per leaf that has a divisor of
   its own (a weight or a norm-layer parameter; a bias is divided by its weight's norms) and,
   for ``agd_momentum``, one per weight of the gradient (the norms in G), all of them also in
   one flat vector; the other leaves are only checked for NaN and Inf (a sum of their entries
   times 0, which no finite entry overflows); one guard (a squared norm that is Inf, or below
   the smallest value it is exact at) sends every measured leaf through the power-of-two
   rescaled sums of ``_rescale.py`` in a second turn of one ``lax.while_loop``, whose turns
   form the step size on the flat vector (:func:`step_size`: ``G = (1/L) sum_k s_k N_k`` and
   ``eta``, formed on the scaled norms so that neither over- nor underflows for any finite
   gradient); then each leaf's divisor;
2. :func:`normalise`: each leaf's update ``(eta / L) s g / ||g||`` in one elementwise pass.

What XLA takes to compile the update grows with its operations and with its distinct kernels, so
the kernel keeps both few: per leaf, at most one reduction (run again with the powers of two only
in the loop's second turn) and one elementwise pass and a handful of operations on its norms,
each reading only that leaf's arrays, so that the kernels of leaves of one shape are one program
that XLA compiles once (an operation that read a leaf's part of a vector shared by the tree would
be a kernel of its own, compiled for each leaf); the step size is formed once, on the flat
vector. A reduction over an axis longer than 32 is taken on a view of the leaf with shorter
axes (``_sums.py``), which XLA's CPU backend reduces in one kernel rather than three.

:func:`agd_step` chains the two under ``jax.jit`` (the plan a static argument), so the
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
from agd_optax._floats import (
    LARGE_G_LOG2,
    Constants,
    eta_of,
    exponents_of_inverse,
    pow2,
    pow2_down,
    root_of_even_pow2,
)
from agd_optax._layouts import resolve_layouts
from agd_optax._plan import Plan, make_plan
from agd_optax._rescale import bounds, common_scale, scales
from agd_optax._sharding import global_shapes, mesh_axes_per_leaf
from agd_optax._sums import joined, nonfinite, pmax, psum, squared_norms

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
      divisors: per leaf, the norms ``sqrt(q) / c`` that divide it (its own, or its owner's
        whole norms for a bias) as the pair ``(q, c)``, both laid out along the leaf's
        ``divisor_axes``; every ``c`` is 1 on the plain path.
      eta, G: the step size.
    """

    divisors: list[tuple[jax.Array, jax.Array]]
    eta: jax.Array
    G: jax.Array


def _suspect(flats: list[jax.Array], thresholds: list[jax.Array], plan: Plan) -> jax.Array:
    """Whether a plain squared norm (an entry of one of ``flats``, each source's norms in
    order) is Inf or below its threshold (the same entry of ``thresholds``): then the rescaled
    path."""
    suspect = functools.reduce(
        lax.bitwise_or, [jnp.any(jnp.isinf(f) | (f < t)) for f, t in zip(flats, thresholds)]
    )
    if plan.mesh_axes:  # Every shard takes the same branch, whose collectives they share.
        suspect = lax.pmax(suspect.astype(jnp.int32), plan.mesh_axes) > 0
    return suspect


def _whole_norms(q: jax.Array, c: jax.Array | None, leaf, acc: np.dtype):
    """A weight's whole norms (its kernel positions' sums, on a common power of two) as
    ``(q, c)`` (``c`` None on the plain path)."""
    if c is None:
        return psum(lax.reduce_sum(q, leaf.spatial), leaf.spatial_mesh), None
    k = exponents_of_inverse(c)
    top = pmax(lax.reduce_max(k, leaf.spatial), leaf.spatial_mesh)
    spread = tuple(a for a in range(k.ndim) if a not in leaf.spatial)
    common = pow2_down(2 * (k - lax.broadcast_in_dim(top, k.shape, spread)), acc)
    whole = psum(lax.reduce_sum(q * common, leaf.spatial), leaf.spatial_mesh)
    return whole, pow2(-top, acc)


def _divisors(q, cs, plan: Plan, acc: np.dtype):
    """Per leaf, its divisor ``(q, c)`` (see :class:`Norms`) from every leaf's norms ``(q, c)``
    (``cs`` None: every ``c`` 1): its own, or for a bias its owner's whole norms (the same
    arrays for every bias of one owner). Each is formed from the leaf's (or its owner's) own
    arrays."""
    consts = Constants()

    def whole(o: int) -> tuple[jax.Array, jax.Array]:
        owner = plan.leaves[o]
        if not owner.spatial:
            return own(o)
        w, c = _whole_norms(q[o], None if cs is None else cs[o], owner, acc)
        return w, consts.full(w.shape, 1.0, acc) if c is None else c

    def own(i: int) -> tuple[jax.Array, jax.Array]:
        return q[i], consts.full(q[i].shape, 1.0, acc) if cs is None else cs[i]

    owns: dict[int, tuple[jax.Array, jax.Array]] = {}
    wholes: dict[int, tuple[jax.Array, jax.Array]] = {}
    divisors = []
    for i, leaf in enumerate(plan.leaves):
        if leaf.owner is None:  # Not a bias.
            if i not in owns:
                owns[i] = own(i)
            divisors.append(owns[i])
            continue
        if leaf.owner not in wholes:
            owner = plan.leaves[leaf.owner]
            if owner.spatial:
                wholes[leaf.owner] = whole(leaf.owner)
            else:
                wholes[leaf.owner] = owns.setdefault(leaf.owner, own(leaf.owner))
        divisors.append(wholes[leaf.owner])
    return divisors


def measure(
    leaves: list[jax.Array],
    plan: Plan,
    acc: np.dtype,
    step_leaves: list[jax.Array] | None = None,
) -> Norms:
    """The divisors of ``leaves`` and the step size of ``step_leaves`` (default: ``leaves``):
    from the plain sums of squares or, when one of them is Inf or below its threshold, from the
    sums rescaled by the powers of two of ``_rescale.py``.

    One ``lax.while_loop`` over the leaves whose norms are used (every leaf but the biases,
    whose divisors are their weights' norms; of ``step_leaves``, the weights, the only norms in
    G): its first turn takes the plain sums (every ``c`` 1) and, only when one of them is
    suspect, sets each norm's ``c`` and takes one more turn, which ends it. So the usual step
    makes one pass over each leaf, and the passes are compiled once, not once per branch. The
    step size, formed over the whole tree on one flat vector of every norm, is formed in the
    loop and only returned: as an output of the loop it reaches each leaf's pass as a plain
    value, where XLA would otherwise copy its computation into every leaf's kernel.

    With ``step_leaves``, each source has its own sums, each leaf's one reduction of that leaf
    (a reduction of the two stacked would first copy them; one reading both side by side sums
    less accurately, see ``_sums.squared_norms``), and its own powers of two: one per norm for
    ``leaves``, one for all of ``step_leaves``'s (``_rescale.common_scale``: G is a sum). The
    step source's other leaves (biases; for ``step_leaves`` the norm-layer parameters too) are
    checked outside the loop: a NaN or Inf entry in one makes G and eta NaN, as one in a
    measured leaf does, and a large finite one changes nothing (its squares, which might
    overflow, are never taken).
    """
    separate = step_leaves is not None
    step_source = leaves if step_leaves is None else step_leaves
    # The norms each source takes: those of every leaf with a divisor of its own (a bias is
    # divided by its weight's norms) and, from a separate step source, only the weights' (the
    # only norms in G). The step source's other leaves are only checked for NaN and Inf.
    owners = plan.measured(("weight", "norm"))
    indices = [owners, plan.measured(("weight",))] if separate else [owners]
    consts = Constants()

    # One pair of bounds for the whole tree, those of its longest norm (they hold for every
    # shorter one); the kernels that set ``c`` are one program for every leaf whose norms have
    # one shape and one threshold (one length).
    bound = bounds(max(leaf.summed for leaf in plan.leaves), acc)

    def chosen(q, leaf):  # Each norm's power of two from its plain sum (constants per shape).
        lo, hi, one, small = (consts.full(q.shape, b, acc) for b in (*bound, 1.0, leaf.threshold))
        return scales(q, small, lo, hi, one)

    thresholds = [jnp.asarray(plan.per_entry(lambda leaf: leaf.threshold, i), acc) for i in indices]
    lo, hi, one = (consts.full(thresholds[-1].shape, b, acc) for b in (*bound, 1.0))
    largest = max(plan.leaves[i].threshold for i in indices[-1])
    ones = [
        consts.full(tuple(leaves[i].shape[a] for a in plan.leaves[i].kept_axes), 1.0, acc)
        for i in owners
    ]

    def turn(carry):
        cs, common, _, previous, _, _, first, turns, limit = carry
        sums = [squared_norms(leaves, cs, owners, plan, acc)]
        if separate:  # One power of two for all of G's norms (see ``_rescale.common_scale``).
            sums.append(
                squared_norms(step_source, [common] * len(indices[1]), indices[1], plan, acc)
            )
            k = lax.broadcast(exponents_of_inverse(common), thresholds[-1].shape)
        else:
            k = exponents_of_inverse(scales(previous, thresholds[-1], lo, hi, one))
        flats = [joined(x) for x in sums]
        eta, G = step_size(
            flats[-1], lax.select(first, jnp.zeros_like(k), k), plan, acc, indices[-1]
        )
        again = _suspect(flats, thresholds, plan) & first
        cs = [
            lax.select(again, chosen(q, plan.leaves[i]), c) for q, c, i in zip(sums[0], cs, owners)
        ]
        if separate:
            common = lax.select(
                again, common_scale(flats[-1], largest, bound, plan.mesh_axes, acc), common
            )
        limit = lax.select(again, np.int32(2), limit)
        return (
            cs,
            common,
            sums[0],
            flats[-1],
            eta,
            G,
            jnp.zeros((), bool),
            turns + np.int32(1),
            limit,
        )

    # The loop runs while its turn count is below its limit (1, or 2 once a norm is suspect): a
    # counter XLA's loop analyses find at once, where a carried flag sends them through every
    # element of the carried tuple. ``first`` is carried too: read off the counter, its test
    # would be copied into every leaf's kernel that uses it.
    zero, unit = jnp.zeros((), acc), jnp.ones((), acc)
    init = (ones, unit, ones, one, zero, zero, True, np.int32(0), np.int32(1))
    cs, _, sums, _, eta, G, *_ = lax.while_loop(lambda c: lax.lt(c[7], c[8]), turn, init)
    bad = nonfinite(step_source, indices[-1], plan, acc)
    if bad is not None:  # NaN or Inf in a leaf whose norm is not in G: G and eta NaN.
        eta, G = eta + bad, G + bad
    own, powers = (_by_leaf(x, owners, plan) for x in (sums, cs))
    return Norms(_divisors(own, powers, plan, acc), eta, G)


def _by_leaf(xs: list[Any], indices: tuple[int, ...], plan: Plan) -> list[Any]:
    """Per-leaf values of the leaves at ``indices`` placed at their positions (None elsewhere)."""
    out: list[Any] = [None] * len(plan.leaves)
    for i, x in zip(indices, xs):
        out[i] = x
    return out


def step_size(
    q, k, plan: Plan, acc: np.dtype, indices: tuple[int, ...]
) -> tuple[jax.Array, jax.Array]:
    """(eta, G) of the flat norms ``sqrt(q) * 2**k`` (``k`` None: all 0) of the leaves at
    ``indices``.

    G is formed as ``2**top * sum_k s_k r_k 2**(k - top)``, with ``top`` the largest exponent
    of a weight's norm, so that the sum is finite for finite gradients; a G beyond the dtype's
    range is Inf, and eta is then ``log(G) / 2`` from the scaled sum. The other norms (of
    norm-layer parameters) enter as 0 times themselves: a NaN or Inf in one makes G NaN, and
    so every update. The work is a few operations on the flat vector of norms and one dot
    product (one per set of mesh axes that the leaves' norms are spread over, inside
    ``shard_map``).
    """
    scales = plan.per_entry(lambda leaf: leaf.scale * (leaf.kind == "weight"), indices)
    r = lax.sqrt(q)
    if k is None:
        top = jnp.int32(0)
    else:
        lowest = np.int32(np.finfo(acc).minexp)
        top = pmax(jnp.max(jnp.where(scales > 0, k, lowest)), plan.mesh_axes)
        r = r * pow2_down(jnp.where(scales > 0, k - top, 0), acc)
    if plan.mesh_axes:
        total = jnp.zeros([], acc)
        for axes, part in plan.spread(indices).items():
            own = jnp.dot(jnp.asarray(scales[part], acc), r[part]) + 0.0 * jnp.sum(r[part])
            total = total + psum(own, axes)
    else:
        total = jnp.dot(jnp.asarray(scales, acc), r) + 0.0 * jnp.sum(r)
    total = total + 0.0 * total
    mean = total / plan.depth
    G = mean * pow2(top, acc)
    log_G = jnp.log(mean) + top.astype(acc) * jnp.asarray(np.log(2.0), acc)
    eta = jnp.where(G < 2.0**LARGE_G_LOG2, eta_of(G), 0.5 * log_G)
    return eta.astype(acc), G.astype(acc)


def normalise(
    leaves: list[jax.Array], norms: Norms, eta: jax.Array, plan: Plan, acc: np.dtype
) -> list[jax.Array]:
    """Each leaf's ``(eta / L) s g / ||g||`` in the leaf's dtype, formed from its divisor
    ``sqrt(q) / c`` and ``factor = (eta / L) s / sqrt(q)`` (0 for a zero norm) as
    ``(g * r) * (factor * r)`` with ``r = sqrt(c)``: one elementwise pass per leaf, the same
    kernel for leaves of one shape and scale.

    Every ``c`` is 1 or an even power of two (``_rescale.bounds``), so ``r`` is exact, and
    splitting it between the two products keeps both in the range for any finite gradient:
    where ``c`` is ``lo`` (a norm above about ``2**64``), ``factor * r`` is ``(eta / L) s``
    over the norm times ``sqrt(lo)``, and ``g * r`` is at most the largest float times
    ``sqrt(lo)``; where ``c`` is ``hi`` (a norm below about ``2**-50``), ``g * r`` lifts the
    smallest normal entries to about ``2**-88`` while ``factor * r`` stays below
    ``(eta / L) s 2**88``. So an update that is a normal number is one, whether the entry is
    far below its norm (a tiny entry, a bias beside its weight's large norm) or far above it
    (a bias beside its weight's small norm); on the plain path ``r`` is 1 and the update is
    ``g * factor``."""
    consts = Constants()
    step = eta / plan.depth
    factors: dict[tuple, jax.Array] = {}  # A weight's and its bias's are one.
    updates = []
    for g, (q, c), leaf in zip(leaves, norms.divisors, plan.leaves):
        if (id(q), leaf.scale) not in factors:
            # (eta / L) s broadcast here, for each leaf: shared by the leaves of one shape, the
            # broadcast would be fused into one of their passes only, making it a program apart.
            zeros = consts.full(q.shape, 0.0, acc)
            inverse = lax.select(lax.gt(q, zeros), lax.rsqrt(q), zeros)
            steps = lax.broadcast_in_dim(lax.mul(step, consts.scalar(leaf.scale, acc)), q.shape, ())
            factors[id(q), leaf.scale] = lax.mul(inverse, steps)
        root = root_of_even_pow2(c)
        first, second = (
            lax.broadcast_in_dim(x, g.shape, leaf.divisor_axes)
            for x in (root, lax.mul(factors[id(q), leaf.scale], root))
        )
        u = lax.mul(lax.mul(lax.convert_element_type(g, acc), first), second)
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
