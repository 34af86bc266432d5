"""Roles read off Flax NNX models (the only module of the library that imports flax)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax

from agd_optax._naming import _Undecided, infer_role, raise_undecided, siblings_of
from agd_optax._paths import path_to_keys, path_to_str
from agd_optax._roles import (
    Role,
    RoleError,
    bias,
    conv,
    dense,
    embedding,
    norm,
)

__all__ = ["nnx_roles"]


def _module_roles(module: Any) -> dict[str, tuple[Role, int]]:
    """Roles of a module's own parameters by module type, each with the number of axes the
    parameter has in one unstacked module; empty for types AGD does not know."""
    from flax import nnx

    if isinstance(module, nnx.Linear):
        return {"kernel": (dense(), 2), "bias": (bias(), 1)}
    if isinstance(module, nnx.LinearGeneral):
        n_batch = len(module.batch_axis)
        n_in = len(module.in_features)
        n_out = len(module.out_features)
        ins = tuple(range(n_batch, n_batch + n_in))
        outs = tuple(range(n_batch + n_in, n_batch + n_in + n_out))
        kernel = dense(ins, outs, stack_axes=tuple(range(n_batch)))
        return {"kernel": (kernel, n_batch + n_in + n_out), "bias": (bias(), n_batch + n_out)}
    if isinstance(module, nnx.ConvTranspose):
        in_axis, out_axis = (-1, -2) if module.transpose_kernel else (-2, -1)
        kernel = conv(in_axis=in_axis, out_axis=out_axis)
        return {"kernel": (kernel, len(module.kernel_size) + 2), "bias": (bias(), 1)}
    if isinstance(module, nnx.Conv):
        kernel = conv(groups=module.feature_group_count)
        return {"kernel": (kernel, len(module.kernel_size) + 2), "bias": (bias(), 1)}
    if isinstance(module, nnx.Embed):
        return {"embedding": (embedding(), 2)}
    norms = (nnx.BatchNorm, nnx.LayerNorm, nnx.RMSNorm, nnx.GroupNorm, nnx.InstanceNorm)
    if isinstance(module, norms):
        return {"scale": (norm(), 1), "bias": (norm(), 1)}
    return {}


def _stacked(role: Role, n: int) -> Role:
    """``role`` for a parameter with ``n`` more leading axes, each a stack axis."""
    if n == 0 or role.kind == "bias":
        return role

    def shift(axes: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(a + n if a >= 0 else a for a in axes)

    return dataclasses.replace(
        role,
        in_axes=shift(role.in_axes),
        out_axes=shift(role.out_axes),
        spatial_axes=None if role.spatial_axes is None else shift(role.spatial_axes),
        stack_axes=tuple(range(n)) + shift(role.stack_axes),
    )


def nnx_roles(model: Any) -> Callable[[Any], Any]:
    """The AGD roles of an NNX model's parameters, read off its module types.

    ``nnx.Linear`` and ``nnx.LinearGeneral`` kernels (attention projections in
    ``nnx.MultiHeadAttention`` included, with their fan-in, fan-out and batch axes) are dense,
    ``nnx.Conv`` kernels are convolutions with the module's ``feature_group_count`` (so grouped and
    depthwise convolutions are exact), ``nnx.ConvTranspose`` kernels convolutions,
    ``nnx.Embed`` tables embeddings, their biases move with them, and the scales and offsets of
    ``BatchNorm``, ``LayerNorm``, ``RMSNorm``, ``GroupNorm`` and ``InstanceNorm`` are norm-layer
    parameters. Modules stacked by ``nnx.vmap`` (and run by ``nnx.scan``) have leading axes
    beyond their own parameter shapes: those are stack axes, each slice a separate layer, for
    norm-layer parameters too. Parameters of other modules are inferred from their names, as
    without this helper. A table that is both an embedding and the output head
    (``Embed.attend``) reads as an embedding here, as :func:`agd_optax.trace_roles` reads it: an
    embedding's role is the map ``features -> num_embeddings``, the head's map, so the two uses
    agree.

    Args:
      model: an ``nnx.Module``.

    Returns:
      A callable mapping a parameter tree of ``model`` (``nnx.state(model, nnx.Param)``, pure or
      not, or the gradients) to its roles: pass it as ``agd(roles=nnx_roles(model))``.

    Example:
      >>> import agd_optax
      >>> from flax import nnx
      >>> model = nnx.MultiHeadAttention(num_heads=2, in_features=8, decode=False,
      ...                                rngs=nnx.Rngs(0))
      >>> tx = agd_optax.agd(roles=agd_optax.nnx_roles(model))
      >>> optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    """
    from flax import nnx

    if not isinstance(model, nnx.Module):
        raise TypeError(f"nnx_roles expects an nnx.Module, got {type(model).__name__}")
    known: dict[tuple[str, ...], Role] = {}
    for module_path, module in nnx.iter_modules(model):
        prefix = tuple(str(k) for k in module_path)
        for name, (role, ndim) in _module_roles(module).items():
            param = getattr(module, name, None)
            if param is None:
                continue
            value = param.get_value() if hasattr(param, "get_value") else param
            stacked = len(value.shape) - ndim
            if stacked < 0:
                raise RoleError(
                    f"'{path_to_str(prefix + (name,))}' has fewer axes than a "
                    f"{type(module).__name__} {name} ({ndim}); nnx_roles cannot read it"
                )
            known[prefix + (name,)] = _stacked(role, stacked)

    def roles(params: Any) -> Any:
        flat, treedef = jax.tree_util.tree_flatten_with_path(params)
        all_keys = [path_to_keys(p) for p, _ in flat]
        sib = siblings_of(all_keys, [tuple(x.shape) for _, x in flat])
        out, undecided = [], []
        for keys, (_, x) in zip(all_keys, flat):
            role = known.get(keys)
            if role is None:
                try:
                    role = infer_role(keys, tuple(x.shape), sib[keys[:-1]])
                except _Undecided as e:
                    e.why += f" (the model has no module AGD knows at '{path_to_str(keys[:-1])}')"
                    undecided.append(e)
            out.append(role)
        raise_undecided(undecided)
        return jax.tree_util.tree_unflatten(treedef, out)

    return roles
