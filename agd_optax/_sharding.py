"""``param_specs``: the mesh axes that shard each leaf inside ``jax.shard_map``, and the leaves'
global shapes, from which AGD's layouts are read."""

from __future__ import annotations

import math
from typing import Any

import jax
from jax.sharding import PartitionSpec

from agd_optax._paths import path_to_keys, path_to_str

__all__ = ["MeshAxes", "global_shapes", "mesh_axes_per_leaf"]

MeshAxes = tuple[tuple[str, ...], ...]  # Per array axis, the mesh axes that shard it.


def mesh_axes_per_leaf(updates: Any, specs: Any) -> list[MeshAxes]:
    """Per leaf, per array axis, the mesh axes sharding it, from a (prefix) tree of PartitionSpecs."""
    is_spec = lambda x: isinstance(x, PartitionSpec) or x is None  # noqa: E731
    try:
        full = jax.tree.map(
            lambda spec, sub: jax.tree.map(lambda _: spec, sub), specs, updates, is_leaf=is_spec
        )
    except (ValueError, TypeError) as e:
        raise ValueError(
            f"AGD: param_specs does not match the parameters (a pytree or prefix of PartitionSpecs "
            f"is expected). JAX says: {e}"
        ) from None
    flat_specs = jax.tree.leaves(full, is_leaf=is_spec)
    flat = jax.tree_util.tree_flatten_with_path(updates)[0]
    out = []
    for (path, x), spec in zip(flat, flat_specs):
        spec = () if spec is None else tuple(spec)
        if len(spec) > x.ndim:
            raise ValueError(
                f"AGD: the PartitionSpec {spec} of leaf '{path_to_str(path_to_keys(path))}' has more "
                f"entries than its {x.ndim} axes"
            )
        per_axis: list[tuple[str, ...]] = []
        for entry in spec + (None,) * (x.ndim - len(spec)):
            if entry is None:
                per_axis.append(())
            elif isinstance(entry, str):
                per_axis.append((entry,))
            else:
                per_axis.append(tuple(entry))
        out.append(tuple(per_axis))
    return out


def global_shapes(updates: Any, mesh_axes: list[MeshAxes]) -> Any:
    """Shape-only stand-ins for the leaves with their global (unsharded) shapes."""
    leaves, treedef = jax.tree.flatten(updates)
    out = []
    for x, axes in zip(leaves, mesh_axes):
        try:
            shape = tuple(
                d * math.prod(jax.lax.axis_size(name) for name in names)
                for d, names in zip(x.shape, axes)
            )
        except NameError as e:
            raise ValueError(
                f"AGD: param_specs names mesh axes, but update() runs where they are not bound "
                f"({e}). param_specs is for update() inside jax.shard_map on parameter shards; "
                "under jit with sharded arrays, or on whole parameters, leave it out"
            ) from None
        out.append(jax.ShapeDtypeStruct(shape, x.dtype))
    return jax.tree.unflatten(treedef, out)
