"""The calibration that chose AGD's shipped variant: every candidate on the two calibration
workloads, scored on a validation split, over seeds.

``python -m benchmarks.variants`` runs every candidate (``--candidates`` for some) and appends one
JSON line per run to ``--out``; ``--table`` prints the markdown table of a results file without
training. A run is one jitted ``lax.scan`` per epoch (no checkpoints or metric files), on the
evidence suite's models and data: digits FCN (40 epochs) and MNIST-1D MLP (60 epochs), batch 128,
cross-entropy. 20% of each training set (a fixed permutation) is the validation set; the test
sets are not read.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from benchmarks.variants.candidates import CANDIDATES, Candidate

WORKLOADS = {
    "digits_fcn": dict(dataset="digits", depth=3, width=256, epochs=40),
    "mnist1d_mlp": dict(dataset="mnist1d", depth=3, width=256, epochs=60),
}
VALIDATION_FRACTION = 0.2
BATCH = 128
DEFAULT_OUT = os.path.join("benchmarks", "results", "variants_calibration.jsonl")


def split_data(workload: str, seed: int, data_dir: str | None):
    """(train_x, train_y, val_x, val_y, num_classes, input_shape): the last 20% of a fixed
    permutation of the training set is held out."""
    from benchmarks.data import load_digits, load_mnist1d

    w = WORKLOADS[workload]
    data = load_digits(seed) if w["dataset"] == "digits" else load_mnist1d(data_dir)
    perm = np.random.default_rng(1234).permutation(data.num_train)
    n = int(round(data.num_train * (1 - VALIDATION_FRACTION)))
    tr, va = perm[:n], perm[n:]
    return (data.train_x[tr], data.train_y[tr], data.train_x[va], data.train_y[va],
            data.num_classes, data.input_shape)  # fmt: skip


def train(workload: str, candidate: Candidate, seed: int, data_dir: str | None = None):
    """Per-epoch rows (epoch, train loss, train accuracy, validation loss, validation accuracy)."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    import agd_optax
    from benchmarks.models import make_model

    w = WORKLOADS[workload]
    tx_, ty_, vx, vy, classes, shape = split_data(workload, seed, data_dir)
    model = make_model("fcn", num_classes=classes, input_shape=shape, depth=w["depth"],
                       width=w["width"], rngs=nnx.Rngs(seed))  # fmt: skip
    roles = agd_optax.nnx_roles(model)
    if candidate.agd_init:
        key = jax.random.fold_in(jax.random.key(seed), 1)
        params = nnx.state(model, nnx.Param)
        nnx.update(model, agd_optax.reinitialize(key, params, roles))
    graphdef, params = nnx.split(model, nnx.Param)
    params = jax.tree.map(lambda v: v[...], params, is_leaf=lambda v: isinstance(v, nnx.Variable))
    tx = candidate.build(roles)

    def loss_fn(p, x, y):
        logits = nnx.merge(graphdef, p)(x)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, jnp.mean(jnp.argmax(logits, -1) == y)

    @jax.jit
    def epoch(p, s, xs, ys):
        def step(carry, batch):
            p, s = carry
            (loss, acc), g = jax.value_and_grad(loss_fn, has_aux=True)(p, *batch)
            u, s = tx.update(g, s, p)
            return (optax.apply_updates(p, u), s), (loss, acc)

        (p, s), (loss, acc) = jax.lax.scan(step, (p, s), (xs, ys))
        return p, s, loss.mean(), acc.mean()

    @jax.jit
    def evaluate(p, s):
        p = p if candidate.eval_params is None else candidate.eval_params(s, p)
        return loss_fn(p, vx, vy)

    state = tx.init(params)
    steps = len(tx_) // BATCH
    rows = []
    for e in range(1, w["epochs"] + 1):
        order = np.random.default_rng([seed, e]).permutation(len(tx_))[: steps * BATCH]
        order = order.reshape(steps, BATCH)
        params, state, loss, acc = epoch(params, state, tx_[order], ty_[order])
        val_loss, val_acc = evaluate(params, state)
        rows.append((e, float(loss), float(acc), float(val_loss), float(val_acc)))
    return rows


def table(records: Sequence[dict[str, Any]]) -> str:
    """Markdown: per candidate run, final validation accuracy (mean ± std over seeds) per workload."""
    acc = collections.defaultdict(list)
    for r in records:
        acc[(r["name"], r["workload"])].append(r["final"])
    lines = [
        "| candidate | what it is | " + " | ".join(WORKLOADS) + " | mean of the two |",
        "| --- | --- | " + " | ".join("---" for _ in WORKLOADS) + " | --- |",
    ]
    for name, cand in CANDIDATES.items():
        if not any(key[0] == name for key in acc):
            continue  # Not run in this file.
        cells, means = [], []
        for w in WORKLOADS:
            v = acc.get((name, w), [])
            if not v:
                cells.append("-")
                continue
            std = np.std(v, ddof=1) if len(v) > 1 else 0.0
            cells.append(f"{np.mean(v):.4f} ± {std:.4f} ({len(v)})")
            means.append(np.mean(v))
        mean = f"{np.mean(means):.4f}" if len(means) == len(WORKLOADS) else "-"
        lines.append(f"| `{name}` | {cand.description} | " + " | ".join(cells) + f" | {mean} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.variants", description=__doc__)
    p.add_argument("--candidates", default=None, help="comma-separated; default: all")
    p.add_argument("--workloads", default=",".join(WORKLOADS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--out", default=DEFAULT_OUT, help="JSON lines file, appended to")
    p.add_argument("--data-dir", default=os.path.join("runs", "data"), help="MNIST-1D cache")
    p.add_argument("--table", action="store_true", help="print the table of --out; train nothing")
    args = p.parse_args(argv)
    if args.table:
        with open(args.out) as f:
            print(table([json.loads(line) for line in f if line.strip()]))
        return 0
    names = args.candidates.split(",") if args.candidates else list(CANDIDATES)
    workloads = args.workloads.split(",")
    bad = sorted(set(names) - set(CANDIDATES)) + sorted(set(workloads) - set(WORKLOADS))
    if bad:
        p.error(f"unknown candidates or workloads {bad}; candidates: {sorted(CANDIDATES)}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    for name in names:
        for workload in workloads:
            for seed in (int(s) for s in args.seeds.split(",")):
                t0 = time.perf_counter()
                rows = train(workload, CANDIDATES[name], seed, args.data_dir)
                record = dict(name=name, workload=workload, seed=seed, final=rows[-1][4],
                              train_loss=rows[-1][1], curve=[round(r[4], 4) for r in rows],
                              wall_s=round(time.perf_counter() - t0, 1))  # fmt: skip
                with open(args.out, "a") as f:
                    f.write(json.dumps(record) + "\n")
                print(f"{name} {workload} seed {seed}: validation accuracy {rows[-1][4]:.4f}, "
                      f"train loss {rows[-1][1]:.4f} ({record['wall_s']} s)", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
