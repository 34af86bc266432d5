"""Automatic Gradient Descent as an optax gradient transformation."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec

from agd_optax._checks import check_gain, check_same_structure
from agd_optax._layouts import Layout, resolve_layouts
from agd_optax._paths import path_to_keys, path_to_str
from agd_optax._rescale import eta_of, rescaled_step

__all__ = ["AGDState", "agd", "scale_by_agd"]


class AGDState(NamedTuple):
    """State of :func:`scale_by_agd`: only what a user logs, no per-parameter buffers.

    Example:
      >>> import jax.numpy as jnp, optax, agd_optax
      >>> state = agd_optax.agd().init({"dense": {"kernel": jnp.ones((4, 2))}})
      >>> int(optax.tree.get(state, "count")), float(optax.tree.get(state, "eta"))
      (0, 0.0)
    """

    count: jax.Array  # shape=(), int32: number of updates made.
    eta: (
        jax.Array
    )  # shape=(), float32 (float64 for float64 params): step size of the last update, before gain.
    G: jax.Array  # shape=(), same dtype as eta: the last update's G = (1/L) sum_k s(W_k) N_k.


def _accumulation_dtype(tree: Any) -> jnp.dtype:
    """float32, or wider when a leaf is wider: norms and G never accumulate in bf16 or f16."""
    return jnp.result_type(jnp.float32, *(jnp.result_type(x) for x in jax.tree.leaves(tree)))


def _safe_inverse(x: jax.Array) -> jax.Array:
    """1/x where x > 0 and 0 where x == 0: a zero gradient gives a zero update, never NaN."""
    positive = x > 0
    return jnp.where(positive, 1.0 / jnp.where(positive, x, 1.0), 0.0)


def _psum(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
    return jax.lax.psum(x, axes) if axes else x


def _agd_updates(
    grads: list[jax.Array],
    layouts: list[Layout],
    acc: jnp.dtype,
    mesh_axes: list[tuple[tuple[str, ...], ...]] | None = None,
):
    """The AGD step for flat gradient leaves: returns (updates without gain, eta, G).

    Every leaf's squared norms (one per kernel position and stack slice) go into one vector, so
    the scalar work (square roots, safe inverses, G and eta) is a few operations on that vector
    rather than a few per leaf; each leaf then takes its slice of the inverse norms in its one
    elementwise pass. ``mesh_axes`` (inside ``shard_map`` only) gives, per leaf and per array
    axis, the mesh axes that shard it: sums over sharded axes are completed with ``psum``.
    """
    depth = sum(lay.count for lay in layouts)

    def sharding(i: int, axes: tuple[int, ...]) -> tuple[str, ...]:
        if mesh_axes is None:
            return ()
        return tuple(name for a in axes for name in mesh_axes[i][a])

    # Squared Frobenius norms: per spatial position and stack slice for weights (keepdims).
    sq = [
        _psum(
            jnp.sum(jnp.square(g.astype(acc)), axis=lay.reduce_axes, keepdims=True),
            sharding(i, lay.reduce_axes),
        )
        for i, (g, lay) in enumerate(zip(grads, layouts))
    ]
    # A bias is normalised by its owner's whole gradient norm (per stack slice).
    owners = sorted({lay.owner for lay in layouts if lay.kind == "bias"})
    owner_sq = []
    for k in owners:
        whole = jnp.sum(sq[k], axis=layouts[k].spatial_axes, keepdims=True)
        owner_sq.append(_psum(whole, sharding(k, layouts[k].spatial_axes)))
    # Piece i holds leaf i's norms; piece len(sq) + j the whole norm of weight owners[j].
    pieces = sq + owner_sq
    offsets = np.cumsum([0] + [q.size for q in pieces]).tolist()
    segment = [(offsets[k], offsets[k + 1]) for k in range(len(pieces))]
    all_sq = jnp.concatenate([q.ravel() for q in pieces])
    all_norms = jnp.sqrt(all_sq)

    # G = (1/L) sum_k s(W_k) N_k, with N_k the sum of a conv's per-position norms. A NaN or Inf
    # anywhere, biases and norm-layer parameters included (they are not in G), makes G NaN, so
    # every update is NaN rather than one leaf silently carrying it (0 * Inf is NaN).
    if mesh_axes is None:
        weights, others = np.zeros(all_sq.size), np.zeros(all_sq.size)
        for i, lay in enumerate(layouts):
            lo, hi = segment[i]
            if lay.kind == "weight":
                weights[lo:hi] = lay.scale
            else:
                others[lo:hi] = 1.0
        # (The weights' NaN or Inf is in the dot already; summing only the other leaves' squared
        # norms keeps XLA from reducing a convolution's squared gradient a second time.)
        total = jnp.dot(jnp.asarray(weights, acc), all_norms)
        total = total + 0.0 * jnp.dot(jnp.asarray(others, acc), all_sq)
    else:
        total = jnp.zeros([], acc)
        for i, (q, lay) in enumerate(zip(sq, layouts)):
            rest = tuple(a for a in range(q.ndim) if a not in lay.reduce_axes)  # Held elsewhere.
            lo, hi = segment[i]
            part = lay.scale * jnp.sum(all_norms[lo:hi]) if lay.kind == "weight" else 0.0
            total = total + _psum(part + 0.0 * jnp.sum(q), sharding(i, rest))
    total = total + 0.0 * total
    G = total / depth
    eta = eta_of(G)
    all_inv = _safe_inverse(all_norms) * (eta / depth)

    # A squared norm that overflowed (finite gradients from about 1e19 in float32) sends the
    # step through the rescaled computation, which agrees with this one (to rounding) wherever
    # this one does not overflow; the usual step pays no extra pass over the gradients. Each
    # leaf's update is (g * shift) * (s * inverse), the shift 1 here, a power of two there.
    all_axes = (
        () if mesh_axes is None else tuple(sorted({n for m in mesh_axes for a in m for n in a}))
    )
    overflow = jnp.any(jnp.isinf(all_sq))
    if all_axes:  # Every shard takes the same branch, whose collectives they share.
        overflow = jax.lax.pmax(overflow.astype(jnp.int32), all_axes) > 0
    all_shift, all_inv, eta, G = jax.lax.cond(
        overflow,
        lambda gs, *_: rescaled_step(gs, layouts, owners, acc, depth, sharding, all_axes),
        lambda _, *fast: fast,
        grads,
        jnp.ones_like(all_inv),
        all_inv,
        eta,
        G,
    )

    updates = []
    for i, (g, q, lay) in enumerate(zip(grads, sq, layouts)):
        if lay.kind == "bias":
            j = owners.index(lay.owner)
            lo, hi = segment[len(sq) + j]
            stack_dims = tuple(owner_sq[j].shape[a] for a in layouts[lay.owner].stack_axes)
            shape = stack_dims + (1,) * (g.ndim - len(stack_dims))
        else:
            lo, hi = segment[i]
            shape = q.shape
        shift, inv = all_shift[lo:hi].reshape(shape), all_inv[lo:hi].reshape(shape)
        u = (g.astype(acc) * shift) * (lay.scale * inv)
        updates.append(u.astype(g.dtype))
    return updates, eta, G


def _mesh_axes_per_leaf(updates: Any, specs: Any) -> list[tuple[tuple[str, ...], ...]]:
    """Per leaf, per array axis, the mesh axes sharding it, from a (prefix) tree of PartitionSpecs."""
    is_spec = lambda x: isinstance(x, PartitionSpec) or x is None  # noqa: E731
    try:
        full = jax.tree.map(
            lambda spec, sub: jax.tree.map(lambda _: spec, sub), specs, updates, is_leaf=is_spec
        )
    except (ValueError, TypeError) as e:
        raise ValueError(
            f"AGD: param_specs does not match the parameters (a pytree or prefix of PartitionSpecs "
            f"is expected). JAX says: {e}"
        ) from None
    flat_specs = jax.tree.leaves(full, is_leaf=is_spec)
    flat = jax.tree_util.tree_flatten_with_path(updates)[0]
    out = []
    for (path, x), spec in zip(flat, flat_specs):
        spec = () if spec is None else tuple(spec)
        if len(spec) > x.ndim:
            raise ValueError(
                f"AGD: the PartitionSpec {spec} of leaf '{path_to_str(path_to_keys(path))}' has more "
                f"entries than its {x.ndim} axes"
            )
        per_axis = []
        for entry in spec + (None,) * (x.ndim - len(spec)):
            if entry is None:
                per_axis.append(())
            elif isinstance(entry, str):
                per_axis.append((entry,))
            else:
                per_axis.append(tuple(entry))
        out.append(tuple(per_axis))
    return out


def _global_shapes(updates: Any, mesh_axes: list[tuple[tuple[str, ...], ...]]) -> Any:
    """Shape-only stand-ins for the leaves with their global (unsharded) shapes."""
    leaves, treedef = jax.tree.flatten(updates)
    out = []
    for x, axes in zip(leaves, mesh_axes):
        try:
            shape = tuple(
                d * math.prod(jax.lax.axis_size(name) for name in names)
                for d, names in zip(x.shape, axes)
            )
        except NameError as e:
            raise ValueError(
                f"AGD: param_specs names mesh axes, but update() runs where they are not bound "
                f"({e}). param_specs is for update() inside jax.shard_map on parameter shards; "
                "under jit with sharded arrays, or on whole parameters, leave it out"
            ) from None
        out.append(jax.ShapeDtypeStruct(shape, x.dtype))
    return jax.tree.unflatten(treedef, out)


def scale_by_agd(
    *, roles: Any = None, param_specs: Any = None
) -> optax.GradientTransformationExtraArgs:
    r"""Scales gradients by Automatic Gradient Descent's architecture-aware step.

    For L weights :math:`W_k` with gradients :math:`g_k`, scales
    :math:`s_k = \sqrt{d_{out}/d_{in}}` (divided by :math:`\sqrt{k_h k_w}` for a convolution) and
    gradient norms :math:`N_k = \|g_k\|_F` (summed over kernel positions for a convolution),

    .. math::

      G = \frac{1}{L} \sum_k s_k N_k, \qquad
      \eta = \log\frac{1 + \sqrt{1 + 4 G}}{2}, \qquad
      u_k = \frac{\eta}{L} \, s_k \, \frac{g_k}{\|g_k\|_F},

    the normalisation taken per kernel position for a convolution. The output is the descent
    direction times the step, positive: :func:`agd` negates it and applies the gain.

    Beyond the official algorithm, which refuses them:

    * a **bias** moves with the weight :math:`W` of its own module,
      :math:`u_b = (\eta / L)\, s(W)\, g_b / \|g_W\|_F`, and counts neither in L nor in G;
    * the **scale and offset of a normalisation layer** have no owning weight. Each is treated as
      a diagonal weight of its own with :math:`s = 1` (its width in equals its width out), moved by
      :math:`u = (\eta / L)\, g / \|g\|_F`, and, like a bias, counts neither in L nor in G. So its
      largest entry moves by at most :math:`\eta / L` per step: the same relative bound AGD puts on
      every weight's operator norm (a scale starts at 1; an offset adds to unit-RMS activations).
      Keeping them out of L and G leaves the step of the weights what it would be without them.

    A zero gradient gives a zero update (a frozen or unused layer moves nothing, and no NaN or Inf
    appears). A NaN or Inf in any gradient makes G, eta and every update NaN: wrap the optimizer in
    ``optax.apply_if_finite`` to skip such steps. Norms, G and eta are accumulated in float32 (or
    the widest parameter dtype, e.g. float64); updates are returned in each gradient's dtype. Any
    finite gradient gives finite updates: when squaring overflows (float32 gradients from about
    1e19), the norms are taken on gradients rescaled by powers of two, and a G beyond the dtype's
    range is reported as Inf with eta = log(G) / 2 computed from the rescaled sum.

    Depth, scales and axes come from static shapes, so the state is three scalars and nothing is
    recomputed or synchronised with the host at run time.

    Args:
      roles: how each leaf is treated (see :mod:`agd_optax` roles): ``None`` infers every role from
        Flax's naming conventions; otherwise a pytree of roles matching the parameters, a prefix of
        it, or a callable mapping the parameters (``params`` in ``init``; ``params``, or the updates
        when ``params`` is not given, in ``update``) to one. ``agd_optax.nnx_roles(model)`` gives
        the roles of an NNX model, ``agd_optax.trace_roles(fn, params, x)`` those of any model.
      param_specs: only for ``update`` called inside ``jax.shard_map`` on parameter *shards*: the
        ``PartitionSpec`` of each parameter (a pytree or prefix pytree, like shard_map's
        ``in_specs``). AGD then reads each leaf's global shape and completes every norm with a
        ``psum`` over the mesh axes that shard it, so G, eta and the updates equal those of the
        unsharded computation. Not needed under ``jit`` with sharded arrays (XLA inserts the
        reductions), nor under ``pmap``/``shard_map`` with replicated parameters once the
        gradients are averaged (``lax.pmean``). ``init`` takes the global parameters.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is :class:`AGDState`.

    Raises:
      agd_optax.RoleError: at ``init`` or ``update``, naming the leaf, for a leaf whose role
        cannot be decided, a roles tree that does not match, or a bias without a weight.
      TypeError: naming the leaf, for integer, boolean or complex leaves.
      ValueError: for empty leaves; ``params`` whose structure or leaf shapes differ from the
        updates (naming the leaf); ``param_specs`` used where its mesh axes are not bound
        (outside ``shard_map``).

    Example:
      >>> import jax.numpy as jnp, optax, agd_optax
      >>> params = {"dense": {"kernel": jnp.ones((4, 2))}}
      >>> tx = agd_optax.scale_by_agd()
      >>> state = tx.init(params)
      >>> grads = {"dense": {"kernel": jnp.full((4, 2), 0.5)}}
      >>> updates, state = tx.update(grads, state, params)
      >>> print(f"{float(state.G):.4f} {float(state.eta):.4f}")
      1.0000 0.4812

    References:
      Bernstein, Mingard, Huang, Azizan and Yue, `Automatic Gradient Descent: Deep Learning without
      Hyperparameters <https://arxiv.org/abs/2304.05187>`_, 2023.
    """

    def roles_for(tree: Any) -> Any:
        return roles(tree) if callable(roles) else roles

    def init_fn(params):
        # Fail at init, naming the leaf, not later. A tree with no leaves (the placeholder
        # optax.tree.map_params initialises with) has nothing to check; update refuses it.
        if jax.tree.leaves(params):
            resolve_layouts(params, roles_for(params))
        acc = _accumulation_dtype(params)
        return AGDState(
            count=jnp.zeros([], jnp.int32), eta=jnp.zeros([], acc), G=jnp.zeros([], acc)
        )

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        if params is not None:
            check_same_structure(updates, params)
        mesh_axes = None if param_specs is None else _mesh_axes_per_leaf(updates, param_specs)
        shapes = updates if mesh_axes is None else _global_shapes(updates, mesh_axes)
        layouts = resolve_layouts(shapes, roles_for(shapes if params is None else params))
        leaves, treedef = jax.tree.flatten(updates)
        acc = jnp.result_type(state.eta.dtype, _accumulation_dtype(updates))
        new_leaves, eta, G = _agd_updates(leaves, layouts, acc, mesh_axes)
        new_state = AGDState(
            count=optax.safe_int32_increment(state.count),
            eta=eta.astype(state.eta.dtype),
            G=G.astype(state.G.dtype),
        )
        return jax.tree.unflatten(treedef, new_leaves), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def agd(
    gain: optax.ScalarOrSchedule = 1.0, *, roles: Any = None, param_specs: Any = None
) -> optax.GradientTransformationExtraArgs:
    r"""Automatic Gradient Descent: deep learning without a learning rate.

    Every weight moves by ``-gain * (eta / L) * s(W) * g / ||g||_F`` where the step ``eta`` is
    computed on each step from the gradient norms and the architecture (fan-in, fan-out and depth
    L), as described in :func:`scale_by_agd`. There is no learning rate and no schedule.

    Args:
      gain: multiplies every update; 1.0 is the algorithm as published. The official code offers
        it as an accelerator (10.0 trained faster in the paper's experiments). A float or an optax
        schedule of the step count; works with ``optax.inject_hyperparams``.
      roles: per-leaf roles, see :func:`scale_by_agd`; ``None`` infers them from Flax's names.
      param_specs: for ``update`` inside ``jax.shard_map`` on parameter shards, see
        :func:`scale_by_agd`.

    Returns:
      An ``optax.GradientTransformationExtraArgs``. ``optax.tree.get(state, "eta")`` reads the
      automatic step size of the last update (before gain); ``"G"`` and ``"count"`` likewise.

    Raises:
      ValueError: for a constant gain that is not finite and above 0; TypeError for one that is
        not a number. Otherwise as :func:`scale_by_agd`.

    Example:
      >>> import jax, jax.numpy as jnp, optax, agd_optax
      >>> from flax import nnx
      >>> model = nnx.Sequential(
      ...     nnx.Linear(2, 16, use_bias=False, rngs=nnx.Rngs(0)), nnx.relu,
      ...     nnx.Linear(16, 1, use_bias=False, rngs=nnx.Rngs(1)))
      >>> optimizer = nnx.Optimizer(model, agd_optax.agd(), wrt=nnx.Param)
      >>> x = jax.random.normal(jax.random.key(0), (32, 2)); y = x[:, :1] * x[:, 1:]
      >>> loss_fn = lambda m: jnp.mean((m(x) - y) ** 2)
      >>> @nnx.jit
      ... def train_step(model, optimizer):
      ...   optimizer.update(model, nnx.grad(loss_fn)(model))
      >>> first = loss_fn(model)
      >>> for _ in range(20):
      ...   train_step(model, optimizer)
      >>> bool(loss_fn(model) < first)
      True

    References:
      Bernstein, Mingard, Huang, Azizan and Yue, `Automatic Gradient Descent: Deep Learning without
      Hyperparameters <https://arxiv.org/abs/2304.05187>`_, 2023.
    """
    check_gain(gain)
    return optax.chain(
        scale_by_agd(roles=roles, param_specs=param_specs), optax.scale_by_learning_rate(gain)
    )
