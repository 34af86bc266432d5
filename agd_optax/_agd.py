"""Automatic Gradient Descent as an optax gradient transformation."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from agd_optax._checks import check_gain
from agd_optax._step import agd_step, check_init, prepare

__all__ = ["AGDState", "agd", "scale_by_agd"]


class AGDState(NamedTuple):
    """State of :func:`scale_by_agd`: only what a user logs, no per-parameter buffers.

    Example:
      >>> import jax.numpy as jnp, optax, agd_optax
      >>> state = agd_optax.agd().init({"dense": {"kernel": jnp.ones((4, 2))}})
      >>> int(optax.tree.get(state, "count")), float(optax.tree.get(state, "eta"))
      (0, 0.0)
    """

    count: jax.Array  # type: ignore[assignment]  # shape=(), int32: updates made (shadows tuple.count).
    eta: (
        jax.Array
    )  # shape=(), float32 (float64 for float64 params): step size of the last update, before gain.
    G: jax.Array  # shape=(), same dtype as eta: the last update's G = (1/L) sum_k s(W_k) N_k.


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
    finite, non-zero gradient moves its layer by this step, from the smallest normal numbers to
    the largest: when a squared norm overflows (float32 gradients from about 1e19) or underflows
    (gradients below about 1e-19), the norms are taken again on gradients rescaled by powers of
    two (one more pass for the whole tree, made only then); eta is formed without cancellation, so a
    tiny G gives eta = G rather than 0; and a G beyond the dtype's range is reported as Inf with
    eta = log(G) / 2 computed from the rescaled sum.

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

    def init_fn(params):
        acc = check_init(params, roles)
        return AGDState(
            count=jnp.zeros([], jnp.int32), eta=jnp.zeros([], acc), G=jnp.zeros([], acc)
        )

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        step = prepare(updates, params, roles, param_specs, state.eta.dtype)
        new_leaves, eta, G = agd_step(step.leaves, step.plan, step.acc)
        new_state = AGDState(
            count=optax.safe_int32_increment(state.count),
            eta=eta.astype(state.eta.dtype),
            G=G.astype(state.G.dtype),
        )
        return jax.tree.unflatten(step.treedef, new_leaves), new_state

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
