"""Towers of hypergradient descent (Chandra et al.'s "Gradient descent: the ultimate optimizer"):
``hypergradient_tower`` stacks ``hypergradient`` levels; ``learned_hyperparams`` reads them."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["hypergradient_tower", "learned_hyperparams"]

import jax
import optax

from agd_optax._hypergradient import (
    HYPER_LEARNING_RATE,
    META_LEARNING_RATE,
    HypergradientState,
    _acceptable,
    _positive,
    _unpack,
    hypergradient,
)


def _check_tower_args(height: Any, steps: Mapping[str, Any]) -> None:
    if not isinstance(height, int) or isinstance(height, bool) or height < 0:
        raise ValueError(
            f"hypergradient_tower: height must be a Python int >= 0 (it fixes the tower's "
            f"structure), got {height!r}. Under optax.inject_hyperparams, pass "
            "static_args=('base', 'height')"
        )
    for name, step in steps.items():
        if not _acceptable(step, _positive):
            raise ValueError(
                f"hypergradient_tower: {name} must be a positive number or scalar array, "
                f"got {step!r}"
            )


def hypergradient_tower(
    base: Callable[..., optax.GradientTransformation],
    height: int,
    *,
    hyper_learning_rate: float = HYPER_LEARNING_RATE,
    meta_learning_rate: float = META_LEARNING_RATE,
    constraints: Mapping[str, str] | None = None,
    **hyperparams: float,
) -> optax.GradientTransformation:
    r"""A tower of :func:`hypergradient` levels over ``base``, each level SGD on the one below.

    * ``height`` 0: ``base(**hyperparams)``, nothing learned;
    * level 1 moves the base's hyperparameters with SGD of step ``hyper_learning_rate``: fixed
      when ``height`` is 1, learned from its initial value otherwise;
    * every level above moves the log of the step size below it (constraint ``"exp"``: it stays
      positive, and its step is relative, so one value suits every level) with SGD of step
      ``meta_learning_rate``, learned except at the top, which is fixed.

    So height 2 is ``hypergradient(base, hypergradient(optax.sgd, optax.sgd(meta),
    learning_rate=hyper))`` and each further level inserts one more learned SGD below the top.
    Level k's step size is named ``learning_rate_level{k}`` in the state, so that
    ``optax.tree.get(state, "learning_rate")`` reads the base's and
    ``optax.tree.get(state, "learning_rate_level1")`` the first hyper level's.

    The defaults of the two steps were chosen by a rule written down before the runs
    (docs/hypergradient.md, "The tower's default steps"): the largest candidates with which no
    tower of height 1 to 3 blows up on optax's own test problems.

    With ``optax.inject_hyperparams``: pass ``static_args=("base", "height")``; the two steps are
    then injected (arrays in the state, changeable between steps: the top's fixed step follows).

    Args:
      base: a function of the hyperparameters returning an optax transformation.
      height: the number of learning levels above ``base``, 0 or more (a Python int).
      hyper_learning_rate: the (initial) step size of level 1.
      meta_learning_rate: the (initial) step size of the levels above 1 and the top's fixed step.
      constraints: as in :func:`hypergradient`, for the base's hyperparameters.
      **hyperparams: the base's initial hyperparameters, by name.

    Returns:
      An optax transformation; for ``height >= 1``, a :func:`hypergradient`.

    Example:
      >>> import jax.numpy as jnp, optax, agd_optax
      >>> tx = agd_optax.hypergradient_tower(
      ...     optax.sgd, 3, hyper_learning_rate=1e-5, meta_learning_rate=1e-2, learning_rate=0.1)
      >>> state = tx.init(jnp.zeros(3))
      >>> for level in agd_optax.learned_hyperparams(state):
      ...   print({name: f"{value:.0e}" for name, value in level.items()})
      {'learning_rate': '1e-01'}
      {'learning_rate_level1': '1e-05'}
      {'learning_rate_level2': '1e-02'}
    """
    _check_tower_args(
        height,
        {"hyper_learning_rate": hyper_learning_rate, "meta_learning_rate": meta_learning_rate},
    )
    hyperparams = _unpack(hyperparams)
    if height == 0:
        if constraints:
            raise ValueError("hypergradient_tower: constraints need height >= 1")
        return base(**hyperparams)
    opt = optax.sgd(hyper_learning_rate if height == 1 else meta_learning_rate)
    for level in range(height - 1, 0, -1):
        name = f"learning_rate_level{level}"  # One name per level: optax.tree.get finds each.
        opt = hypergradient(
            lambda **step: optax.sgd(*step.values()),
            opt,
            constraints={name: "exp"},
            **{name: hyper_learning_rate if level == 1 else meta_learning_rate},
        )
    return hypergradient(base, opt, constraints=constraints, **hyperparams)


def _is_hypergradient_state(x: Any) -> bool:
    """A HypergradientState, or its image in Flax NNX's state (a mapping of its fields)."""
    if isinstance(x, HypergradientState):
        return True
    return isinstance(x, Mapping) and {"hyperparams", "raw", "tangents"} <= set(x.keys())


def _find_hypergradient_states(node: Any) -> list[Any]:
    if _is_hypergradient_state(node):
        return [node]
    if isinstance(node, Mapping):
        children = list(node.values())
    elif isinstance(node, (tuple, list)):
        children = list(node)
    else:
        return []
    return [found for child in children for found in _find_hypergradient_states(child)]


def learned_hyperparams(state: Any) -> list[dict[str, jax.Array]]:
    """The current hyperparameters of every level of a :func:`hypergradient` tower, bottom first.

    ``state`` is the tower's state or any tree holding exactly one: an ``optax.chain`` state, or
    the state of an ``nnx.Optimizer`` (``nnx.as_pure(nnx.state(optimizer.opt_state))``). Level 0
    holds the base optimizer's hyperparameters, level 1 the hyper-optimizer's, and so on up to
    the last learning level.

    Example:
      >>> import jax.numpy as jnp, optax, agd_optax
      >>> tx = optax.chain(optax.clip(1.0), agd_optax.hypergradient_tower(optax.sgd, 2, learning_rate=0.1))
      >>> levels = agd_optax.learned_hyperparams(tx.init(jnp.zeros(3)))
      >>> [{k: f"{v:.0e}" for k, v in level.items()} for level in levels]
      [{'learning_rate': '1e-01'}, {'learning_rate_level1': '1e-05'}]

    Raises:
      ValueError: when ``state`` holds no :func:`hypergradient` state, or several side by side.
    """
    found = _find_hypergradient_states(state)
    if len(found) != 1:
        raise ValueError(
            f"learned_hyperparams: expected one hypergradient state in the tree, found {len(found)}"
        )
    levels, s = [], found[0]
    while s is not None and _is_hypergradient_state(s):
        fields = s._asdict() if isinstance(s, HypergradientState) else s
        levels.append(dict(fields["hyperparams"]))
        s = fields.get("hyper_state")
    return levels
