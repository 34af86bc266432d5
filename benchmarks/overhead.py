"""What AGD costs per step, against SGD, Adam, Prodigy and DoG: ``python -m benchmarks.overhead``.

Four measurements, written as markdown to stdout and to ``<out>/overhead_<device>.md``:

1. **One optimizer update alone** (``tx.update`` + ``optax.apply_updates``) on parameter trees
   shaped like ResNet-18 (CIFAR), ResNet-50 (ImageNet) and GPT-2 small, in float32 and bfloat16.
   Device time: ``--steps`` updates run inside one jitted ``lax.scan`` (the gradient is rescaled
   by the step index, so nothing is hoisted out of the loop), after a warm-up call, timed around
   ``block_until_ready``; the median over ``--repeats`` calls, the optimizers interleaved in the
   same process. Reported as milliseconds per update and as a ratio to plain SGD.
2. **A whole training step** (forward, backward, update) for an MLP and for ResNet-50 on
   synthetic data, AGD against SGD with momentum (``--size small`` for a CPU, ``full`` for an
   accelerator).
3. **Optimizer state** in bytes per parameter (arrays that scale with the parameters) plus the
   fixed bytes of its scalars.
4. **What XLA emits** for one update on the ResNet-50 tree: the fusions (kernels) of the compiled
   program, split into passes over whole leaves (reductions, elementwise) and small fusions.
"""

from __future__ import annotations

import argparse
import collections
import math
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import agd_optax

OPTIMIZERS: dict[str, Callable[[], optax.GradientTransformation]] = {
    "sgd": lambda: optax.sgd(0.1),
    "sgd_momentum": lambda: optax.sgd(0.1, momentum=0.9),
    "adam": lambda: optax.adam(1e-3),
    "prodigy": lambda: optax.contrib.prodigy(),
    "dog": lambda: optax.contrib.dog(),
    # A reference for the cost of norms: SGD after optax's global-norm clipping, which also reads
    # every gradient in a reduction before its elementwise pass.
    "sgd_clip": lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1)),
    "agd": lambda: agd_optax.agd(),
}
BASELINE = "sgd"


# --------------------------------------------------------------------------------------------------
# Parameter trees (shapes only; arrays are made per dtype when timed).


def _pure_param_shapes(model_fn: Callable[[], Any]) -> dict:
    """The parameter shapes of an NNX model built abstractly (no memory, no compute)."""
    from flax import nnx

    abstract = nnx.eval_shape(model_fn)
    return nnx.to_pure_dict(nnx.state(abstract, nnx.Param))


def resnet18_cifar() -> dict:
    from flax import nnx

    from benchmarks.models import make_model

    return _pure_param_shapes(
        lambda: make_model("resnet18", num_classes=10, input_shape=(32, 32, 3), rngs=nnx.Rngs(0))
    )


def resnet50_imagenet() -> dict:
    from flax import nnx

    from benchmarks.models import make_model

    return _pure_param_shapes(
        lambda: make_model(
            "resnet50", num_classes=1000, input_shape=(224, 224, 3), rngs=nnx.Rngs(0)
        )
    )


def gpt2_small(
    layers: int = 12, d: int = 768, heads: int = 12, vocab: int = 50257, context: int = 1024
) -> dict:
    """GPT-2 small's parameters with Flax names, so AGD infers every role: token and position
    ``embedding`` tables (the output layer is tied to the token table), attention ``query``,
    ``key``, ``value`` kernels ``(d, heads, head_dim)`` and ``out`` kernel ``(heads, head_dim, d)``
    as in ``DenseGeneral``/``LinearGeneral``, MLP ``kernel``/``bias``, LayerNorm ``scale``/``bias``."""
    f32 = jnp.float32
    s = lambda *shape: jax.ShapeDtypeStruct(shape, f32)  # noqa: E731
    hd = d // heads

    def layer_norm():
        return {"scale": s(d), "bias": s(d)}

    def block():
        attn = {
            name: {"kernel": s(d, heads, hd), "bias": s(heads, hd)}
            for name in ("query", "key", "value")
        }
        attn["out"] = {"kernel": s(heads, hd, d), "bias": s(d)}
        return {
            "ln_1": layer_norm(),
            "attn": attn,
            "ln_2": layer_norm(),
            "mlp": {
                "fc": {"kernel": s(d, 4 * d), "bias": s(4 * d)},
                "proj": {"kernel": s(4 * d, d), "bias": s(d)},
            },
        }

    return {
        "wte": {"embedding": s(vocab, d)},
        "wpe": {"embedding": s(context, d)},
        "h": {str(i): block() for i in range(layers)},
        "ln_f": layer_norm(),
    }


def tiny_mlp() -> dict:
    s = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)  # noqa: E731
    return {
        "dense_0": {"kernel": s(32, 64), "bias": s(64)},
        "ln": {"scale": s(64), "bias": s(64)},
        "dense_1": {"kernel": s(64, 10)},
    }


def tiny_cnn() -> dict:
    s = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)  # noqa: E731
    return {
        "conv_0": {"kernel": s(3, 3, 3, 8)},
        "conv_1": {"kernel": s(3, 3, 8, 16)},
        "head": {"kernel": s(16, 10)},
    }


TREES: dict[str, Callable[[], dict]] = {
    "resnet18_cifar": resnet18_cifar,
    "resnet50_imagenet": resnet50_imagenet,
    "gpt2_small": gpt2_small,
    "tiny_mlp": tiny_mlp,
    "tiny_cnn": tiny_cnn,
}


def num_params(tree: Any) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def host_arrays(shapes: Any, seed: int) -> Any:
    """Standard normal float32 NumPy arrays of the given shapes."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: rng.standard_normal(x.shape, dtype=np.float32), shapes)


def to_device(host: Any, dtype) -> Any:
    """Fresh device arrays (copies, safe to donate) of ``host`` in ``dtype``."""
    return jax.tree.map(lambda a: jnp.array(a, dtype=dtype), host)


# --------------------------------------------------------------------------------------------------
# 1. The update alone.


def _update_loop(tx: optax.GradientTransformation, steps: int):
    """``steps`` updates in one jitted scan; each step's gradient is ``grads * (1 + i / steps)``."""

    def loop(params, state, grads):
        def body(carry, i):
            p, s = carry
            scale = 1.0 + i.astype(jnp.float32) / steps
            g = jax.tree.map(lambda x: x * scale.astype(x.dtype), grads)
            u, s = tx.update(g, s, p)
            return (optax.apply_updates(p, u), s), None

        (params, state), _ = jax.lax.scan(body, (params, state), jnp.arange(steps))
        return params, state

    return jax.jit(loop, donate_argnums=(0, 1))


def time_updates(
    names: Sequence[str], shapes: Any, dtype, steps: int, repeats: int
) -> dict[str, float]:
    """Median seconds per update of each optimizer (interleaved), on arrays of ``shapes``."""
    host = host_arrays(shapes, seed=0)
    grads = to_device(host_arrays(shapes, seed=1), dtype)
    loops, carries = {}, {}
    for name in names:
        tx = OPTIMIZERS[name]()
        params = to_device(host, dtype)
        state = tx.init(params)
        state = jax.tree.map(jnp.copy, state)  # States aliasing the params cannot be donated.
        loops[name] = _update_loop(tx, steps)
        carries[name] = jax.block_until_ready(loops[name](params, state, grads))  # Warm-up.
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(repeats):
        for name in names:
            t0 = time.perf_counter()
            carries[name] = jax.block_until_ready(loops[name](*carries[name], grads))
            times[name].append((time.perf_counter() - t0) / steps)
    del carries
    return {name: statistics.median(ts) for name, ts in times.items()}


# --------------------------------------------------------------------------------------------------
# 2. A whole training step.


def _train_models(size: str) -> dict[str, dict[str, Any]]:
    """Model, input shape and batch of each whole-step workload, per ``--size``."""
    if size == "tiny":
        return {
            "mlp": dict(arch="fcn", depth=3, width=64, input_shape=(64,), classes=10, batch=16),
            # A small 1-D convnet in smoke runs: compiling a ResNet's step takes half a minute.
            "cnn1d": dict(arch="cnn1d", depth=3, width=8, input_shape=(32, 1), classes=10, batch=4),
        }
    if size == "small":
        return {
            "mlp": dict(arch="fcn", depth=4, width=1024, input_shape=(784,), classes=10, batch=128),
            "resnet50": dict(
                arch="resnet50", width=64, input_shape=(64, 64, 3), classes=1000, batch=8
            ),
        }
    return {
        "mlp": dict(arch="fcn", depth=8, width=4096, input_shape=(784,), classes=10, batch=1024),
        "resnet50": dict(
            arch="resnet50", width=64, input_shape=(224, 224, 3), classes=1000, batch=128
        ),
    }


def time_train_steps(spec: dict[str, Any], steps: int, repeats: int) -> dict[str, float]:
    """Median seconds per training step (forward, backward, update) for AGD and SGD-momentum."""
    from flax import nnx

    from benchmarks.models import make_model

    key_x, key_y = jax.random.split(jax.random.key(0))
    x = jax.random.normal(key_x, (spec["batch"], *spec["input_shape"]), jnp.float32)
    y = jax.random.randint(key_y, (spec["batch"],), 0, spec["classes"])
    runs, states = {}, {}
    for name in ("sgd_momentum", "agd"):
        model = make_model(
            spec["arch"],
            num_classes=spec["classes"],
            input_shape=spec["input_shape"],
            depth=spec.get("depth"),
            width=spec["width"],
            rngs=nnx.Rngs(0),
        )
        tx = (
            agd_optax.agd(roles=agd_optax.nnx_roles(model)) if name == "agd" else OPTIMIZERS[name]()
        )
        optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
        graphdef, state = nnx.split((model, optimizer))

        def loop(state, graphdef=graphdef):
            def body(state, _):
                model, optimizer = nnx.merge(graphdef, state)

                def loss_fn(model):
                    logits = model(x)
                    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

                loss, grads = nnx.value_and_grad(loss_fn)(model)
                optimizer.update(model, grads)
                return nnx.state((model, optimizer)), loss

            return jax.lax.scan(body, state, length=steps)

        runs[name] = jax.jit(loop, donate_argnums=0)
        states[name], _ = jax.block_until_ready(runs[name](jax.tree.map(jnp.copy, state)))
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name in runs:
            t0 = time.perf_counter()
            states[name], _ = jax.block_until_ready(runs[name](states[name]))
            times[name].append((time.perf_counter() - t0) / steps)
    return {name: statistics.median(ts) for name, ts in times.items()}


# --------------------------------------------------------------------------------------------------
# 3. State bytes.


def state_bytes(tx: optax.GradientTransformation, shapes: Any, dtype) -> tuple[float, int]:
    """(bytes per parameter of the state's arrays, bytes of its scalars), for params in ``dtype``."""
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype), shapes)
    state = jax.eval_shape(tx.init, params)
    per_param = fixed = 0
    for leaf in jax.tree.leaves(state):
        nbytes = math.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize
        if leaf.ndim == 0:
            fixed += nbytes
        else:
            per_param += nbytes
    return per_param / num_params(shapes), fixed


# --------------------------------------------------------------------------------------------------
# 4. What XLA emits.

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\S+?)\s+([\w\-]+)\((.*?)\)(.*)$")
_SHAPE = re.compile(r"\w+\[([\d,]*)\]")


def _elements(shape: str) -> int:
    m = _SHAPE.match(shape)
    if not m:  # A tuple or a token.
        return 0
    dims = [int(d) for d in m.group(1).split(",") if d]
    return math.prod(dims)


def fusion_counts(hlo_text: str, min_leaf: int) -> dict[str, int]:
    """Counts the kernels of a compiled module's entry computation.

    A fusion reading an array of at least ``min_leaf`` elements is a pass over a leaf: an
    *elementwise* pass if it writes as many elements as it reads, a *reduction* pass otherwise.
    Other fusions work on norms and scalars (``small``). ``other`` counts the entry's remaining
    operations (copies, custom calls) besides parameters, constants, tuples and bitcasts.
    """
    start = hlo_text.find("\nENTRY")
    if start < 0:
        raise ValueError("no ENTRY computation in the HLO text")
    body = hlo_text[start:].split("\n}", 1)[0].splitlines()[1:]
    sizes: dict[str, int] = {}
    counts = collections.Counter()
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
        kind = re.search(r"kind=(k\w+)", rest)
        counts[f"kind_{kind.group(1) if kind else 'unknown'}"] += 1
        reads = [sizes.get(o.strip().lstrip("%"), 0) for o in operands.split(",")]
        biggest = max(reads, default=0)
        if biggest >= min_leaf:
            counts["elementwise" if sizes[name] >= biggest else "reduction"] += 1
        else:
            counts["small"] += 1
    return dict(counts)


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


# --------------------------------------------------------------------------------------------------
# The program.


def device_name() -> str:
    dev = jax.devices()[0]
    if dev.platform == "cpu":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "_", dev.device_kind.lower()).strip("_")


def device_description() -> str:
    dev = jax.devices()[0]
    if dev.platform == "cpu":
        return f"a {os.cpu_count()}-core CPU ({platform.machine()})"
    return f"one {dev.device_kind}"


def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.overhead", description=__doc__.splitlines()[0]
    )
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
    p.add_argument("--repeats", type=int, default=7, help="timed calls; the median is reported")
    p.add_argument(
        "--size",
        choices=("tiny", "small", "full"),
        default=None,
        help="whole-step models: small for a CPU, full for an accelerator "
        "(default: small on CPU, full otherwise)",
    )
    p.add_argument("--train-steps", type=int, default=None, help="steps per timed call")
    p.add_argument("--no-train-step", dest="train_step", action="store_false")
    p.add_argument("--hlo-tree", default="resnet50_imagenet", help="tree of the HLO count")
    p.add_argument("--no-hlo", dest="hlo", action="store_false")
    p.add_argument("--out", default=os.path.join("benchmarks", "results"))
    p.add_argument("--quick", action="store_true", help="tiny trees and few steps (a smoke run)")
    args = p.parse_args(argv)
    if args.quick:
        args.trees, args.steps, args.repeats = "tiny_mlp,tiny_cnn", 3, 2
        args.size = args.size or "tiny"
        args.hlo_tree = "tiny_cnn"
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
        for name in ("sgd", "agd"):
            hlo = update_hlo(OPTIMIZERS[name](), hlo_shapes, jnp.float32)
            counts = fusion_counts(hlo, min_leaf=smallest_weight(hlo_shapes))
            result["hlo"][name] = counts
        result["hlo_tree"] = args.hlo_tree
        result["hlo_leaves"] = len(jax.tree.leaves(hlo_shapes))
    return result


def markdown(result: dict[str, Any], args: argparse.Namespace, command: str) -> str:
    names = args.optimizers
    others = [n for n in names if n != BASELINE]
    lines = [
        f"# Optimizer cost on {device_description()}",
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
        lines += [
            "",
            f"## What XLA emits for one float32 update ({result['hlo_tree']}, "
            f"{result['hlo_leaves']} leaves)",
            "",
            "Fusions (kernels) in the compiled program's entry computation. A pass over a leaf "
            "reads a whole leaf: a reduction (into a norm) or an elementwise pass (writes a whole "
            "leaf: the fused update-and-apply, or a temporary such as a squared gradient); small "
            "fusions work on per-leaf norms and scalars.",
            "",
            "| optimizer | fusions | reduction passes | elementwise passes | small fusions "
            "| other ops |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for name, c in result["hlo"].items():
            lines.append(
                f"| {name} | {c.get('fusions', 0)} | {c.get('reduction', 0)} | "
                f"{c.get('elementwise', 0)} | {c.get('small', 0)} | {c.get('other', 0)} |"
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    command = "uv run python -m benchmarks.overhead " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    result = run(args)
    text = markdown(result, args, command.strip())
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"overhead_{device_name()}.md")
    with open(path, "w") as f:
        f.write(text + "\n")
    print(text, flush=True)
    print(f"wrote {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
