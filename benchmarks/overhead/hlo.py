"""What XLA emits for one optimizer update: counting the kernels of the compiled program."""

from __future__ import annotations

import collections
import math
import re
from typing import Any

import jax
import optax

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\S+?)\s+([\w\-]+)\((.*?)\)(.*)$")
_SHAPE = re.compile(r"\w+\[([\d,]*)\]")


def _elements(shape: str) -> int:
    m = _SHAPE.match(shape)
    if not m:  # A tuple or a token.
        return 0
    dims = [int(d) for d in m.group(1).split(",") if d]
    return math.prod(dims)


def _computations(hlo_text: str) -> tuple[str, dict[str, list[str]]]:
    """The entry computation's name and every computation's instruction lines, by name."""
    out: dict[str, list[str]] = {}
    entry = None
    for block in re.split(r"\n(?=ENTRY |%)", hlo_text):
        header = re.match(r"(ENTRY )?%?([\w.\-]+) ", block)
        if not header or "{" not in block.split("\n", 1)[0]:
            continue
        out[header.group(2)] = block.split("\n}", 1)[0].splitlines()[1:]
        if header.group(1):
            entry = header.group(2)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    return entry, out


def fusion_counts(hlo_text: str, min_leaf: int) -> dict[str, int]:
    """Counts the kernels of a compiled module's entry computation and of the bodies of its
    loops (``while``), where the step's passes over the leaves may run.

    A fusion reading an array of at least ``min_leaf`` elements is a pass over a leaf: an
    *elementwise* pass if it writes as many elements as it reads, a *reduction* pass otherwise.
    Other fusions work on norms and scalars (``small``). ``other`` counts the remaining
    operations (copies, custom calls, loops) besides parameters, constants, tuples and bitcasts.
    ``distinct`` counts the fusions that are different programs (output shape and fused
    computation, names and metadata aside): XLA's CPU compiler builds one kernel per distinct
    program, so what it takes to compile the update grows with ``distinct`` far faster than
    with ``fusions``.
    """
    entry, computations = _computations(hlo_text)
    body, pending = [], [entry]
    while pending:
        lines = computations.get(pending.pop(), [])
        body += lines
        pending += [m.group(1) for line in lines for m in re.finditer(r"body=%([\w.\-]+)", line)]
    sizes: dict[str, int] = {}
    counts = collections.Counter()
    programs: set[tuple[str, str]] = set()
    for line in body:
        m = _INSTR.match(line)
        if not m:
            continue
        name, shape, op, operands, rest = m.groups()
        sizes[name] = _elements(shape)
        if op in ("parameter", "constant", "tuple", "get-tuple-element", "bitcast"):
            continue
        if op != "fusion":
            counts["other"] += 1
            continue
        counts["fusions"] += 1
        called = re.search(r"calls=%?([\w.\-]+)", rest)
        programs.add((shape, _program(computations.get(called.group(1), []) if called else [])))
        kind = re.search(r"kind=(k\w+)", rest)
        counts[f"kind_{kind.group(1) if kind else 'unknown'}"] += 1
        reads = [sizes.get(o.strip().lstrip("%"), 0) for o in operands.split(",")]
        biggest = max(reads, default=0)
        if biggest >= min_leaf:
            counts["elementwise" if sizes[name] >= biggest else "reduction"] += 1
        else:
            counts["small"] += 1
    counts["distinct"] = len(programs)
    return dict(counts)


def _program(lines: list[str]) -> str:
    """A fused computation's text with its instruction names and metadata taken out."""
    text = "\n".join(re.sub(r",\s*metadata=\{[^}]*\}", "", line) for line in lines)
    return re.sub(r"%[\w.\-]+", "%", text)


def smallest_weight(shapes: Any) -> int:
    """Elements of the tree's smallest leaf of 2 or more axes: the threshold of a leaf pass (the
    per-position norms of a convolution, the largest small arrays, are far smaller)."""
    return min(math.prod(x.shape) for x in jax.tree.leaves(shapes) if len(x.shape) >= 2)


def update_hlo(tx: optax.GradientTransformation, shapes: Any, dtype) -> str:
    """The optimized HLO of one ``update`` + ``apply_updates`` on trees of ``shapes``."""
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype), shapes)
    state = jax.eval_shape(tx.init, params)

    def step(grads, state, params):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return jax.jit(step).lower(params, state, params).compile().as_text()
