"""Paths and shapes of pytree leaves, as the rest of the library names them in its messages."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

__all__ = ["leaf_shape", "path_to_keys", "path_to_str"]


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
    """Keys joined by ``/`` (``<root>`` for the empty path), as error messages name a leaf."""
    return "/".join(keys) if keys else "<root>"


def leaf_shape(x: Any) -> tuple[int, ...]:
    """A leaf's shape: arrays, NumPy scalars and ``jax.ShapeDtypeStruct`` alike."""
    return tuple(int(d) for d in (x.shape if hasattr(x, "shape") else np.shape(x)))
