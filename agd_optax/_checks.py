"""Checks of what AGD is given: the gain, and updates that fit the parameters."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from agd_optax._paths import path_to_keys, path_to_str


def check_same_structure(updates: Any, params: Any) -> None:
    """Refuses updates whose tree or leaf shapes differ from the params', naming the leaves."""
    # jaxlib's PyTreeDef comes without type information (a compiled extension), hence Any.
    u_def: Any = jax.tree.structure(updates)
    p_def: Any = jax.tree.structure(params)
    if u_def == p_def:
        for (path, u), p in zip(
            jax.tree_util.tree_flatten_with_path(updates)[0], p_def.flatten_up_to(params)
        ):
            if np.shape(u) != np.shape(p):
                raise ValueError(
                    f"AGD: leaf '{path_to_str(path_to_keys(path))}' has shape {np.shape(u)} in "
                    f"the updates but {np.shape(p)} in the params"
                )
        return
    u_paths = [
        path_to_str(path_to_keys(p)) for p, _ in jax.tree_util.tree_flatten_with_path(updates)[0]
    ]
    p_paths = [
        path_to_str(path_to_keys(p)) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]
    ]
    only_u = sorted(set(u_paths) - set(p_paths))
    only_p = sorted(set(p_paths) - set(u_paths))
    raise ValueError(
        "AGD: the updates and params trees differ: "
        f"leaves only in updates {only_u[:5]}, only in params {only_p[:5]} "
        f"(updates {len(u_paths)} leaves, params {len(p_paths)})"
    )


def check_gain(gain: Any) -> None:
    """Refuses a constant gain that is not a finite positive number (a schedule or a traced
    value, as under ``optax.inject_hyperparams``, is taken as it is)."""
    if callable(gain):
        return
    if isinstance(gain, (bool, np.bool_)):
        raise TypeError(f"AGD: gain must be a positive number or a schedule, got {gain!r}")
    try:
        value = np.asarray(gain)
    except jax.errors.TracerArrayConversionError:
        return  # A traced gain: known only when the step runs.
    except Exception:  # noqa: BLE001 - anything NumPy cannot read is not a number.
        value = None
    if value is None or value.size != 1 or not np.issubdtype(value.dtype, np.number):
        raise TypeError(f"AGD: gain must be a positive number or a schedule, got {gain!r}")
    if np.iscomplexobj(value) or not (np.isfinite(value) and value > 0):
        raise ValueError(
            f"AGD: gain must be a finite number above 0 (1.0 is the published algorithm), got "
            f"{gain!r}"
        )
