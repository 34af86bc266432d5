"""Roles of a parameter tree in PyTorch's layout and names (a ``state_dict``, flat or nested)."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax

from agd_optax._paths import leaf_shape, path_to_keys, path_to_str
from agd_optax._roles import (
    Role,
    RoleError,
    as_role,
    bias,
    conv,
    dense,
    embedding,
    norm,
)

__all__ = ["pytorch_roles"]


def _split(keys: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(part for k in keys for part in k.replace("/", ".").split(".") if part)


def pytorch_roles(params: Any = None, *, overrides: Mapping[str, Any] | None = None) -> Any:
    """The AGD roles of a tree in PyTorch's layout and names, e.g. a ``state_dict``.

    Works on a flat dict with dotted keys (``{"fc1.weight": ..., "fc1.bias": ...}``) as on a nested
    one. PyTorch stores ``nn.Linear`` weights as ``(out, in)`` and ``nn.ConvNd`` weights as
    ``(out, in // groups, *kernel)``, so:

    * a 2-axis ``weight`` is ``dense(in_axes=1, out_axes=0)``; under a module whose name contains
      ``emb`` it is ``embedding()``, an ``nn.Embedding`` table ``(num, dim)``: both read the
      weight as the map from its second axis to its first, so the two give the same update;
    * a 3- to 5-axis ``weight`` is ``conv(spatial_axes=(2, ...), in_axis=1, out_axis=0)``;
    * a 1-axis ``weight`` is a normalisation layer's scale (``BatchNorm``, ``LayerNorm``);
    * a ``bias`` moves with the ``weight`` beside it (or is a norm-layer offset beside a 1-axis
      ``weight``).

    What PyTorch's names and shapes do not decide is an error listing every such leaf, unless
    ``overrides`` gives its role: convolutions with one
    input channel per group (depthwise, or a one-channel input), fused attention projections
    (``in_proj_weight``) and buffers (``running_mean``: pass parameters only). Grouped
    convolutions with several channels per group cannot be told from their shape: give them
    ``conv(spatial_axes=(2, 3), in_axis=1, out_axis=0, groups=g)`` in ``overrides``.

    Args:
      params: the parameter tree; ``None`` returns the function of ``params`` with
        ``overrides`` bound, for ``agd(roles=pytorch_roles(overrides=...))``.
      overrides: leaf or module path (dotted or ``/``-joined) to role, for the leaves above.

    Returns:
      A pytree of roles with the structure of ``params``.

    Example:
      >>> import jax.numpy as jnp, agd_optax
      >>> state_dict = {"fc1.weight": jnp.zeros((32, 10)), "fc1.bias": jnp.zeros(32),
      ...               "fc2.weight": jnp.zeros((2, 32))}
      >>> tx = agd_optax.agd(roles=agd_optax.pytorch_roles)
      >>> agd_optax.pytorch_roles(state_dict)["fc1.bias"].owner
      ('fc1.weight',)
    """
    if params is None:
        return functools.partial(pytorch_roles, overrides=overrides)
    given = {_split((k,)): v for k, v in (overrides or {}).items()}
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    keys = [path_to_keys(p) for p, _ in flat]
    split = [_split(k) for k in keys]
    shapes = [leaf_shape(x) for _, x in flat]
    index = {s: i for i, s in enumerate(split)}
    used = set()
    roles: list[Role | None] = []
    problems = []
    for i, (s, shape) in enumerate(zip(split, shapes)):
        prefix = next((s[:n] for n in range(len(s), 0, -1) if s[:n] in given), None)
        if prefix is not None:
            used.add(prefix)
            roles.append(as_role(given[prefix], path_to_str(keys[i])))
            continue
        weight = index.get(s[:-1] + ("weight",))
        try:
            roles.append(
                _role(s, shape, None if weight is None else (keys[weight], shapes[weight]))
            )
        except RoleError as e:
            roles.append(None)
            problems.append(f"  '{path_to_str(keys[i])}' {shape}: {e}")
    unused = sorted(".".join(k) for k in set(given) - used)
    if unused:
        problems.append(f"  overrides {unused} match no leaf")
    if problems:
        raise RoleError(
            f"pytorch_roles cannot decide {len(problems)} leaves:\n"
            + "\n".join(problems)
            + "\nGive them in pytorch_roles(overrides={path: role}), e.g. "
            "{'dw.weight': agd_optax.conv((2, 3), 1, 0, groups=8)}, or read the roles off the computation "
            "with agd_optax.trace_roles."
        )
    return jax.tree_util.tree_unflatten(treedef, roles)


def _role(keys: tuple[str, ...], shape: tuple[int, ...], weight) -> Role:
    name, ndim = keys[-1], len(shape)
    module = keys[-2] if len(keys) >= 2 else ""
    if name == "weight":
        if ndim == 1:
            return norm()
        if ndim == 2:
            # An nn.Embedding table (num, dim) is the map dim -> num, as AGD reads embeddings:
            # the same fan-in and fan-out as a Linear weight (out, in).
            return embedding() if "emb" in module.lower() else dense(1, 0)
        if 3 <= ndim <= 5:
            if shape[1] == 1 and shape[0] > 1:
                raise RoleError(
                    "a convolution with one input channel per group: depthwise (give "
                    f"conv(spatial_axes={tuple(range(2, ndim))}, in_axis=1, out_axis=0, "
                    f"groups={shape[0]})) or over a one-channel input (groups=1)?"
                )
            return conv(tuple(range(2, ndim)), 1, 0)
        raise RoleError(f"a weight with {ndim} axes matches no PyTorch layer")
    if name == "bias":
        if weight is None:
            raise RoleError("a bias with no 'weight' beside it")
        owner, owner_shape = weight
        if len(owner_shape) == 1:
            return norm()
        return bias(owner=owner)
    raise RoleError(
        f"{name!r} is not a parameter name of a PyTorch Linear, Conv or norm layer (buffers such "
        "as running_mean are not parameters)"
    )
