"""What an update costs outside the step itself: compiling it, and calling it without ``jit``.

``python -m benchmarks.overhead --compile`` measures, on trees of dense layers with biases from
10 to 2,000 leaves, for ``agd``, ``agd_momentum`` and ``optax.adam`` in one process:

* **compile**: seconds from a fresh ``jax.jit(update)`` to its compiled executable (tracing,
  lowering and XLA's compilation: ``jit(f).lower(...).compile()``), every JAX cache cleared
  before each measurement, as at the start of a job;
* **eager**: seconds of one ``tx.update`` called without ``jit`` on concrete arrays (a notebook,
  a debugger), after one warm-up call, timed around ``block_until_ready``.

Each is the median of ``repeats`` measurements, the optimizers interleaved, and is reported as
a ratio to Adam's.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import agd_optax

COMPILE_OPTIMIZERS: dict[str, Callable[[], optax.GradientTransformation]] = {
    "adam": lambda: optax.adam(1e-3),
    "agd": lambda: agd_optax.agd(),
    "agd_momentum": lambda: agd_optax.agd_momentum(),
}
COMPILE_BASELINE = "adam"
WIDTHS = (16, 24, 32, 48, 64)


def dense_stack(leaves: int) -> dict:
    """A tree of ``leaves // 2`` Flax-named dense layers with biases (``Dense_i``: ``kernel``
    ``(w_i, w_{i+1})`` and ``bias``), the widths cycling through ``WIDTHS``, so the tree holds
    five kernel shapes and five bias shapes, each repeated, as the blocks of a deep network do."""
    if leaves < 2 or leaves % 2:
        raise ValueError(f"a dense stack has an even number of leaves (2 or more), got {leaves}")
    tree = {}
    for i in range(leaves // 2):
        d_in, d_out = WIDTHS[i % len(WIDTHS)], WIDTHS[(i + 1) % len(WIDTHS)]
        tree[f"Dense_{i}"] = {
            "kernel": jax.ShapeDtypeStruct((d_in, d_out), jnp.float32),
            "bias": jax.ShapeDtypeStruct((d_out,), jnp.float32),
        }
    return tree


def _arrays(shapes: Any, seed: int) -> Any:
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape, np.float32)), shapes)


def compile_seconds(tx: optax.GradientTransformation, shapes: Any) -> float:
    """Seconds from a fresh ``jax.jit(tx.update)`` to its executable, with every cache cleared."""
    state = jax.eval_shape(tx.init, shapes)
    jax.clear_caches()
    t0 = time.perf_counter()
    jax.jit(lambda g, s, p: tx.update(g, s, p)).lower(shapes, state, shapes).compile()
    return time.perf_counter() - t0


def eager_seconds(tx: optax.GradientTransformation, params: Any, grads: Any, state: Any) -> float:
    """Seconds of one un-jitted ``tx.update`` (the caller warms it up first)."""
    t0 = time.perf_counter()
    jax.block_until_ready(tx.update(grads, state, params))
    return time.perf_counter() - t0


def measure(
    leaves: int, names: Sequence[str], repeats: int, eager: bool = True
) -> dict[str, dict[str, float]]:
    """Median compile and eager seconds of each optimizer on a dense stack of ``leaves`` leaves."""
    shapes = dense_stack(leaves)
    txs = {name: COMPILE_OPTIMIZERS[name]() for name in names}
    compile_times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(repeats):
        for name in names:
            compile_times[name].append(compile_seconds(txs[name], shapes))
    result = {"compile": {n: statistics.median(ts) for n, ts in compile_times.items()}}
    if eager:
        params, grads = _arrays(shapes, 0), _arrays(shapes, 1)
        states = {name: txs[name].init(params) for name in names}
        for name in names:  # Warm-up: the first call compiles each operation it runs.
            eager_seconds(txs[name], params, grads, states[name])
        eager_times: dict[str, list[float]] = {name: [] for name in names}
        for _ in range(repeats):
            for name in names:
                eager_times[name].append(eager_seconds(txs[name], params, grads, states[name]))
        result["eager"] = {n: statistics.median(ts) for n, ts in eager_times.items()}
    return result


def markdown(rows: list[dict[str, Any]], names: Sequence[str], command: str, hardware: str) -> str:
    others = [n for n in names if n != COMPILE_BASELINE]
    header = ["leaves", f"{COMPILE_BASELINE} compile s"]
    header += [f"{n} compile / {COMPILE_BASELINE}" for n in others]
    header += [f"{COMPILE_BASELINE} eager ms"] + [f"{n} eager / {COMPILE_BASELINE}" for n in others]
    lines = [
        f"# Compile and eager cost of an update on {hardware}",
        "",
        f"Command: `{command}`",
        "",
        f"JAX {jax.__version__} ({jax.default_backend()}), optax {optax.__version__}. Trees of "
        f"dense layers with biases, widths cycling through {WIDTHS}, float32.",
        "",
        "| " + " | ".join(header) + " |",
        "| " + " | ".join("---" for _ in header) + " |",
    ]
    for row in rows:
        c, e = row["compile"], row.get("eager", {})
        base_c, base_e = c[COMPILE_BASELINE], e.get(COMPILE_BASELINE)
        cells = [str(row["leaves"]), f"{base_c:.3g}"]
        cells += [f"{c[n] / base_c:.2f}x" for n in others]
        if base_e is None:
            cells += ["-"] * (1 + len(others))
        else:
            cells += [f"{base_e * 1e3:.3g}"] + [f"{e[n] / base_e:.2f}x" for n in others]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
