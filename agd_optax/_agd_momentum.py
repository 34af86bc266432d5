"""AGD with momentum: AGD's per-layer direction taken from a running average of the gradients."""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from agd_optax._checks import check_gain
from agd_optax._plan import Plan
from agd_optax._step import check_init, measure, normalise, prepare

__all__ = ["AGDMomentumState", "agd_momentum", "scale_by_agd_momentum"]

MOMENTUM = 0.9  # Fixed once, on the calibration workloads (docs/agd_variants.md); not a setting.


class AGDMomentumState(NamedTuple):
    """State of :func:`scale_by_agd_momentum`: one buffer the size of the parameters, and what a
    user logs.

    Example:
      >>> import jax.numpy as jnp, optax, agd_optax
      >>> params = {"dense": {"kernel": jnp.ones((4, 2))}}
      >>> state = agd_optax.scale_by_agd_momentum().init(params)
      >>> state.momentum["dense"]["kernel"].shape, int(optax.tree.get(state, "count"))
      ((4, 2), 0)
    """

    count: jax.Array  # type: ignore[assignment]  # shape=(), int32: updates made (shadows tuple.count).
    eta: jax.Array  # shape=(), float32 (float64 for float64 params): the last step, before gain.
    G: jax.Array  # shape=(), same dtype as eta: the last gradient's G = (1/L) sum_k s(W_k) N_k.
    momentum: Any  # Same tree, shapes and dtypes as the parameters: the running average m.


@functools.partial(jax.jit, static_argnames=("plan", "acc"))
def _momentum_step(grads, momentum, decay, plan: Plan, acc):
    """(updates without gain, the new average, eta, G): eta and G from the gradient's norms,
    each leaf's direction from the average's."""
    weights: dict[tuple, tuple[jax.Array, ...]] = {}  # Broadcast once per shape.
    average = []
    for m, g in zip(momentum, grads):
        if m.shape not in weights:
            weights[m.shape] = tuple(
                lax.broadcast_in_dim(jnp.asarray(d, acc), m.shape, ()) for d in decay
            )
        old, new = weights[m.shape]
        m_acc, g_acc = (lax.convert_element_type(x, acc) for x in (m, g))
        mixed = lax.add(lax.mul(old, m_acc), lax.mul(new, g_acc))
        average.append(lax.convert_element_type(mixed, m.dtype))
    norms = measure(average, plan, acc, step_leaves=grads)
    return normalise(average, norms, norms.eta, plan, acc), average, norms.eta, norms.G


def scale_by_agd_momentum(
    *, momentum: float = MOMENTUM, roles: Any = None, param_specs: Any = None
) -> optax.GradientTransformationExtraArgs:
    r"""AGD's step along a running average of the gradients instead of the gradient itself.

    With the gradients :math:`g_k` of the L weights, their AGD quantities :math:`G` and
    :math:`\eta` exactly as in :func:`agd_optax.scale_by_agd`, and the running average
    :math:`m_k \leftarrow \beta\, m_k + (1 - \beta)\, g_k` (:math:`m_k = 0` at the start,
    :math:`\beta = 0.9`),

    .. math::

      u_k = \frac{\eta}{L} \, s_k \, \frac{m_k}{\|m_k\|_F},

    normalised per kernel position for a convolution, biases by their weight's :math:`\|m_W\|`
    and normalisation-layer parameters by their own, as :func:`agd_optax.scale_by_agd` does with
    the gradient. The step :math:`\eta` still comes from the *gradient's* norms, so every weight
    moves by exactly AGD's amount; only the direction is averaged over recent steps. The first
    update equals AGD's (:math:`m_1` is a multiple of :math:`g_1`).

    The output is the descent direction times the step, positive: :func:`agd_momentum` negates
    it and applies the gain. A NaN or Inf in any gradient makes :math:`\eta` and every update NaN,
    as in AGD, and enters the average: wrap the optimizer in ``optax.apply_if_finite`` to skip
    such steps (it keeps the state of the last finite step).

    State: the average :math:`m`, one array per parameter in the parameter's shape and dtype
    (so 4 bytes per float32 parameter, 2 per bfloat16 one), and three scalars (``count``,
    ``eta``, ``G``). Norms, G and eta accumulate in float32 or wider.

    Args:
      momentum: :math:`\beta`. 0.9 is the value every published result of this optimizer uses;
        it was fixed once on two calibration workloads and is not meant to be tuned.
      roles: how each leaf is treated, as for :func:`agd_optax.scale_by_agd`.
      param_specs: for ``update`` inside ``jax.shard_map`` on parameter shards, as for
        :func:`agd_optax.scale_by_agd`.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is :class:`AGDMomentumState`.

    Raises:
      ValueError: for ``momentum`` outside [0, 1), and as :func:`agd_optax.scale_by_agd` does.
      agd_optax.RoleError: as :func:`agd_optax.scale_by_agd` does, naming the leaf.

    Example:
      >>> import jax.numpy as jnp, agd_optax
      >>> params = {"dense": {"kernel": jnp.ones((4, 2))}}
      >>> tx = agd_optax.scale_by_agd_momentum()
      >>> state = tx.init(params)
      >>> grads = {"dense": {"kernel": jnp.full((4, 2), 0.5)}}
      >>> updates, state = tx.update(grads, state, params)
      >>> print(f"{float(state.G):.4f} {float(state.eta):.4f}")
      1.0000 0.4812
      >>> print(state.momentum["dense"]["kernel"][0])
      [0.05 0.05]

    References:
      Bernstein, Mingard, Huang, Azizan and Yue, `Automatic Gradient Descent: Deep Learning without
      Hyperparameters <https://arxiv.org/abs/2304.05187>`_, 2023.
    """
    if isinstance(momentum, bool) or not isinstance(momentum, int | float | jax.Array):
        raise ValueError(f"agd_momentum: momentum must be a float in [0, 1), got {momentum!r}")
    if isinstance(momentum, int | float) and not 0.0 <= momentum < 1.0:
        raise ValueError(f"agd_momentum: momentum must be in [0, 1), got {momentum!r}")

    def init_fn(params):
        acc = check_init(params, roles)
        return AGDMomentumState(
            count=jnp.zeros([], jnp.int32),
            eta=jnp.zeros([], acc),
            G=jnp.zeros([], acc),
            momentum=jax.tree.map(jnp.zeros_like, params),
        )

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        step = prepare(updates, params, roles, param_specs, state.eta.dtype)
        decay = (momentum, 1.0 - momentum)
        new_updates, average, eta, G = _momentum_step(
            step.leaves, step.treedef.flatten_up_to(state.momentum), decay, step.plan, step.acc
        )
        new_state = AGDMomentumState(
            count=optax.safe_int32_increment(state.count),
            eta=eta.astype(state.eta.dtype),
            G=G.astype(state.G.dtype),
            momentum=jax.tree.unflatten(step.treedef, average),
        )
        return jax.tree.unflatten(step.treedef, new_updates), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def agd_momentum(
    gain: optax.ScalarOrSchedule = 1.0,
    *,
    momentum: float = MOMENTUM,
    roles: Any = None,
    param_specs: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""AGD with momentum: no learning rate, AGD's step along an average of recent gradients.

    Every weight moves by ``-gain * (eta / L) * s(W) * m / ||m||_F``, with ``eta``, ``L`` and
    ``s(W)`` those of :func:`agd_optax.agd` (from the current gradient and the architecture) and
    ``m`` the running average ``0.9 m + 0.1 g`` of the gradients (see
    :func:`scale_by_agd_momentum`). Same roles, initialisation and sharding as :func:`agd`; one
    extra buffer the size of the parameters.

    Args:
      gain: multiplies every update, 1.0 by default (and in every published result); a float or
        an optax schedule of the step count; works with ``optax.inject_hyperparams``.
      momentum: the averaging constant, 0.9; fixed, not a setting to tune.
      roles: per-leaf roles, see :func:`agd_optax.scale_by_agd`.
      param_specs: for ``update`` inside ``jax.shard_map`` on parameter shards, see
        :func:`agd_optax.scale_by_agd`.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``optax.tree.get(state, "eta")`` reads the
      last step (before gain), ``"G"``, ``"count"`` and ``"momentum"`` likewise.

    Raises:
      ValueError: for a constant gain that is not finite and above 0 (TypeError for one that is
        not a number), or a momentum outside [0, 1). Otherwise as :func:`scale_by_agd_momentum`.

    Example:
      >>> import jax, jax.numpy as jnp, optax, agd_optax
      >>> from flax import nnx
      >>> model = nnx.Sequential(
      ...     nnx.Linear(2, 16, use_bias=False, rngs=nnx.Rngs(0)), nnx.relu,
      ...     nnx.Linear(16, 1, use_bias=False, rngs=nnx.Rngs(1)))
      >>> optimizer = nnx.Optimizer(model, agd_optax.agd_momentum(), wrt=nnx.Param)
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
        scale_by_agd_momentum(momentum=momentum, roles=roles, param_specs=param_specs),
        optax.scale_by_learning_rate(gain),
    )
