"""The step's plan: what the kernel computes with, fixed by the tree's layouts and shapes.

Per leaf, the axes its norms sum over, its scale, its owner (a bias) and the smallest squared
norm its plain sum of squares gives to rounding (below that the step takes its rescaled pass).
A plan is built once per tree structure, shapes and roles, and cached, so it is a static
argument of ``jax.jit``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import numpy as np

from agd_optax._layouts import Layout
from agd_optax._sharding import MeshAxes

__all__ = ["LeafPlan", "Plan", "make_plan"]


@dataclasses.dataclass(frozen=True)
class LeafPlan:
    """What the step needs of one leaf.

    Attributes:
      kind: ``"weight"``, ``"bias"`` or ``"norm"``.
      reduce_axes: axes summed in each of its norms.
      kept_axes: the other axes, along which its norms are laid out (a conv's kernel positions,
        stacked weights): its norms have the shape of the leaf on these axes.
      spatial: a weight's kernel positions, as positions in ``kept_axes``: its whole norms (a
        bias's divisors) are its norms summed over them.
      divisor_axes: the leaf's axes that its divisors span: ``kept_axes``, or a bias's stack
        axes (its owner's whole norms are laid out along the owner's stack axes).
      scale: s(W), for a bias its owner's.
      threshold: the smallest squared norm that its plain sum of squares gives to rounding (the
        summed entries times ``tiny / eps``: squares below ``tiny`` may be flushed or
        subnormal); 0 for a bias, whose own norm divides nothing.
      summed: how many entries each of its norms sums (over the global shape).
      size: how many norms it has (on its local shape).
      owner: a bias's weight (its index), else None.
      reduce_mesh, spatial_mesh, rest_mesh: inside ``shard_map``, the mesh axes sharding its
        reduced axes, its kernel positions, and the axes it does not reduce.
    """

    kind: str
    reduce_axes: tuple[int, ...]
    kept_axes: tuple[int, ...]
    spatial: tuple[int, ...]
    divisor_axes: tuple[int, ...]
    scale: float
    threshold: float
    summed: int
    size: int
    owner: int | None = None
    reduce_mesh: tuple[str, ...] = ()
    spatial_mesh: tuple[str, ...] = ()
    rest_mesh: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True, eq=False)
class Plan:
    """A tree's step (hashed by identity: :func:`make_plan` returns one plan per cached key).

    Attributes:
      leaves: one :class:`LeafPlan` per leaf, in flattening order.
      depth: L, the number of weights.
      mesh_axes: every mesh axis sharding some leaf (inside ``shard_map``; else empty).
    """

    leaves: tuple[LeafPlan, ...]
    depth: int
    mesh_axes: tuple[str, ...]

    def measured(self, kinds: Sequence[str]) -> tuple[int, ...]:
        """The positions of the leaves of the given kinds, in leaf order."""
        return tuple(i for i, leaf in enumerate(self.leaves) if leaf.kind in kinds)

    def per_entry(self, value, indices: Sequence[int]) -> np.ndarray:
        """A static vector over the norms of the leaves at ``indices``, flattened in that
        order: ``value(leaf)`` at each of a leaf's norms."""
        return np.concatenate(
            [np.full(self.leaves[i].size, float(value(self.leaves[i]))) for i in indices]
        )

    def spread(self, indices: Sequence[int]) -> dict[tuple[str, ...], np.ndarray]:
        """Inside ``shard_map``: the positions of the flat norms of the leaves at ``indices``
        by the mesh axes they are spread over (those sharding the axes that a norm is not
        summed over)."""
        out: dict[tuple[str, ...], list[int]] = {}
        start = 0
        for i in indices:
            leaf = self.leaves[i]
            out.setdefault(leaf.rest_mesh, []).extend(range(start, start + leaf.size))
            start += leaf.size
        return {axes: np.asarray(entries) for axes, entries in out.items()}


def _names(mesh: MeshAxes | None, axes: Sequence[int]) -> tuple[str, ...]:
    return () if mesh is None else tuple(name for a in axes for name in mesh[a])


def _leaf_plan(i, layouts, shapes, global_shapes, mesh, acc) -> LeafPlan:
    lay, shape = layouts[i], shapes[i]
    kept = tuple(a for a in range(len(shape)) if a not in lay.reduce_axes)
    info = np.finfo(acc)
    summed = math.prod(global_shapes[i][a] for a in lay.reduce_axes)
    return LeafPlan(
        kind=lay.kind,
        reduce_axes=lay.reduce_axes,
        kept_axes=kept,
        spatial=tuple(kept.index(a) for a in lay.spatial_axes),
        divisor_axes=tuple(range(len(lay.stack_axes))) if lay.kind == "bias" else kept,
        scale=lay.scale,
        threshold=0.0 if lay.kind == "bias" else summed * float(info.tiny) / float(info.eps),
        summed=summed,
        size=math.prod(shape[a] for a in kept),
        owner=lay.owner,
        reduce_mesh=_names(mesh, lay.reduce_axes),
        spatial_mesh=_names(mesh, lay.spatial_axes),
        rest_mesh=_names(mesh, kept),
    )


@functools.lru_cache(maxsize=64)
def _cached_plan(layouts, shapes, global_shapes, mesh_axes, acc) -> Plan:
    leaves = tuple(
        _leaf_plan(i, layouts, shapes, global_shapes, None if mesh_axes is None else m, acc)
        for i, m in enumerate(mesh_axes or [None] * len(layouts))
    )
    all_mesh = sorted({n for axes in (mesh_axes or ()) for names in axes for n in names})
    return Plan(leaves=leaves, depth=sum(lay.count for lay in layouts), mesh_axes=tuple(all_mesh))


def make_plan(
    layouts: Sequence[Layout],
    shapes: Sequence[tuple[int, ...]],
    global_shapes: Sequence[tuple[int, ...]],
    mesh_axes: Sequence[MeshAxes] | None,
    acc: np.dtype,
) -> Plan:
    """The (cached) plan of a tree's step.

    Args:
      layouts: one per leaf, from :func:`agd_optax.resolve_layouts` on the global shapes.
      shapes: the leaves' (local) shapes.
      global_shapes: the leaves' global shapes (``shapes`` outside ``shard_map``).
      mesh_axes: inside ``shard_map``, per leaf and array axis the mesh axes sharding it.
      acc: the accumulation dtype of the norms.
    """
    return _cached_plan(
        tuple(layouts),
        tuple(tuple(s) for s in shapes),
        tuple(tuple(s) for s in global_shapes),
        None if mesh_axes is None else tuple(mesh_axes),
        np.dtype(acc),
    )
