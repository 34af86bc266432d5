"""Leaf roles: how Automatic Gradient Descent treats each leaf of a parameter tree.

AGD needs, for every weight, its fan-in, its fan-out and its spatial positions. A parameter tree only
holds arrays, so each leaf is given a *role*:

* ``dense(in_axes, out_axes)``: a matrix, or a multi-axis kernel read as the matrix that maps the
  flattened ``in_axes`` to the flattened ``out_axes`` (attention projections stored as 3-axis
  ``LinearGeneral`` / ``DenseGeneral`` kernels).
* ``conv(spatial_axes, in_axis, out_axis, groups)``: a 1-D, 2-D or 3-D convolution kernel (Flax
  stores them as ``(*spatial, in // groups, out)``), grouped and depthwise ones included.
* ``embedding()``: an embedding table ``(num_embeddings, features)``, the dense map
  ``one_hot(ids) @ table``.
* ``bias(owner=None)``: a bias that moves with the weight of its own module.
* ``norm()``: the scale or the offset of a normalisation layer.

Any weight role may carry ``stack_axes``: leading axes along which independent weights are stacked
(layers built with ``nnx.scan`` / ``nn.scan``, ``nnx.vmap``), each slice counting as one weight.

Roles are inferred from Flax's naming conventions where that is unambiguous (:func:`infer_roles`),
or given to :func:`agd_optax.agd` as a pytree, a prefix pytree, or a callable returning one, the way
``optax.partition`` takes its labels. A leaf whose role cannot be decided is an error naming its
path, never a guess.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "Role",
    "RoleError",
    "Layout",
    "bias",
    "conv",
    "dense",
    "embedding",
    "infer_role",
    "infer_roles",
    "norm",
    "path_to_keys",
    "path_to_str",
    "resolve_layouts",
]

_WEIGHT_KINDS = ("dense", "conv", "embedding")
_KINDS = (*_WEIGHT_KINDS, "bias", "norm")
_ATTENTION_IN = ("query", "key", "value")
_ATTENTION_OUT = ("out",)

_HELP = (
    "Give its role explicitly: agd(roles=...) takes a pytree, a prefix pytree or a callable of "
    "agd_optax.dense(), conv(), embedding(), bias() or norm(); for an NNX model, "
    "agd(roles=agd_optax.nnx_roles(model)) reads the roles off the model's module types."
)


class RoleError(ValueError):
    """A leaf's AGD role is missing, ambiguous or does not fit the leaf."""


@dataclasses.dataclass(frozen=True)
class Role:
    """How AGD treats one leaf. Build it with :func:`dense`, :func:`conv`, :func:`embedding`,
    :func:`bias` or :func:`norm` rather than directly.

    Attributes:
      kind: one of ``"dense"``, ``"conv"``, ``"embedding"``, ``"bias"``, ``"norm"``.
      in_axes: fan-in axes (weights), negative axes allowed.
      out_axes: fan-out axes (weights).
      spatial_axes: kernel positions of a convolution; ``None`` means every axis that is not a fan-in,
        fan-out or stack axis.
      stack_axes: axes along which independent weights are stacked (scanned layers).
      groups: feature groups of a grouped convolution (``feature_group_count``).
      owner: for a bias, the path of the weight it moves with (a ``"/"``-joined string or a tuple of
        keys); ``None`` means the ``kernel`` (or ``embedding``) of the same module.
    """

    kind: str
    in_axes: tuple[int, ...] = ()
    out_axes: tuple[int, ...] = ()
    spatial_axes: tuple[int, ...] | None = ()
    stack_axes: tuple[int, ...] = ()
    groups: int = 1
    owner: tuple[str, ...] | None = None

    def __post_init__(self):
        if self.kind not in _KINDS:
            raise RoleError(f"unknown role kind {self.kind!r}; expected one of {_KINDS}")
        if not isinstance(self.groups, int) or self.groups < 1:
            raise RoleError(f"groups must be a positive int, got {self.groups!r}")


def _axes(axes: int | Sequence[int], what: str) -> tuple[int, ...]:
    if isinstance(axes, int | np.integer):
        return (int(axes),)
    try:
        return tuple(int(a) for a in axes)
    except TypeError as e:
        raise RoleError(f"{what} must be an int or a sequence of ints, got {axes!r}") from e


def dense(
    in_axes: int | Sequence[int] = -2,
    out_axes: int | Sequence[int] = -1,
    *,
    stack_axes: int | Sequence[int] = (),
) -> Role:
    """Role of a dense weight: the matrix from the flattened ``in_axes`` to the flattened ``out_axes``.

    The defaults fit a Flax ``Dense``/``Linear`` kernel ``(d_in, d_out)``. For PyTorch-layout
    ``(d_out, d_in)`` matrices use ``dense(in_axes=1, out_axes=0)``; for a query projection
    ``(d_model, heads, head_dim)`` use ``dense(in_axes=0, out_axes=(1, 2))``.
    """
    return Role(
        "dense",
        in_axes=_axes(in_axes, "in_axes"),
        out_axes=_axes(out_axes, "out_axes"),
        stack_axes=_axes(stack_axes, "stack_axes"),
    )


def conv(
    spatial_axes: int | Sequence[int] | None = None,
    in_axis: int = -2,
    out_axis: int = -1,
    *,
    groups: int = 1,
    stack_axes: int | Sequence[int] = (),
) -> Role:
    """Role of a convolution kernel, by default Flax's ``(*spatial, in // groups, out)`` layout.

    ``groups`` is the convolution's ``feature_group_count`` (``groups == in == out`` is depthwise).
    A grouped kernel is treated as ``groups`` independent convolutions of
    ``in // groups -> out // groups`` channels, so ``s = sqrt(out / (groups * in_slice)) /
    sqrt(prod(spatial))`` where ``in_slice`` is the size of the stored fan-in axis.
    """
    return Role(
        "conv",
        in_axes=_axes(in_axis, "in_axis"),
        out_axes=_axes(out_axis, "out_axis"),
        spatial_axes=None if spatial_axes is None else _axes(spatial_axes, "spatial_axes"),
        stack_axes=_axes(stack_axes, "stack_axes"),
        groups=groups,
    )


def embedding(*, stack_axes: int | Sequence[int] = ()) -> Role:
    """Role of an embedding table ``(num_embeddings, features)``.

    AGD treats it as the dense map it is, ``one_hot(ids) @ table``: fan-in ``num_embeddings``,
    fan-out ``features``.
    """
    return Role(
        "embedding", in_axes=(-2,), out_axes=(-1,), stack_axes=_axes(stack_axes, "stack_axes")
    )


def bias(owner: str | Sequence[str] | None = None) -> Role:
    """Role of a bias that moves with its module's weight (``owner``, by default the sibling
    ``kernel`` or ``embedding`` leaf). Any shape: attention biases are ``(heads, head_dim)``."""
    if isinstance(owner, str):
        owner = tuple(k for k in owner.split("/") if k)
    elif owner is not None:
        owner = tuple(str(k) for k in owner)
    return Role("bias", spatial_axes=None, owner=owner)


def norm(*, stack_axes: int | Sequence[int] = ()) -> Role:
    """Role of the scale or the offset of a normalisation layer (LayerNorm, BatchNorm, RMSNorm...).

    ``stack_axes``: axes along which the parameters of stacked layers are stacked (``nn.scan``,
    ``nnx.vmap``); each slice is normalised on its own, as the unstacked layers would be.
    """
    return Role("norm", spatial_axes=None, stack_axes=_axes(stack_axes, "stack_axes"))


_SHORTHANDS: dict[str, Callable[[], Role]] = {
    "dense": dense,
    "conv": conv,
    "embedding": embedding,
    "bias": bias,
    "norm": norm,
}


def as_role(value: Any, path: str) -> Role | None:
    """Turns a role, a shorthand string or ``"infer"`` (returned as ``None``) into a :class:`Role`."""
    if isinstance(value, Role):
        return value
    if isinstance(value, str):
        if value == "infer":
            return None
        if value in _SHORTHANDS:
            return _SHORTHANDS[value]()
    raise RoleError(
        f"the role given for leaf '{path}' is {value!r}; expected an agd_optax role "
        f"(dense(), conv(), embedding(), bias(), norm()) or one of the strings "
        f"{sorted(_SHORTHANDS) + ['infer']}"
    )


# --------------------------------------------------------------------------------------------------
# Paths.


def _key_str(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_to_keys(path: Sequence[Any]) -> tuple[str, ...]:
    """A JAX key path as a tuple of strings, without the trailing ``.value`` of an NNX Variable."""
    keys = [_key_str(k) for k in path]
    if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and keys[-1] == "value":
        keys.pop()
    return tuple(keys)


def path_to_str(keys: Sequence[str]) -> str:
    return "/".join(keys) if keys else "<root>"


# --------------------------------------------------------------------------------------------------
# Inference from Flax naming conventions.


def infer_role(keys: tuple[str, ...], shape: tuple[int, ...], siblings: frozenset[str]) -> Role:
    """The role of a leaf from its path and shape, following Flax's naming conventions.

    Args:
      keys: the leaf's path as strings, e.g. ``("layers", "0", "kernel")``.
      shape: the leaf's shape.
      siblings: the names of the other leaves of the same module.

    Raises:
      RoleError: naming the path, when the role is not unambiguous.
    """
    path = path_to_str(keys)
    name = keys[-1] if keys else ""
    parent = keys[-2] if len(keys) >= 2 else ""
    ndim = len(shape)

    def fail(why: str) -> RoleError:
        return RoleError(
            f"cannot infer the AGD role of leaf '{path}' with shape {shape}: {why}. {_HELP}"
        )

    if name == "kernel":
        if ndim == 2:
            return dense()
        if ndim == 3 and parent in _ATTENTION_IN:
            return dense(in_axes=0, out_axes=(1, 2))
        if ndim == 3 and parent in _ATTENTION_OUT:
            return dense(in_axes=(0, 1), out_axes=2)
        if ndim == 3:
            raise fail(
                "a 3-axis kernel may be a 1-D convolution (width, in, out), a multi-axis dense "
                "kernel or a stack of dense kernels (scanned layers)"
            )
        if ndim in (4, 5):
            return conv()
        raise fail(f"a kernel with {ndim} axes matches no Flax layer")
    if name == "embedding":
        if ndim == 2:
            return embedding()
        raise fail("an embedding table must have 2 axes (num_embeddings, features)")
    if name == "bias":
        if "kernel" in siblings or "embedding" in siblings:
            return bias()
        if ndim == 1:
            return norm()
        raise fail("a bias with several axes and no 'kernel' beside it")
    if name == "scale":
        if ndim == 1 and "kernel" not in siblings:
            return norm()
        raise fail("a 'scale' must be the 1-axis scale of a normalisation layer")
    raise fail(
        f"{name!r} is not a Flax parameter name AGD knows ('kernel', 'embedding', 'bias', 'scale')"
    )


def _siblings(all_keys: Sequence[tuple[str, ...]]) -> dict[tuple[str, ...], frozenset[str]]:
    by_parent: dict[tuple[str, ...], set[str]] = {}
    for keys in all_keys:
        by_parent.setdefault(keys[:-1], set()).add(keys[-1] if keys else "")
    return {k: frozenset(v) for k, v in by_parent.items()}


def infer_roles(params: Any) -> Any:
    """The pytree of roles that :func:`agd_optax.agd` infers for ``params`` (for inspection, or as
    a starting point to edit). Raises :class:`RoleError` naming the first undecidable leaf."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    all_keys = [path_to_keys(p) for p, _ in leaves]
    sib = _siblings(all_keys)
    roles = [infer_role(k, _shape(x), sib[k[:-1]]) for k, (_, x) in zip(all_keys, leaves)]
    return jax.tree_util.tree_unflatten(treedef, roles)


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
    given = [None] * len(flat) if roles is None else _broadcast_roles(roles, params)
    sib = _siblings(all_keys)
    index = {k: i for i, k in enumerate(all_keys)}

    layouts: list[Layout | None] = [None] * len(flat)
    biases = []
    for i, (keys, (_, x), role) in enumerate(zip(all_keys, flat, given)):
        shape = _shape(x)
        if role is None:
            role = infer_role(keys, shape, sib[keys[:-1]])
        if role.kind in _WEIGHT_KINDS:
            layouts[i] = _weight_layout(role, shape, paths[i])
        elif role.kind == "norm":
            stack = _normalise_axes(role.stack_axes, len(shape), paths[i], "stack_axes")
            rest = tuple(a for a in range(len(shape)) if a not in stack)
            layouts[i] = Layout(paths[i], "norm", rest, (), tuple(sorted(stack)), 1.0, 0)
        else:
            biases.append((i, keys, role))

    for i, keys, role in biases:
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
        shape = _shape(flat[i][1])
        n_stack = len(w.stack_axes)
        if n_stack and (w.stack_axes != tuple(range(n_stack)) or len(shape) < n_stack):
            raise RoleError(
                f"leaf '{paths[i]}': a bias can follow a stacked weight only when the stack axes "
                f"are leading axes of both (owner '{paths[owner]}' stacks on {w.stack_axes})"
            )
        owner_shape = _shape(flat[owner][1])
        if n_stack and shape[:n_stack] != owner_shape[:n_stack]:
            raise RoleError(
                f"leaf '{paths[i]}' with shape {shape} does not share the stack dims "
                f"{owner_shape[:n_stack]} of its owner '{paths[owner]}'"
            )
        layouts[i] = Layout(
            paths[i],
            "bias",
            tuple(range(n_stack, len(shape))),
            (),
            tuple(range(n_stack)),
            w.scale,
            0,
            owner,
        )
    if not any(lay.count for lay in layouts):
        raise RoleError(
            "AGD needs at least one dense, conv or embedding weight to set its step size; the "
            f"parameter tree has none (leaves: {paths[:5]}{'...' if len(paths) > 5 else ''})"
        )
    return layouts  # type: ignore[return-value]


def _shape(x: Any) -> tuple[int, ...]:
    """A leaf's shape: arrays, NumPy scalars and ``jax.ShapeDtypeStruct`` alike."""
    return tuple(int(d) for d in (x.shape if hasattr(x, "shape") else np.shape(x)))


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
    if math.prod(_shape(x)) == 0:
        raise ValueError(f"leaf '{path}' with shape {_shape(x)} is empty; AGD cannot normalise it")
