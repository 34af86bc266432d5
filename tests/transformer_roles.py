"""AGD's roles of the benchmark transformer written out by hand: the reference that
``agd_optax.trace_roles`` and ``nnx_roles`` are checked against."""

from typing import Any

from flax import nnx

import agd_optax
from benchmarks.models.transformer import Transformer


def _flat(state: Any) -> dict[tuple, Any]:
    return {tuple(str(k) for k in key): v for key, v in nnx.to_flat_state(state)}


def transformer_roles(model: Transformer) -> dict[str, Any]:
    """AGD roles of every parameter of ``model``, spelled out (the roles ``agd_optax.trace_roles``
    reads off the forward pass), as a nested dict with the parameters' paths for
    ``agd(roles=...)``. A scanned model's block parameters carry a leading stack axis; every
    table, a tied one included, is an embedding, the matrix ``width -> rows`` (a tied head's map).
    """
    stack = (0,) if model.scan_layers else ()
    n = len(stack)
    weights = {
        ("attn", "query", "kernel"): agd_optax.dense(n, (n + 1, n + 2), stack_axes=stack),
        ("attn", "key", "kernel"): agd_optax.dense(n, (n + 1, n + 2), stack_axes=stack),
        ("attn", "value", "kernel"): agd_optax.dense(n, (n + 1, n + 2), stack_axes=stack),
        ("attn", "out", "kernel"): agd_optax.dense((n, n + 1), n + 2, stack_axes=stack),
        ("fc1", "kernel"): agd_optax.dense(n, n + 1, stack_axes=stack),
        ("fc2", "kernel"): agd_optax.dense(n, n + 1, stack_axes=stack),
    }
    roles: dict[tuple[str, ...], agd_optax.Role] = {}
    for key in _flat(nnx.state(model, nnx.Param)):
        in_block = key[0] == "blocks"
        block_key = (key[1:] if model.scan_layers else key[2:]) if in_block else ()
        if block_key in weights:
            roles[key] = weights[block_key]
        elif key[-1] == "embedding":
            roles[key] = agd_optax.embedding()
        elif key == ("head", "kernel"):
            roles[key] = agd_optax.dense()
        elif key[-1] in ("scale", "bias") and key[-2] in ("ln1", "ln2", "ln_f"):
            roles[key] = agd_optax.norm(stack_axes=stack if in_block else ())
        elif key[-1] == "bias":
            roles[key] = agd_optax.bias()
        else:
            raise ValueError(f"no AGD role for transformer parameter '{'/'.join(key)}'")
    nested: dict[str, Any] = {}
    for key, role in roles.items():
        node = nested
        for k in key[:-1]:
            node = node.setdefault(k, {})
        node[key[-1]] = role
    return nested
