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
import jax.numpy as jnp
import optax
from flax import nnx

import agd_optax
from agd_optax._paths import path_to_keys

AGD_RULES = ("library", "1d_lr_free", "1d_frozen", "embedding_fan_in_vocab")
DEFAULT_RULE = "1d_lr_free"  # The training program's; measured in the evidence suite's rules.


def default_roles(arch: str, model: nnx.Module, context: int | None = None) -> Any:
    """The library's roles for ``model``'s parameters, as a pytree: read off the forward pass
    for the transformer (stacked blocks included), off the module types otherwise."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    if arch == "transformer":
        tokens = jnp.zeros((1, context), jnp.int32)
        forward = lambda p, r, x: nnx.merge(graphdef, p, r)(x)  # noqa: E731
        return agd_optax.trace_roles(forward, params, rest, tokens)
    return agd_optax.nnx_roles(model)(params)


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


def rule_roles(rule: str, arch: str, model: nnx.Module, context: int | None = None) -> dict:
    """The roles of ``rule`` for every parameter, as a nested dict by path."""
    if rule not in AGD_RULES:
        raise ValueError(f"unknown AGD rule {rule!r}; expected one of {AGD_RULES}")
    is_role = lambda x: isinstance(x, agd_optax.Role)  # noqa: E731
    roles = _flat(default_roles(arch, model, context), is_leaf=is_role)
    if rule == "embedding_fan_in_vocab":
        tables = [k for k in roles if k[-1] == "embedding"]
        if not tables:
            raise ValueError("rule 'embedding_fan_in_vocab' needs a model with embedding tables")
        for keys in tables:
            roles[keys] = agd_optax.dense(in_axes=-2, out_axes=-1)
    return _nested(roles)


def reinitialize_for_rule(
    rule: str, arch: str, model: nnx.Module, key: jax.Array, context: int | None = None
) -> None:
    """Re-initialises, with AGD's initialisation, each weight whose role ``rule`` changes."""
    if rule in ("library", "1d_lr_free", "1d_frozen"):
        return
    is_role = lambda x: isinstance(x, agd_optax.Role)  # noqa: E731
    before = _flat(default_roles(arch, model, context), is_leaf=is_role)
    after = _flat(rule_roles(rule, arch, model, context), is_leaf=is_role)
    state = nnx.state(model, nnx.Param)
    fresh = agd_optax.reinitialize(key, state, _nested(after))
    changed = {k for k in after if after[k] != before[k]}
    pure = lambda v: v[...] if isinstance(v, nnx.Variable) else v  # noqa: E731
    new = {
        k: pure(v) for k, v in _flat(fresh, is_leaf=lambda v: isinstance(v, nnx.Variable)).items()
    }
    for keys, var in _flat(state, is_leaf=lambda v: isinstance(v, nnx.Variable)).items():
        if keys in changed:
            var.set_value(new[keys])


def agd_transformation(
    rule: str, gain: float, arch: str, model: nnx.Module, context: int | None = None
) -> optax.GradientTransformation:
    """AGD under ``rule``: one transformation for the whole parameter tree."""
    roles = rule_roles(rule, arch, model, context)
    if rule not in ("1d_lr_free", "1d_frozen"):
        return agd_optax.agd(gain, roles=roles)
    is_role = lambda x: isinstance(x, agd_optax.Role)  # noqa: E731
    flat = _flat(roles, is_leaf=is_role)
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
