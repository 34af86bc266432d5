"""The values of the jaxpr reading behind :func:`agd_optax.trace_roles`: what is known of each
value of the computation (which parameter axes it runs over, whether it is a constant, a
normalisation's statistics, an index count or a one-hot), and how each parameter is used."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from agd_optax._roles import Role

Axes = tuple[int, ...]

# Primitives that change neither values' meaning nor axes.
SAME = {
    "convert_element_type",
    "copy",
    "copy_p",
    "reduce_precision",
    "sharding_constraint",
    "mesh_cast",
    "reshard",
    "pvary",
    "slice",
    "dynamic_slice",
    "rev",
    "pad",
    "neg",
    "stop_gradient",
    "optimization_barrier",
}
BINARY = {"add", "add_any", "sub", "mul", "div"}


@dataclasses.dataclass(frozen=True)
class View:
    """A value that is (a reshaped, transposed, sliced... copy of) parameter leaf ``leaf``."""

    leaf: int
    axes: tuple[Axes, ...]  # Per array axis: the leaf axes it runs over, major to minor.
    selected: frozenset[int] = frozenset()  # Leaf axes indexed away, one slice at a time.


@dataclasses.dataclass(frozen=True)
class Info:
    """What the analysis knows of one jaxpr value."""

    views: tuple[View, ...] = ()
    const: bool = False  # Depends on no input of fn.
    normalised: bool = False  # Carries 1/sqrt of statistics (a normalisation layer's output).
    # The output of weight ops: (weight leaf, per array axis the weight's leaf axes it runs over).
    outputs: tuple[tuple[int, tuple[Axes, ...]], ...] = ()
    # Index patterns, one flag per array axis: the axis along which the value counts 0, 1, 2...
    # (``iota``), and the axis along which it is a one-hot indicator of integer ids (``eq`` of ids
    # with such a count, as ``jax.nn.one_hot`` makes it).
    iota: tuple[bool, ...] = ()
    one_hot: tuple[bool, ...] = ()


EMPTY = Info()
CONST = Info(const=True)


@dataclasses.dataclass(frozen=True)
class Use:
    kind: str  # "weight", "lookup", "bias", "norm" or "other".
    what: str  # For error messages.
    role: Role | None = None
    owner: int | None = None


def where(eqn: Any) -> str:
    """`` at file:line (function)`` of the user's code that made ``eqn`` (for messages), or ""."""
    try:
        frames = eqn.source_info.traceback.frames
    except AttributeError:
        return ""
    jax_dir = os.sep + "jax" + os.sep
    for frame in frames:
        if jax_dir not in frame.file_name and "agd_optax" not in frame.file_name:
            return f" at {frame.file_name}:{frame.line_num} ({frame.function_name})"
    return ""
