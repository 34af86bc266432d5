"""The runs of the rule that chose ``hypergradient_tower``'s default steps.

``uv run python -m benchmarks.compare.hyper_defaults``.

Runs SGD towers of height 0 to 3 on the four targets optax tests its optimizers on, from initial
step sizes 1e-4 to 0.1, for every candidate first-level step (``hyper_learning_rate``) and step of
the levels above (``meta_learning_rate``), and applies the rule written in docs/hypergradient.md
("Hypergradient descent and towers"): the largest hyper step with no blow-up at height 1, then the
largest meta step with no blow-up at heights 2 and 3, counting only the (target, initial step)
pairs where plain SGD at that fixed step does not blow up itself. A blow-up is a loss or learned
step that is not finite at the end, or a final loss above the initial one.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import agd_optax
from benchmarks.reporting import hardware_description, json_safe

HYPER_CANDIDATES = (1e-5, 1e-6, 1e-7)
META_CANDIDATES = (1.0, 1e-1, 1e-2, 1e-3, 1e-4)
INITIAL_STEPS = (1e-4, 1e-3, 1e-2, 1e-1)
STEPS = 30_000  # As optax's common optimizer tests run them.


def _parabola():
    target = jnp.array([1.0, -1.0, 1.0])
    return jnp.array([-1.0, 10.0, 1.0]), lambda x: jnp.sum((x - target) ** 2)


def _rosenbrock():
    return jnp.zeros(2), lambda x: (1.0 - x[0]) ** 2 + 100.0 * (x[1] - x[0] ** 2) ** 2


def _matrix_parabola():
    target = jnp.array([[3.0, -2.0], [1.0, 4.0]])
    return jnp.zeros((2, 2)), lambda x: jnp.sum((x - target) ** 2)


def _mixed():
    t1, t2 = jnp.array([1.0, -1.0, 2.0]), jnp.array([[1.0, 0.0], [-1.0, 1.0]])
    return (
        jnp.zeros(3),
        jnp.zeros((2, 2)),
    ), lambda x: jnp.sum((x[0] - t1) ** 2) + jnp.sum((x[1] - t2) ** 2)


TARGETS: dict[str, Callable[[], tuple[Any, Callable]]] = {
    "parabola": _parabola,
    "rosenbrock": _rosenbrock,
    "matrix_parabola": _matrix_parabola,
    "mixed": _mixed,
}


def _tower(height: int, hyper: float | None, meta: float | None, lr):
    if height == 0:
        return optax.sgd(lr)
    steps: dict[str, Any] = {"hyper_learning_rate": hyper}
    if meta is not None:  # Height 1 has no level above the first.
        steps["meta_learning_rate"] = meta
    return agd_optax.hypergradient_tower(optax.sgd, height, learning_rate=lr, **steps)


def _learned(state: Any, height: int) -> jax.Array:
    """1 when every learned step of the tower is finite."""
    if height == 0:
        return jnp.asarray(True)
    levels = agd_optax.learned_hyperparams(state)
    return jnp.all(jnp.stack([jnp.isfinite(v) for lv in levels for v in lv.values()]))


def run_config(target: str, height: int, hyper, meta, steps: int = STEPS) -> list[dict[str, Any]]:
    """One tower configuration on one target from every initial step (vmapped)."""
    x0, loss = TARGETS[target]()

    @jax.jit
    def run(lr):
        tx = _tower(height, hyper, meta, lr)

        def body(carry, _):
            x, s = carry
            u, s = tx.update(jax.grad(loss)(x), s, x)
            return (optax.apply_updates(x, u), s), None

        (x, s), _ = jax.lax.scan(body, (x0, tx.init(x0)), length=steps)
        return loss(x0), loss(x), _learned(s, height)

    first, last, finite = (np.asarray(a) for a in jax.vmap(run)(jnp.asarray(INITIAL_STEPS)))
    return [
        {
            "target": target,
            "height": height,
            "hyper": hyper,
            "meta": meta,
            "lr": lr,
            "initial_loss": float(first[i]),
            "final_loss": float(last[i]),
            "blew_up": bool(not np.isfinite(last[i]) or not finite[i] or last[i] > first[i]),
        }
        for i, lr in enumerate(INITIAL_STEPS)
    ]


def choose(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The rule: counted pairs, then the largest hyper step, then the largest meta step."""
    counted = {(r["target"], r["lr"]) for r in records if r["height"] == 0 and not r["blew_up"]}

    def passes(height: int, hyper, meta=None) -> bool:
        rows = [
            r
            for r in records
            if r["height"] == height
            and r["hyper"] == hyper
            and (meta is None or r["meta"] == meta)
            and (r["target"], r["lr"]) in counted
        ]
        return bool(rows) and not any(r["blew_up"] for r in rows)

    hyper = next((k for k in HYPER_CANDIDATES if passes(1, k)), None)
    meta = None
    if hyper is not None:
        meta = next(
            (m for m in META_CANDIDATES if passes(2, hyper, m) and passes(3, hyper, m)), None
        )
    return {
        "counted": sorted(counted),
        "hyper_learning_rate": hyper if hyper is not None else HYPER_CANDIDATES[-1],
        "meta_learning_rate": meta if meta is not None else META_CANDIDATES[-1],
        "hyper_passed": hyper is not None,
        "meta_passed": meta is not None,
    }


def markdown(result: dict[str, Any]) -> str:
    meta, records, choice = result["meta"], result["records"], result["choice"]
    lines = [
        "# hypergradient_tower's default steps: the rule's runs",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"Hardware: {meta['hardware']}; {meta['wall_s']:.0f} s. SGD towers on optax's four test "
        f"targets, {meta['steps']} steps, from the initial steps {list(INITIAL_STEPS)}. Each "
        "cell: the worst final/initial loss over the counted (target, initial step) pairs, and "
        "the number of pairs that blew up (non-finite, or final loss above the initial).",
        "",
        f"Counted pairs (plain SGD does not blow up): {len(choice['counted'])} of "
        f"{len(TARGETS) * len(INITIAL_STEPS)}: "
        + ", ".join(f"{t} from {lr:g}" for t, lr in choice["counted"]),
        "",
        "| height | hyper step | meta step | worst final/initial | blow-ups |",
        "| --- | --- | --- | --- | --- |",
    ]
    counted = {tuple(p) for p in choice["counted"]}
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in records:
        if (r["target"], r["lr"]) in counted:
            groups.setdefault((r["height"], r["hyper"], r["meta"]), []).append(r)
    for (height, hyper, meta_step), rows in groups.items():
        ratios = [
            r["final_loss"] / r["initial_loss"] if np.isfinite(r["final_loss"]) else float("inf")
            for r in rows
        ]
        lines.append(
            f"| {height} | {hyper if hyper is not None else '-'} | "
            f"{meta_step if meta_step is not None else '-'} | {max(ratios):.3g} | "
            f"{sum(r['blew_up'] for r in rows)} of {len(rows)} |"
        )
    lines += [
        "",
        f"Chosen: hyper_learning_rate = {choice['hyper_learning_rate']:g}"
        + ("" if choice["hyper_passed"] else " (no candidate passed: the smallest)")
        + f", meta_learning_rate = {choice['meta_learning_rate']:g}"
        + ("" if choice["meta_passed"] else " (no candidate passed: the smallest)")
        + ".",
    ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.compare.hyper_defaults", description=__doc__.splitlines()[0]
    )
    p.add_argument("--out", default=os.path.join("benchmarks", "results"))
    p.add_argument("--steps", type=int, default=STEPS)
    args = p.parse_args(argv)
    command = "uv run python -m benchmarks.compare.hyper_defaults " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)
    )
    t0 = time.perf_counter()
    records = []
    for target in TARGETS:
        records += run_config(target, 0, None, None, args.steps)
        for hyper in HYPER_CANDIDATES:
            records += run_config(target, 1, hyper, None, args.steps)
            for meta_step in META_CANDIDATES:
                for height in (2, 3):
                    records += run_config(target, height, hyper, meta_step, args.steps)
        print(f"{target}: done ({time.perf_counter() - t0:.0f} s)", flush=True)
    result = {
        "records": records,
        "choice": choose(records),
        "meta": {
            "command": command.strip(),
            "hardware": hardware_description(),
            "steps": args.steps,
            "wall_s": time.perf_counter() - t0,
        },
    }
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, "hypergradient_defaults")
    with open(stem + ".json", "w") as f:
        json.dump(json_safe(result), f, indent=1)
        f.write("\n")
    text = markdown(result)
    with open(stem + ".md", "w") as f:
        f.write(text)
    print(text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
