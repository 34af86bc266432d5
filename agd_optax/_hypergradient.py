"""Hypergradient descent: an optimizer's hyperparameters learned online, in towers of any height."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from agd_optax._step import accumulation_dtype

__all__ = [
    "HypergradientState",
    "hypergradient",
]

# hypergradient_tower's default steps, chosen by the rule in docs/hypergradient.md ("The tower's
# default steps"): the largest candidates with which no tower of height 1 to 3 blows up on optax's
# test problems.
HYPER_LEARNING_RATE = 1e-5
META_LEARNING_RATE = 1e-2


class HypergradientState(NamedTuple):
    """State of :func:`hypergradient`.

    Example:
      >>> import jax.numpy as jnp, optax, agd_optax
      >>> tx = agd_optax.hypergradient(optax.sgd, optax.sgd(1e-3), learning_rate=0.01)
      >>> state = tx.init(jnp.zeros(3))
      >>> f"{state.hyperparams['learning_rate']:.2f}", len(state.tangents), state.tangents[0].shape
      ('0.01', 1, (3,))
    """

    hyperparams: dict[str, jax.Array]  # name -> shape=(), float32 (or the widest param dtype):
    # the values the last update used.
    raw: tuple[jax.Array, ...]  # shape=() each, same dtype, in sorted-name order: the
    # unconstrained coordinates the hyper-optimizer updates (hyperparams = constraint(raw)).
    tangents: tuple[Any, ...]  # one params-shaped tree per entry of raw, in the updates' dtypes
    # and shardings: d(last update)/d(raw[k]), the previous update's tangent per hyperparameter.
    base_state: Any  # the base optimizer's state.
    hyper_state: Any  # the hyper-optimizer's state (a HypergradientState in a tower).


class _Constraint(NamedTuple):
    to_value: Callable[[jax.Array, Any], jax.Array]  # (raw, initial value) -> value
    to_raw: Callable[[Any], Any]  # initial value -> raw (a float for a float, else an array)
    valid: Callable[[float], bool]
    domain: str


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _log(v):
    return math.log(v) if _is_number(v) else jnp.log(v)


def _atanh(v):
    return math.atanh(v) if _is_number(v) else jnp.arctanh(v)


def _positive(v: float) -> bool:
    return v > 0 and math.isfinite(v)


# How each hyperparameter's value is made from the unconstrained coordinate the hyper-optimizer
# moves. "squash" is the authors' clamp for Adam's betas: (tanh(r) + 1) / 2, i.e. sigmoid(2 r).
# Initial values are Python numbers (exact in float64) or, under optax.inject_hyperparams, arrays.
_CONSTRAINTS = {
    "identity": _Constraint(lambda r, v0: r, lambda v: v, math.isfinite, "a finite number"),
    "exp": _Constraint(lambda r, v0: jnp.exp(r), _log, _positive, "positive"),
    "softplus": _Constraint(
        lambda r, v0: v0 * jax.nn.softplus(r / v0),  # tau = v0, the initial value.
        lambda v: v * math.log(math.expm1(1.0)),
        _positive,
        "positive",
    ),
    "squash": _Constraint(
        lambda r, v0: (jnp.tanh(r) + 1.0) / 2.0,
        lambda v: _atanh(2.0 * v - 1.0),
        lambda v: 0.0 < v < 1.0,
        "in (0, 1)",
    ),
}
# Averaging coefficients (momentum, Adam's betas, decay rates) live in (0, 1).
_UNIT_INTERVAL_NAMES = frozenset({"b1", "b2", "beta1", "beta2", "momentum", "decay", "b3"})


def _default_constraint(name: str) -> str:
    return "squash" if name in _UNIT_INTERVAL_NAMES else "softplus"


def _acceptable(value: Any, valid: Callable[[float], bool]) -> bool:
    """A Python number or a real scalar array (``optax.inject_hyperparams`` passes arrays) in the
    valid range; a traced array cannot be checked and is taken as it comes."""
    if _is_number(value):
        return valid(float(value))
    if not isinstance(value, jax.Array | np.ndarray) or np.ndim(value) != 0:
        return False
    real = (jnp.floating, jnp.integer)
    if not any(jnp.issubdtype(value.dtype, kind) for kind in real):
        return False
    try:
        return valid(float(value))
    except jax.errors.ConcretizationTypeError:
        return True


def _unpack(hyperparams: dict[str, Any]) -> dict[str, Any]:
    """``**hyperparams`` as given, or the one dict ``optax.inject_hyperparams`` passes for them (it
    binds the signature, so they arrive as ``hyperparams={...}``)."""
    if set(hyperparams) == {"hyperparams"} and isinstance(hyperparams["hyperparams"], Mapping):
        return dict(hyperparams["hyperparams"])
    return dict(hyperparams)


def _check_base(base: Any) -> None:
    if isinstance(base, optax.GradientTransformation) or not callable(base):
        raise TypeError(
            "hypergradient: base must be a function of the hyperparameters returning an optax "
            f"transformation (optax.sgd, not optax.sgd(0.1)), got {type(base).__name__}. Under "
            "optax.inject_hyperparams, which reads a function argument as a schedule, pass "
            "static_args=('base',)"
        )


def _constraint_kinds(
    names: tuple[str, ...], values: Mapping[str, Any], constraints: Mapping[str, str] | None
) -> dict[str, str]:
    """Each hyperparameter's constraint, after checking it and the initial value against it."""
    if not names:
        raise ValueError("hypergradient: give the initial value of at least one hyperparameter")
    constraints = dict(constraints or {})
    unknown = sorted(set(constraints) - set(names))
    if unknown:
        raise ValueError(
            f"hypergradient: constraints given for {unknown}, which are not among the "
            f"hyperparameters {list(names)}"
        )
    kinds = {n: constraints.get(n, _default_constraint(n)) for n in names}
    for n, kind in kinds.items():
        if kind not in _CONSTRAINTS:
            raise ValueError(
                f"hypergradient: constraint {kind!r} of {n!r} is not one of {sorted(_CONSTRAINTS)}"
            )
        if not _acceptable(values[n], _CONSTRAINTS[kind].valid):
            raise ValueError(
                f"hypergradient: the initial {n}={values[n]!r} must be a number "
                f"{_CONSTRAINTS[kind].domain} (constraint {kind!r}); pass constraints={{{n!r}: ...}} "
                "to change the range"
            )
    return kinds


def _set_injected(base_state: Any, values: Mapping[str, jax.Array]) -> Any:
    """Writes the values into every ``inject_hyperparams`` state of the base optimizer: its update
    reads its hyperparameters from its state, not from the factory's arguments."""

    def is_injected(x):
        return isinstance(x, tuple) and isinstance(getattr(x, "hyperparams", None), dict)

    def replace(x):
        if not is_injected(x):
            return x
        hp = dict(x.hyperparams)
        for name, v in values.items():
            if name in hp:
                hp[name] = v.astype(jnp.result_type(hp[name]))
        return x._replace(hyperparams=hp)

    return jax.tree.map(replace, base_state, is_leaf=is_injected)


def _hypergradient_of(grads: Any, tangents: tuple[Any, ...], acc: jnp.dtype) -> list[jax.Array]:
    """Per hyperparameter, the gradient dotted with the tangent of the update that led here."""
    out = []
    for tangent in tangents:
        dots = jax.tree.leaves(
            jax.tree.map(lambda g, t: jnp.sum(g.astype(acc) * t.astype(acc)), grads, tangent)
        )
        out.append(functools.reduce(jnp.add, dots) if dots else jnp.zeros([], acc))
    return out


def _update_and_tangents(base_update: Callable, raw: tuple[jax.Array, ...]):
    """``base_update(raw)`` (updates, new base state) and its derivative along each coordinate of
    raw: one ``jax.jvp`` per coordinate, vmapped, the primal computed once. The stacked tangents
    are split into one params-shaped tree each (the shape and sharding of ``init``'s zeros)."""
    k = len(raw)
    basis = tuple(jnp.eye(k, dtype=raw[0].dtype)[:, i] for i in range(k))
    jvp = lambda v: jax.jvp(base_update, (raw,), (v,), has_aux=True)  # noqa: E731
    updates, stacked, new_base_state = jax.vmap(jvp, out_axes=(None, 0, None))(basis)
    tangents = tuple(jax.tree.map(lambda t, i=i: t[i], stacked) for i in range(k))
    return updates, tangents, new_base_state


class _Hyper(NamedTuple):
    """What :func:`hypergradient` fixed at construction: names, constraints, initial values."""

    names: tuple[str, ...]
    kinds: dict[str, str]
    initial: dict[str, Any]
    base: Callable[..., optax.GradientTransformation]

    def raw0(self) -> tuple[Any, ...]:
        return tuple(_CONSTRAINTS[self.kinds[n]].to_raw(self.initial[n]) for n in self.names)

    def values(self, raw: tuple[jax.Array, ...]) -> dict[str, jax.Array]:
        return {
            n: _CONSTRAINTS[self.kinds[n]].to_value(r, self.initial[n])
            for n, r in zip(self.names, raw)
        }

    def make_base(self, values: Mapping[str, jax.Array]) -> optax.GradientTransformationExtraArgs:
        try:
            return optax.with_extra_args_support(self.base(**values))
        except jax.errors.ConcretizationTypeError as e:
            raise TypeError(
                f"hypergradient: the base optimizer factory cannot take the hyperparameters "
                f"{list(self.names)} as traced JAX arrays (it converts one to a Python value). "
                f"JAX says: {e}"
            ) from None


def _base_update(hyper: _Hyper, grads, base_state, params, extra_args, raw):
    """The base optimizer's update with the hyperparameters made from ``raw``, in the gradients'
    dtypes and with the base state's dtypes (learned values are float32 arrays, not weakly typed
    Python floats: bf16 momentum stays bf16)."""
    values = hyper.values(raw)
    injected = _set_injected(base_state, values)
    out, new_state = hyper.make_base(values).update(grads, injected, params, **extra_args)
    out = jax.tree.map(lambda u, g: u.astype(jnp.result_type(g)), out, grads)
    new_state = jax.tree.map(lambda x, x0: x.astype(jnp.result_type(x0)), new_state, base_state)
    return out, new_state


def _init(hyper: _Hyper, hyper_opt: optax.GradientTransformation, params) -> HypergradientState:
    acc = accumulation_dtype(params)
    raw = tuple(jnp.asarray(r, acc) for r in hyper.raw0())
    values = hyper.values(raw)
    return HypergradientState(
        hyperparams=values,
        raw=raw,
        tangents=tuple(jax.tree.map(jnp.zeros_like, params) for _ in raw),
        base_state=hyper.make_base(values).init(params),
        hyper_state=hyper_opt.init(raw),
    )


def _update(hyper: _Hyper, hyper_opt, grads, state: HypergradientState, params, extra_args):
    # 1. The hypergradient: the gradient at the current parameters dotted with the tangents of
    #    the update that brought them here.
    acc = jnp.result_type(state.raw[0].dtype, accumulation_dtype(grads))
    h = tuple(
        x.astype(r.dtype) for x, r in zip(_hypergradient_of(grads, state.tangents, acc), state.raw)
    )
    # 2. The hyper-optimizer moves the unconstrained coordinates.
    hyper_updates, hyper_state = hyper_opt.update(h, state.hyper_state, state.raw)
    raw = optax.apply_updates(state.raw, hyper_updates)
    raw = tuple(r.astype(r0.dtype) for r, r0 in zip(raw, state.raw))
    # 3. The base update with the new hyperparameters, and its tangent per hyperparameter.
    base_update = functools.partial(
        _base_update, hyper, grads, state.base_state, params, extra_args
    )
    updates, tangents, base_state = _update_and_tangents(base_update, raw)
    return updates, HypergradientState(hyper.values(raw), raw, tangents, base_state, hyper_state)


def hypergradient(
    base: Callable[..., optax.GradientTransformation],
    hyper_opt: optax.GradientTransformation,
    *,
    constraints: Mapping[str, str] | None = None,
    **hyperparams: float,
) -> optax.GradientTransformationExtraArgs:
    r"""Learns an optimizer's hyperparameters online by gradient descent on the training loss.

    ``base`` is a function of hyperparameters returning an optax transformation (``optax.sgd``,
    ``lambda learning_rate, b1, b2: optax.adam(learning_rate, b1, b2, eps_root=1e-16)``, an
    ``optax.inject_hyperparams(...)`` factory, or a :func:`hypergradient` itself); ``hyperparams``
    gives their initial values by name. With :math:`\theta = c(r)` the hyperparameters made from
    unconstrained coordinates :math:`r`, :math:`u_t(r)` the base update and :math:`g_t` the gradient
    at :math:`w_t = w_{t-1} + u_{t-1}`, each step

    .. math::

      h_t = \frac{\partial f(w_t)}{\partial r} = g_t \cdot \frac{\partial u_{t-1}}{\partial r},
      \qquad r_t = r_{t-1} + \mathrm{hyper\_opt}(h_t), \qquad
      u_t = \mathrm{base}(c(r_t)).\mathrm{update}(g_t, s_{t-1}),

    the hypergradient first and the base update with the new hyperparameters second, as in
    Chandra et al.'s implementation. :math:`\partial u_t / \partial r` is computed by
    ``jax.jvp`` of the base update (one tangent per hyperparameter, the previous base state held
    constant, i.e. the dependence through earlier steps is dropped, as in the paper) and kept in
    the state for the next step: nothing is derived by hand, so any base optimizer works.

    For plain SGD, :math:`u_{t-1} = -\alpha g_{t-1}` and :math:`h_t = -g_t \cdot g_{t-1}` with
    respect to :math:`\alpha` (hypergradient descent, Baydin et al. 2018).

    Each hyperparameter stays in its valid range by construction (``constraints``):

    * ``"softplus"`` (the default for every name but the ones below, e.g. step sizes):
      :math:`\theta = \tau \log(1 + e^{r/\tau})` with :math:`\tau` the initial value. Above
      :math:`\tau` it is nearly the identity, so the hyper-optimizer's step adds to the step size
      as in the authors' SGD (where it is unconstrained); below it the moves shrink with
      :math:`\theta`, which stays positive;
    * ``"squash"`` (the default for ``b1``, ``b2``, ``beta1``, ``beta2``, ``b3``, ``momentum``,
      ``decay``): :math:`\theta = (\tanh r + 1)/2 \in (0, 1)`, the clamp the authors apply to
      Adam's betas;
    * ``"exp"``: :math:`\theta = e^r`, positive, moved on the log scale (relative steps; the
      levels of :func:`hypergradient_tower` above the first);
    * ``"identity"``: :math:`\theta = r`, unconstrained (the authors' choice for SGD's step size).

    **Towers.** ``hyper_opt`` may itself be a :func:`hypergradient`: it then learns its own
    hyperparameters (e.g. the hyper-step size) from the hypergradient of the level below, to any
    height; the top is a plain optax transformation with a small fixed step. Its ``params`` are
    the unconstrained coordinates :math:`r`. See :func:`hypergradient_tower`.

    The tangents must be finite where the update is: a base whose update takes a square root of
    a quantity that can be exactly zero (Adam's second moment where a gradient is always zero,
    with optax's default ``eps_root=0``) has an infinite derivative there and gives NaN
    hyperparameters; give such bases a tiny ``eps_root`` (1e-16).

    Memory: the base state, plus one params-shaped tangent per learned hyperparameter (in the
    updates' dtype and sharding), plus a few scalars and the hyper-optimizer's state. Learning
    SGD's step size costs one extra copy of the parameters; learning Adam's step size and betas,
    three. ``optax.tree.map_params`` maps every tangent like the parameters.

    With ``optax.inject_hyperparams``: pass ``static_args=("base",)`` (it would read the function
    ``base`` as a schedule); the initial values stay fixed settings (they are learned, not
    injected), and may be arrays.

    Args:
      base: a function of the hyperparameters, by keyword, returning an optax transformation. It
        must accept JAX arrays (it is called under tracing) and its state's structure must not
        depend on their values. Hyperparameters of an ``optax.inject_hyperparams`` state are
        overwritten with the learned values before each base update.
      hyper_opt: the optax transformation updating the unconstrained coordinates from their
        hypergradients, e.g. ``optax.sgd(1e-5)``; or a :func:`hypergradient` for a taller tower.
      constraints: optional, hyperparameter name -> ``"softplus"``, ``"squash"``, ``"exp"`` or
        ``"identity"``, overriding the defaults above.
      **hyperparams: the initial value of every hyperparameter to learn (a Python number or a
        scalar array), by the name ``base`` takes it by. At least one.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is :class:`HypergradientState`
      (extra arguments go to the base optimizer). ``optax.tree.get(state, "learning_rate")``
      reads the learned value (in a tower whose levels share a name, use
      :func:`learned_hyperparams`).

    Raises:
      ValueError: for no hyperparameters, an unknown constraint, or an initial value outside
        its constraint's range, naming the hyperparameter.
      TypeError: for a ``base`` that is not a function (an optax transformation, as
        ``optax.inject_hyperparams`` makes of it without ``static_args``); naming the
        hyperparameters, when ``base`` cannot take traced hyperparameters.

    Example:
      >>> import jax, jax.numpy as jnp, optax, agd_optax
      >>> loss = lambda w: 0.5 * jnp.sum(jnp.array([1.0, 10.0]) * w**2)
      >>> tx = agd_optax.hypergradient(optax.sgd, optax.sgd(1e-3), learning_rate=0.01)
      >>> w = jnp.array([1.0, 1.0]); state = tx.init(w)
      >>> for _ in range(50):
      ...   updates, state = tx.update(jax.grad(loss)(w), state, w)
      ...   w = optax.apply_updates(w, updates)
      >>> bool(optax.tree.get(state, "learning_rate") > 0.05), bool(loss(w) < 1e-3)
      (True, True)

      (Plain SGD at 0.01 leaves a loss of 0.18 after the same 50 steps.)

    References:
      Chandra, Xie, Ragan-Kelley and Meijer, `Gradient Descent: The Ultimate Optimizer
      <https://arxiv.org/abs/1909.13371>`_, NeurIPS 2022.

      Baydin, Cornish, Martinez Rubio, Schmidt and Wood, `Online Learning Rate Adaptation with
      Hypergradient Descent <https://arxiv.org/abs/1703.04782>`_, ICLR 2018.
    """
    _check_base(base)
    initial = _unpack(hyperparams)
    names = tuple(sorted(initial))
    hyper = _Hyper(names, _constraint_kinds(names, initial, constraints), initial, base)

    def init_fn(params):
        return _init(hyper, hyper_opt, params)

    def update_fn(updates, state, params=None, **extra_args):
        return _update(hyper, hyper_opt, updates, state, params, extra_args)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
