"""The cost benchmark's command line: ``python -m benchmarks.overhead``."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from benchmarks.overhead.compile_cost import COMPILE_OPTIMIZERS, measure
from benchmarks.overhead.compile_cost import markdown as compile_markdown
from benchmarks.overhead.hlo import fusion_counts, smallest_weight, update_hlo
from benchmarks.overhead.measure import _train_models, state_bytes, time_train_steps, time_updates
from benchmarks.overhead.report import device_name, markdown
from benchmarks.overhead.zoo import BASELINE, OPTIMIZERS, TREES, num_params
from benchmarks.reporting import hardware_description

DESCRIPTION = "What AGD costs per step, against SGD, Adam, Prodigy and DoG."


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.overhead", description=DESCRIPTION)
    p.add_argument(
        "--trees",
        default="resnet18_cifar,resnet50_imagenet,gpt2_small",
        help=f"comma-separated, of {', '.join(TREES)}",
    )
    p.add_argument(
        "--optimizers",
        default=",".join(OPTIMIZERS),
        help="comma-separated, of " + ", ".join(OPTIMIZERS),
    )
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--steps", type=int, default=20, help="updates per timed call (one scan)")
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed calls, the median reported (7; 3 with --compile)",
    )
    p.add_argument(
        "--size",
        choices=("tiny", "small", "full"),
        default=None,
        help="whole-step models: small for a CPU, full for an accelerator "
        "(default: small on CPU, full otherwise)",
    )
    p.add_argument("--train-steps", type=int, default=None, help="steps per timed call")
    p.add_argument("--no-train-step", dest="train_step", action="store_false")
    p.add_argument(
        "--hlo-tree",
        default=None,
        help="tree of the HLO count (default: resnet50_imagenet; tiny_cnn with --quick)",
    )
    p.add_argument("--no-hlo", dest="hlo", action="store_false")
    p.add_argument("--out", default=os.path.join("benchmarks", "results"))
    p.add_argument("--quick", action="store_true", help="tiny trees and few steps (a smoke run)")
    p.add_argument(
        "--compile",
        action="store_true",
        help="instead: the compile time and the un-jitted call time of agd and agd_momentum's "
        "update, as ratios to optax.adam's, on trees of dense layers with biases",
    )
    p.add_argument(
        "--leaves", default="10,100,500,2000", help="with --compile: comma-separated tree sizes"
    )
    p.add_argument("--no-eager", dest="eager", action="store_false", help="with --compile")
    args = p.parse_args(argv)
    args.leaves = [int(n) for n in args.leaves.split(",") if n.strip()]
    if args.compile:
        args.repeats = 3 if args.repeats is None else args.repeats
        return args
    args.repeats = 7 if args.repeats is None else args.repeats
    if args.quick:
        args.trees, args.steps, args.repeats = "tiny_mlp,tiny_cnn", 3, 2
        args.size = args.size or "tiny"
    if args.hlo_tree is None:
        args.hlo_tree = "tiny_cnn" if args.quick else "resnet50_imagenet"
    if args.size is None:
        args.size = "small" if jax.default_backend() == "cpu" else "full"
    if args.train_steps is None:
        args.train_steps = {"tiny": 2, "small": 5, "full": 20}[args.size]
    args.trees = [t.strip() for t in args.trees.split(",") if t.strip()]
    args.optimizers = [o.strip() for o in args.optimizers.split(",") if o.strip()]
    if BASELINE not in args.optimizers:
        args.optimizers.insert(0, BASELINE)
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    for t in args.trees + [args.hlo_tree]:
        if t not in TREES:
            p.error(f"unknown tree {t!r}; expected some of {', '.join(TREES)}")
    for o in args.optimizers:
        if o not in OPTIMIZERS:
            p.error(f"unknown optimizer {o!r}; expected some of {', '.join(OPTIMIZERS)}")
    return args


HLO_OPTIMIZERS = ("sgd", "adam", "agd", "agd_momentum")  # Counted on --hlo-tree.


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every measurement; returns the raw numbers (seconds, bytes, counts)."""
    result: dict[str, Any] = {"updates": [], "train_steps": [], "state_bytes": {}, "hlo": {}}
    shapes = {t: TREES[t]() for t in args.trees}
    for tree in args.trees:
        for dtype in args.dtypes:
            print(f"timing updates: {tree} {dtype}", file=sys.stderr, flush=True)
            secs = time_updates(
                args.optimizers, shapes[tree], jnp.dtype(dtype), args.steps, args.repeats
            )
            result["updates"].append(
                dict(tree=tree, dtype=dtype, params=num_params(shapes[tree]), seconds=secs)
            )
    if args.train_step:
        for model, spec in _train_models(args.size).items():
            print(f"timing train steps: {model} ({args.size})", file=sys.stderr, flush=True)
            secs = time_train_steps(spec, args.train_steps, args.repeats)
            result["train_steps"].append(dict(model=model, size=args.size, spec=spec, seconds=secs))
    bytes_tree = shapes[args.trees[0]]
    for name in args.optimizers:
        result["state_bytes"][name] = {
            dtype: state_bytes(OPTIMIZERS[name](), bytes_tree, jnp.dtype(dtype))
            for dtype in ("float32", "bfloat16")
        }
    result["state_bytes_tree"] = args.trees[0]
    if args.hlo:
        hlo_shapes = TREES[args.hlo_tree]()
        print(f"compiling for the HLO count: {args.hlo_tree}", file=sys.stderr, flush=True)
        for name in HLO_OPTIMIZERS:
            hlo = update_hlo(OPTIMIZERS[name](), hlo_shapes, jnp.float32)
            counts = fusion_counts(hlo, min_leaf=smallest_weight(hlo_shapes))
            result["hlo"][name] = counts
        result["hlo_tree"] = args.hlo_tree
        result["hlo_leaves"] = len(jax.tree.leaves(hlo_shapes))
    return result


def run_compile(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The compile and eager measurements of ``--compile``, one row per tree size."""
    names = list(COMPILE_OPTIMIZERS)
    rows = []
    for leaves in args.leaves:
        print(f"compile and eager cost: {leaves} leaves", file=sys.stderr, flush=True)
        rows.append(dict(leaves=leaves, **measure(leaves, names, args.repeats, args.eager)))
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    command = "uv run python -m benchmarks.overhead " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    if args.compile:
        rows = run_compile(args)
        text = compile_markdown(
            rows, list(COMPILE_OPTIMIZERS), command.strip(), hardware_description()
        )
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, f"overhead_compile_{device_name()}.md")
        with open(path, "w") as f:
            f.write(text + "\n")
        print(text, flush=True)
        print(f"wrote {path}", flush=True)
        return 0
    result = run(args)
    text = markdown(result, args, command.strip())
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"overhead_{device_name()}.md")
    with open(path, "w") as f:
        f.write(text + "\n")
    print(text, flush=True)
    print(f"wrote {path}", flush=True)
    return 0
