"""AGD's roles for the training program's models, and the alternative rules it can compare.

The rules (``Config.agd_rule``):

* ``library``: ``agd_optax.agd()`` with the library's roles. Weights by their fan-in and
  fan-out; a bias moves with its weight; a norm-layer scale or offset is its own diagonal weight
  with ``s = 1``; an embedding table, tied or not, is the matrix ``features -> num_embeddings``
  (fan-in the width, the map a tied head applies).
* ``1d_lr_free`` (the training program's default, ``DEFAULT_RULE``): every 1-D parameter
  (biases, norm scales and offsets) is handed to Prodigy at its defaults with
  ``optax.partition``; AGD, with the library's roles, moves the weights alone. On a model with no
  1-D parameters this is ``agd()`` itself. Prodigy keeps state for those leaves, which
  ``agd()`` promises not to, so this is a recipe rather than the library's rule.
* ``1d_frozen``: the 1-D parameters stay at their initial values (the AGD paper's networks have
  none; its authors' GPT-2 sketch froze LayerNorm); ``agd()`` itself on a model with none.
* ``embedding_fan_in_vocab``: every embedding table, a tied one included, is the map
  ``one_hot(ids) @ table``, ``dense(in_axes=-2, out_axes=-1)`` (fan-in the vocabulary: a
  quarter of the default's scale at width 64 and 256 bytes), initialised accordingly. The
  library's reading before the rules were measured.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

import agd_optax
from agd_optax._paths import path_to_keys

AGD_RULES = ("library", "1d_lr_free", "1d_frozen", "embedding_fan_in_vocab")
DEFAULT_RULE = "1d_lr_free"  # The training program's; measured in the evidence suite's rules.


def _is_role(x: Any) -> bool:
    return isinstance(x, agd_optax.Role)


def _flat(tree: Any, is_leaf=None) -> dict[tuple[str, ...], Any]:
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]
    return {path_to_keys(p): v for p, v in leaves}


def _nested(flat: dict[tuple[str, ...], Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for keys, value in flat.items():
        node = out
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    return out


def rule_roles(rule: str, roles: Any) -> dict:
    """The roles of ``rule`` for every parameter, as a nested dict by path, from the library's
    ``roles`` of the model (``Task.roles``)."""
    if rule not in AGD_RULES:
        raise ValueError(f"unknown AGD rule {rule!r}; expected one of {AGD_RULES}")
    flat = _flat(roles, is_leaf=_is_role)
    if rule == "embedding_fan_in_vocab":
        tables = [k for k in flat if k[-1] == "embedding"]
        if not tables:
            raise ValueError("rule 'embedding_fan_in_vocab' needs a model with embedding tables")
        for keys in tables:
            flat[keys] = agd_optax.dense(in_axes=-2, out_axes=-1)
    return _nested(flat)


def changed_by_rule(rule: str, roles: Any) -> dict | None:
    """The roles of the weights whose role ``rule`` changes (a nested dict by path, each weight
    to be initialised anew by its new role), or None when it changes none."""
    if rule in ("library", "1d_lr_free", "1d_frozen"):
        return None
    before = _flat(roles, is_leaf=_is_role)
    after = _flat(rule_roles(rule, roles), is_leaf=_is_role)
    return _nested({k: r for k, r in after.items() if r != before[k]})


def reinitialize_for_rule(rule: str, params: Any, key: jax.Array, roles: Any) -> Any:
    """``params`` with each weight whose role ``rule`` changes initialised anew, AGD's way, by
    its new role; the other leaves unchanged. Traceable (the training program jits it)."""
    changed = changed_by_rule(rule, roles)
    if changed is None:
        return params
    changed_keys = set(_flat(changed, is_leaf=_is_role))
    fresh = agd_optax.reinitialize(key, params, rule_roles(rule, roles))

    def pick(path, new, old):
        return new if path_to_keys(path) in changed_keys else old

    return jax.tree_util.tree_map_with_path(pick, fresh, params)


def agd_transformation(rule: str, gain: float, roles: Any) -> optax.GradientTransformation:
    """AGD under ``rule``, given the library's ``roles`` of the model: one transformation for
    the whole parameter tree."""
    roles = rule_roles(rule, roles)
    if rule not in ("1d_lr_free", "1d_frozen"):
        return agd_optax.agd(gain, roles=roles)
    flat = _flat(roles, is_leaf=_is_role)
    one_d = {k for k, r in flat.items() if r.kind in ("bias", "norm")}
    if not one_d:  # Nothing for the rule to change.
        return agd_optax.agd(gain, roles=roles)
    weights = _nested({k: r for k, r in flat.items() if k not in one_d})
    other = optax.contrib.prodigy() if rule == "1d_lr_free" else optax.set_to_zero()

    def labels(params):
        def label(path, _):
            return "one_d" if path_to_keys(path) in one_d else "weights"

        return jax.tree_util.tree_map_with_path(label, params)

    return optax.partition({"weights": agd_optax.agd(gain, roles=weights), "one_d": other}, labels)
