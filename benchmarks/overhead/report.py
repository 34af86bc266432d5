"""The cost benchmark's markdown report."""

from __future__ import annotations

import argparse
import re
from typing import Any

import jax
import optax

from benchmarks.overhead.zoo import BASELINE
from benchmarks.reporting import hardware_description


def device_name() -> str:
    dev = jax.devices()[0]
    if dev.platform == "cpu":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "_", dev.device_kind.lower()).strip("_")


def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def markdown(result: dict[str, Any], args: argparse.Namespace, command: str) -> str:
    names = args.optimizers
    others = [n for n in names if n != BASELINE]
    lines = [
        f"# Optimizer cost on {hardware_description()}",
        "",
        f"Command: `{command}`",
        "",
        f"JAX {jax.__version__} ({jax.default_backend()}), optax {optax.__version__}.",
        "",
        "## One update alone (update + apply_updates)",
        "",
        f"Milliseconds per update: the median of {args.repeats} timed calls of {args.steps} "
        "updates in one jitted `lax.scan`, after a warm-up call; in brackets, the ratio to plain "
        "SGD measured in the same process.",
        "",
        "| tree | parameters | dtype | sgd ms | " + " | ".join(others) + " |",
        "| --- | --- | --- | --- | " + " | ".join("---" for _ in others) + " |",
    ]
    for row in result["updates"]:
        base = row["seconds"][BASELINE]
        cells = [f"{_ms(row['seconds'][n])} ({row['seconds'][n] / base:.2f}x)" for n in others]
        lines.append(
            f"| {row['tree']} | {row['params'] / 1e6:.2f} M | {row['dtype']} | {_ms(base)} | "
            + " | ".join(cells)
            + " |"
        )
    if result["train_steps"]:
        lines += [
            "",
            "## Whole training step (forward, backward, update), float32",
            "",
            "Synthetic data, softmax cross-entropy; milliseconds per step, median as above.",
            "",
            "| model | size | batch | input | sgd_momentum ms | agd ms | agd / sgd_momentum |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for row in result["train_steps"]:
            s, spec = row["seconds"], row["spec"]
            shape = "x".join(str(d) for d in spec["input_shape"])
            lines.append(
                f"| {row['model']} | {row['size']} | {spec['batch']} | {shape} | "
                f"{_ms(s['sgd_momentum'])} | {_ms(s['agd'])} | {s['agd'] / s['sgd_momentum']:.3f} |"
            )
    lines += [
        "",
        "## Optimizer state",
        "",
        "Bytes per parameter of the state's arrays, for float32 and bfloat16 parameters, and the "
        f"fixed bytes of its scalars (tree: {result['state_bytes_tree']}).",
        "",
        "| optimizer | bytes/param (float32) | bytes/param (bfloat16) | fixed bytes (float32) |",
        "| --- | --- | --- | --- |",
    ]
    for name, by in result["state_bytes"].items():
        lines.append(
            f"| {name} | {by['float32'][0]:g} | {by['bfloat16'][0]:g} | {by['float32'][1]} |"
        )
    if result["hlo"]:
        lines += _hlo_section(result)
    return "\n".join(lines)


def _hlo_section(result: dict[str, Any]) -> list[str]:
    """The table of what XLA emits for one update, per optimizer."""
    lines = [
        "",
        f"## What XLA emits for one float32 update ({result['hlo_tree']}, "
        f"{result['hlo_leaves']} leaves)",
        "",
        "Fusions (kernels) in the compiled program's entry computation. A pass over a leaf "
        "reads a whole leaf: a reduction (into a norm) or an elementwise pass (writes a whole "
        "leaf: the fused update-and-apply, or a temporary such as a squared gradient); small "
        "fusions work on per-leaf norms and scalars; distinct fusions are the different "
        "programs among them (XLA builds each once).",
        "",
        "| optimizer | fusions | distinct fusions | reduction passes | elementwise passes "
        "| small fusions | other ops |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, c in result["hlo"].items():
        lines.append(
            f"| {name} | {c.get('fusions', 0)} | {c.get('distinct', 0)} | "
            f"{c.get('reduction', 0)} | {c.get('elementwise', 0)} | {c.get('small', 0)} | "
            f"{c.get('other', 0)} |"
        )
    return lines
