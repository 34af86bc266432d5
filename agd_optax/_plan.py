"""The step's plan: what the kernel computes with, fixed by the tree's layouts and shapes.

Per leaf, the axes its norms sum over, its scale, its owner (a bias) and the smallest squared
norm its plain sum of squares gives to rounding (below that the guard takes the rescaled path).
And the *groups*: leaves of the same shape, type, reduced axes and sharding, stacked on a new
leading axis so that one batched reduction gives all their norms, whatever the depth of the
network (a network of repeated blocks has a few groups). A plan is built once per tree
structure, shapes and roles, and cached, so it is a static argument of ``jax.jit``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Hashable, Sequence

import numpy as np

from agd_optax._layouts import Layout
from agd_optax._sharding import MeshAxes

__all__ = ["Group", "LeafPlan", "Plan", "make_plan"]


@dataclasses.dataclass(frozen=True)
class LeafPlan:
    """What the step needs of one leaf.

    Attributes:
      kind: ``"weight"``, ``"bias"`` or ``"norm"``.
      reduce_axes: axes summed in each of its norms (kept as size-1 axes).
      spatial_axes: a weight's kernel positions, whose norms are summed into its whole norm.
      scale: s(W), for a bias its owner's.
      threshold: the smallest squared norm that its plain sum of squares gives to rounding (the
        summed entries times ``tiny / eps``: squares below ``tiny`` may be flushed or
        subnormal); 0 for a bias, whose own norm divides nothing.
      owner: a bias's weight (its index), else None.
      bias_shape: a bias's shape for its owner's whole norms: its stack dims, then 1s.
      reduce_mesh, spatial_mesh, rest_mesh: inside ``shard_map``, the mesh axes sharding its
        reduced axes, its kernel positions, and the axes it does not reduce.
    """

    kind: str
    reduce_axes: tuple[int, ...]
    spatial_axes: tuple[int, ...]
    scale: float
    threshold: float
    owner: int | None = None
    bias_shape: tuple[int, ...] = ()
    reduce_mesh: tuple[str, ...] = ()
    spatial_mesh: tuple[str, ...] = ()
    rest_mesh: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Group:
    """Leaves stacked on a new leading axis and reduced together.

    Attributes:
      members: the leaves' indices (flattening order).
      reduce_axes: the members' reduced axes (their own: the stack axis is not counted).
      reduce_mesh, rest_mesh: as in :class:`LeafPlan`, shared by the members.
    """

    members: tuple[int, ...]
    reduce_axes: tuple[int, ...]
    reduce_mesh: tuple[str, ...] = ()
    rest_mesh: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True, eq=False)
class Plan:
    """A tree's step (hashed by identity: :func:`make_plan` returns one plan per cached key).

    Attributes:
      leaves: one :class:`LeafPlan` per leaf, in flattening order.
      groups: the leaves stacked together: the same shape, type, reduced axes and sharding.
      depth: L, the number of weights.
      mesh_axes: every mesh axis sharding some leaf (inside ``shard_map``; else empty).
    """

    leaves: tuple[LeafPlan, ...]
    groups: tuple[Group, ...]
    where: tuple[tuple[int, int], ...]  # Per leaf: (its group, its position in the group).
    depth: int
    mesh_axes: tuple[str, ...]


def _names(mesh: MeshAxes | None, axes: Sequence[int]) -> tuple[str, ...]:
    return () if mesh is None else tuple(name for a in axes for name in mesh[a])


def _leaf_plan(i, layouts, shapes, global_shapes, mesh, acc) -> LeafPlan:
    lay, shape = layouts[i], shapes[i]
    rest = tuple(a for a in range(len(shape)) if a not in lay.reduce_axes)
    info = np.finfo(acc)
    summed = math.prod(global_shapes[i][a] for a in lay.reduce_axes)
    n_stack = len(lay.stack_axes)
    return LeafPlan(
        kind=lay.kind,
        reduce_axes=lay.reduce_axes,
        spatial_axes=lay.spatial_axes,
        scale=lay.scale,
        threshold=0.0 if lay.kind == "bias" else summed * float(info.tiny) / float(info.eps),
        owner=lay.owner,
        bias_shape=shape[:n_stack] + (1,) * (len(shape) - n_stack) if lay.kind == "bias" else (),
        reduce_mesh=_names(mesh, lay.reduce_axes),
        spatial_mesh=_names(mesh, lay.spatial_axes),
        rest_mesh=_names(mesh, rest),
    )


def _groups(leaves, layouts, shapes, types, mesh_axes) -> tuple[Group, ...]:
    """Leaves grouped by shape, type (dtype, sharding), reduced axes and mesh axes, in order of
    first appearance."""
    keys: dict[tuple, list[int]] = {}
    for i, lay in enumerate(layouts):
        mesh = None if mesh_axes is None else mesh_axes[i]
        keys.setdefault((shapes[i], types[i], lay.reduce_axes, mesh), []).append(i)
    return tuple(
        Group(
            tuple(members),
            layouts[members[0]].reduce_axes,
            leaves[members[0]].reduce_mesh,
            leaves[members[0]].rest_mesh,
        )
        for members in keys.values()
    )


@functools.lru_cache(maxsize=64)
def _cached_plan(layouts, shapes, types, global_shapes, mesh_axes, acc) -> Plan:
    leaves = tuple(
        _leaf_plan(i, layouts, shapes, global_shapes, None if mesh_axes is None else m, acc)
        for i, m in enumerate(mesh_axes or [None] * len(layouts))
    )
    all_mesh = sorted({n for axes in (mesh_axes or ()) for names in axes for n in names})
    groups = _groups(leaves, layouts, shapes, types, mesh_axes)
    where = {i: (k, m) for k, g in enumerate(groups) for m, i in enumerate(g.members)}
    return Plan(
        leaves=leaves,
        groups=groups,
        where=tuple(where[i] for i in range(len(leaves))),
        depth=sum(lay.count for lay in layouts),
        mesh_axes=tuple(all_mesh),
    )


def make_plan(
    layouts: Sequence[Layout],
    shapes: Sequence[tuple[int, ...]],
    types: Sequence[Hashable],
    global_shapes: Sequence[tuple[int, ...]],
    mesh_axes: Sequence[MeshAxes] | None,
    acc: np.dtype,
) -> Plan:
    """The (cached) plan of a tree's step.

    Args:
      layouts: one per leaf, from :func:`agd_optax.resolve_layouts` on the global shapes.
      shapes: the leaves' (local) shapes.
      types: per leaf, anything hashable that must agree for leaves to be stacked: its dtype and
        the sharding of its type.
      global_shapes: the leaves' global shapes (``shapes`` outside ``shard_map``).
      mesh_axes: inside ``shard_map``, per leaf and array axis the mesh axes sharding it.
      acc: the accumulation dtype of the norms.
    """
    return _cached_plan(
        tuple(layouts),
        tuple(tuple(s) for s in shapes),
        tuple(types),
        tuple(tuple(s) for s in global_shapes),
        None if mesh_axes is None else tuple(mesh_axes),
        np.dtype(acc),
    )
