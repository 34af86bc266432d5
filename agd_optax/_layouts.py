"""Layouts: what the algorithm needs of each leaf, fixed by its role and static shape."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from agd_optax._naming import _Undecided, infer_role, raise_undecided, siblings_of
from agd_optax._paths import leaf_shape, path_to_keys, path_to_str
from agd_optax._roles import _HELP, _WEIGHT_KINDS, Role, RoleError, as_role

__all__ = ["Layout", "resolve_layouts"]


# --------------------------------------------------------------------------------------------------
# Matching a roles argument to the parameter tree.


def _is_role_leaf(x: Any) -> bool:
    return isinstance(x, Role | str)


def _broadcast_roles(roles: Any, params: Any) -> list[Role | None]:
    """Expands a roles pytree or prefix pytree to one role (or None: infer) per leaf of params.

    Matching goes by path, not by container type, so a plain dict of roles fits an ``nnx.State``
    of parameters (or a ``FrozenDict``) with the same keys: each leaf takes the role at the
    longest prefix of its path.
    """
    keys = [path_to_keys(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    entries: dict[tuple[str, ...], Any] = {}
    for path, value in jax.tree_util.tree_flatten_with_path(roles, is_leaf=_is_role_leaf)[0]:
        entries[path_to_keys(path)] = value
    used: set[tuple[str, ...]] = set()
    out = []
    for k in keys:
        prefix = next((k[:n] for n in range(len(k), -1, -1) if k[:n] in entries), None)
        if prefix is None:
            raise RoleError(
                f"the roles tree does not match the parameters: it gives no role for leaf "
                f"'{path_to_str(k)}' (give a role, or 'infer', at that path or a prefix of it)"
            )
        used.add(prefix)
        out.append(as_role(entries[prefix], path_to_str(k)))
    unused = sorted(path_to_str(k) for k in set(entries) - used)
    if unused:
        raise RoleError(
            f"the roles tree does not match the parameters: its entries {unused[:5]} match no "
            "parameter"
        )
    return out


# --------------------------------------------------------------------------------------------------
# Layouts: what the algorithm needs of each leaf, fixed by its role and static shape.


@dataclasses.dataclass(frozen=True)
class Layout:
    """What AGD computes with for one leaf: everything static, derived from its role and shape.

    Attributes:
      path: the leaf's path, for error messages.
      kind: ``"weight"``, ``"bias"`` or ``"norm"``.
      reduce_axes: axes summed in each Frobenius norm (fan-in and fan-out for a weight, so a conv
        gets one norm per spatial position; every non-stack axis for a norm-layer parameter).
      spatial_axes: a conv's kernel positions, whose per-position norms are summed for G.
      stack_axes: axes of independent stacked weights.
      scale: s(W) = sqrt(d_out / d_in) / sqrt(positions); for a bias, its owner's.
      count: how many weights the leaf adds to the depth L (product of the stack dims; 0 for
        biases and norm-layer parameters).
      owner: for a bias, the index (in flattening order) of the weight it moves with.
      in_axes, out_axes, groups: a weight's fan-in and fan-out axes and feature groups.

    Example:
      >>> import jax.numpy as jnp, agd_optax
      >>> [lay] = agd_optax.resolve_layouts({"conv": {"kernel": jnp.zeros((3, 3, 16, 32))}})
      >>> lay.kind, lay.spatial_axes, lay.count, round(lay.scale, 4)  # sqrt(32 / 16) / 3
      ('weight', (0, 1), 1, 0.4714)
    """

    path: str
    kind: str
    reduce_axes: tuple[int, ...]
    spatial_axes: tuple[int, ...]
    stack_axes: tuple[int, ...]
    scale: float
    count: int
    owner: int | None = None
    in_axes: tuple[int, ...] = ()
    out_axes: tuple[int, ...] = ()
    groups: int = 1


def _normalise_axes(axes: tuple[int, ...], ndim: int, path: str, what: str) -> tuple[int, ...]:
    out = []
    for a in axes:
        if not -ndim <= a < ndim:
            raise RoleError(
                f"leaf '{path}' has {ndim} axes; its role's {what} {axes} is out of range"
            )
        out.append(a % ndim)
    return tuple(out)


def _weight_layout(role: Role, shape: tuple[int, ...], path: str) -> Layout:
    ndim = len(shape)
    ins = _normalise_axes(role.in_axes, ndim, path, "in_axes")
    outs = _normalise_axes(role.out_axes, ndim, path, "out_axes")
    stack = _normalise_axes(role.stack_axes, ndim, path, "stack_axes")
    taken = ins + outs + stack
    if role.spatial_axes is None:
        spatial = tuple(a for a in range(ndim) if a not in taken) if role.kind == "conv" else ()
    else:
        spatial = _normalise_axes(role.spatial_axes, ndim, path, "spatial_axes")
    used = taken + spatial
    if len(set(used)) != len(used):
        raise RoleError(
            f"leaf '{path}' with shape {shape}: its {role.kind} role uses an axis twice"
        )
    if sorted(used) != list(range(ndim)):
        missing = sorted(set(range(ndim)) - set(used))
        raise RoleError(
            f"leaf '{path}' with shape {shape}: its {role.kind} role leaves axes {missing} without "
            "a part (fan-in, fan-out, spatial or stack)"
        )
    if not ins or not outs:
        raise RoleError(f"leaf '{path}': a {role.kind} role needs fan-in and fan-out axes")
    if role.kind != "conv" and spatial:
        raise RoleError(f"leaf '{path}': only a conv role has spatial axes")
    d_in = math.prod(shape[a] for a in ins) * role.groups
    d_out = math.prod(shape[a] for a in outs)
    if role.groups > 1 and d_out % role.groups:
        raise RoleError(f"leaf '{path}': fan-out {d_out} is not divisible by groups={role.groups}")
    positions = math.prod(shape[a] for a in spatial)
    scale = math.sqrt(d_out / d_in) / math.sqrt(positions)
    return Layout(
        path=path,
        kind="weight",
        reduce_axes=tuple(sorted(ins + outs)),
        spatial_axes=spatial,
        stack_axes=stack,
        scale=scale,
        count=math.prod(shape[a] for a in stack),
        in_axes=ins,
        out_axes=outs,
        groups=role.groups,
    )


def resolve_layouts(params: Any, roles: Any = None) -> list[Layout]:
    """One :class:`Layout` per leaf of ``params`` (flattening order), from ``roles``.

    Args:
      params: the parameter (or gradient) pytree; only paths, shapes and dtypes are read.
      roles: ``None`` (infer every leaf), a pytree or prefix pytree of roles (:class:`Role`, a
        shorthand string, or ``"infer"``), or a callable mapping ``params`` to one.

    Raises:
      RoleError: naming the leaf, for a leaf whose role is undecidable or does not fit its shape,
        a roles tree that does not match ``params``, or a bias without a weight to move with.
      TypeError: naming the leaf, for integer, boolean or complex leaves; ValueError for empty ones.

    Example:
      >>> import jax.numpy as jnp, agd_optax
      >>> params = {"dense": {"kernel": jnp.zeros((4, 8)), "bias": jnp.zeros(8)}}
      >>> [(lay.path, lay.kind, lay.owner) for lay in agd_optax.resolve_layouts(params)]
      [('dense/bias', 'bias', 1), ('dense/kernel', 'weight', None)]
    """
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    if not flat:
        raise RoleError("AGD got an empty parameter tree")
    all_keys = [path_to_keys(p) for p, _ in flat]
    paths = [path_to_str(k) for k in all_keys]
    for path, (_, x) in zip(paths, flat):
        _check_leaf(path, x)

    if callable(roles) and not isinstance(roles, Role):
        roles = roles(params)
    given: list[Role | None] = (
        [None] * len(flat) if roles is None else _broadcast_roles(roles, params)
    )
    shapes = [leaf_shape(x) for _, x in flat]
    sib = siblings_of(all_keys, shapes)
    index = {k: i for i, k in enumerate(all_keys)}
    undecided = []
    decided: list[Role] = []
    for i, keys in enumerate(all_keys):
        role = given[i]
        if role is None:
            try:
                role = infer_role(keys, shapes[i], sib[keys[:-1]])
            except _Undecided as e:
                undecided.append(e)
                continue
        decided.append(role)
    raise_undecided(undecided)

    layouts: list[Layout | None] = [None] * len(flat)
    biases = []
    for i, (keys, role) in enumerate(zip(all_keys, decided)):
        shape = shapes[i]
        if role.kind in _WEIGHT_KINDS:
            layouts[i] = _weight_layout(role, shape, paths[i])
        elif role.kind == "norm":
            stack = _normalise_axes(role.stack_axes, len(shape), paths[i], "stack_axes")
            rest = tuple(a for a in range(len(shape)) if a not in stack)
            layouts[i] = Layout(paths[i], "norm", rest, (), tuple(sorted(stack)), 1.0, 0)
        else:
            biases.append((i, keys, role))

    for i, keys, role in biases:
        layouts[i] = _bias_layout(i, keys, role, layouts, paths, shapes, index)
    done = [lay for lay in layouts if lay is not None]
    if len(done) != len(layouts):  # Every leaf is a weight, a norm or a bias, laid out above.
        missing = [p for p, lay in zip(paths, layouts) if lay is None]
        raise AssertionError(f"leaves without a layout: {missing}")
    if not any(lay.count for lay in done):
        raise RoleError(
            "AGD needs at least one dense, conv or embedding weight to set its step size; the "
            f"parameter tree has none (leaves: {paths[:5]}{'...' if len(paths) > 5 else ''})"
        )
    return done


def _bias_layout(i, keys, role, layouts, paths, shapes, index) -> Layout:
    """The layout of bias ``i``: its owner found (``role.owner``, or the sibling ``kernel`` or
    ``embedding``) and checked to be a weight whose stack and fan-out axes the bias's shape
    matches."""
    if role.owner is not None:
        candidates = [role.owner]
    else:
        candidates = [keys[:-1] + ("kernel",), keys[:-1] + ("embedding",)]
    owner = next((index[c] for c in candidates if c in index), None)
    if owner is None:
        raise RoleError(
            f"leaf '{paths[i]}' is a bias but its weight "
            f"{' or '.join(repr(path_to_str(c)) for c in candidates)} is not in the parameter "
            f"tree. Pass bias(owner='path/to/kernel') or give it the norm() role. {_HELP}"
        )
    w = layouts[owner]
    if w is None or w.kind != "weight":
        raise RoleError(
            f"leaf '{paths[i]}' is a bias whose owner '{paths[owner]}' is not a dense, conv or "
            "embedding weight"
        )
    shape = shapes[i]
    n_stack = len(w.stack_axes)
    if n_stack and (w.stack_axes != tuple(range(n_stack)) or len(shape) < n_stack):
        raise RoleError(
            f"leaf '{paths[i]}': a bias can follow a stacked weight only when the stack axes "
            f"are leading axes of both (owner '{paths[owner]}' stacks on {w.stack_axes})"
        )
    owner_shape = shapes[owner]
    if n_stack and shape[:n_stack] != owner_shape[:n_stack]:
        raise RoleError(
            f"leaf '{paths[i]}' with shape {shape} does not share the stack dims "
            f"{owner_shape[:n_stack]} of its owner '{paths[owner]}'"
        )
    fan_out = tuple(owner_shape[a] for a in w.out_axes)
    if shape[n_stack:] != fan_out:
        raise RoleError(
            f"leaf '{paths[i]}' is a bias of shape {shape}, which does not fit its owner "
            f"'{paths[owner]}' {owner_shape}: a bias has the shape of its weight's stack and "
            f"fan-out axes, {owner_shape[:n_stack] + fan_out}. Is the weight's role (its "
            f"fan-in and fan-out axes) right? {_HELP}"
        )
    return Layout(
        paths[i],
        "bias",
        tuple(range(n_stack, len(shape))),
        (),
        tuple(range(n_stack)),
        w.scale,
        0,
        owner,
    )


def _check_leaf(path: str, x: Any) -> None:
    dtype = getattr(x, "dtype", None)
    if dtype is None:
        raise TypeError(f"leaf '{path}' is a {type(x).__name__}, not an array")
    if dtype == jax.dtypes.float0 or not jnp.issubdtype(dtype, jnp.floating):
        if jnp.issubdtype(dtype, jnp.complexfloating):
            raise TypeError(
                f"leaf '{path}' is complex ({dtype}); AGD is defined for real weights. Split it "
                "with optax.contrib.split_real_and_imaginary or train it with another optimizer"
            )
        raise TypeError(
            f"leaf '{path}' has dtype {dtype}; AGD updates floating-point parameters only "
            "(filter integer state out of the tree, e.g. nnx.Optimizer(..., wrt=nnx.Param))"
        )
    if math.prod(leaf_shape(x)) == 0:
        raise ValueError(
            f"leaf '{path}' with shape {leaf_shape(x)} is empty; AGD cannot normalise it"
        )
