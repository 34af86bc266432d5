"""``python -m benchmarks.program``: the training program's fixed costs and throughput, as ratios.

1. Wall time of the main command (``python -m benchmarks.train``, a fresh run folder each time)
   against ``minimal_digits.py`` doing the same job, in interleaved rounds; the main command
   both with its cache folder warm (the usual case: datasets and compiled programs cached) and
   cold (an empty cache folder, as on a user's first run).
2. Steady-state training throughput of ``train_and_evaluate`` (its ``images_per_second``:
   compilation and each compiled step's first run excluded, as the plain loop leaves out its
   first step) against a plain jitted loop over the same model, optimizer and batches.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
from flax import nnx

from benchmarks import optimizers
from benchmarks.config import Config
from benchmarks.reporting import hardware_description
from benchmarks.run import train_and_evaluate
from benchmarks.task import make_task, per_example_loss
from benchmarks.trainer import agd_initialization, model_builder

MINIMAL = os.path.join(os.path.dirname(__file__), "minimal_digits.py")
THROUGHPUT = Config(
    dataset="mnist1d", arch="cnn1d", depth=4, width=64, epochs=12, checkpoint=False, progress=False
)


def _wall(command: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def fixed_costs(rounds: int) -> dict[str, list[float]]:
    """Seconds per round of: the main command with a warm cache, with a cold one, the script."""
    times: dict[str, list[float]] = {"main, warm cache": [], "main, cold cache": [], "minimal": []}
    with tempfile.TemporaryDirectory() as tmp:
        warm = dict(os.environ, AGD_OPTAX_CACHE=os.path.join(tmp, "warm-cache"))
        main = [sys.executable, "-m", "benchmarks.train", "--no-progress", "--workdir"]
        _wall([*main, os.path.join(tmp, "fill")], warm)  # Fills the warm cache.
        for r in range(rounds):
            cold = dict(os.environ, AGD_OPTAX_CACHE=os.path.join(tmp, f"cold-cache{r}"))
            times["main, warm cache"].append(_wall([*main, os.path.join(tmp, f"w{r}")], warm))
            times["main, cold cache"].append(_wall([*main, os.path.join(tmp, f"c{r}")], cold))
            times["minimal"].append(_wall([sys.executable, MINIMAL], warm))
    return times


def plain_loop_images_per_second(config: Config) -> float:
    """A plain loop: the program's model, optimizer and batches, one ``jax.jit`` step over the
    split NNX state, timed from the end of its first (compiling) step."""
    config.ensure_valid()
    task = make_task(config)
    spec = optimizers.get(config.optimizer)
    steps = task.num_train() // config.train_bs
    build = model_builder(config, task, spec.agd_init)
    model = build(config.seed)
    roles = lambda: task.roles(model)  # noqa: E731
    initialize = agd_initialization(config, task, spec.agd_init, roles)
    if initialize is not None:
        nnx.update(model, initialize(nnx.state(model, nnx.Param), config.seed))
    tx = optimizers.resolve(spec, config, steps * config.epochs, steps, roles)
    graphdef, state = nnx.split((model, nnx.Optimizer(model, tx, wrt=nnx.Param)))

    @jax.jit
    def step(state, x, y):
        model, optimizer = nnx.merge(graphdef, state)
        loss_fn = lambda m: per_example_loss(config.loss, m(x), y).mean()  # noqa: E731
        optimizer.update(model, nnx.grad(loss_fn)(model))
        return nnx.state((model, optimizer))

    seconds, images = 0.0, 0
    for epoch in range(1, config.epochs + 1):
        t0 = time.perf_counter()
        for i, (x, y) in enumerate(itertools.islice(task.train_batches(epoch), steps)):
            state = step(state, x, y)
            if epoch == i + 1 == 1:  # The first step compiles: timed from its end.
                jax.block_until_ready(state)
                t0 = time.perf_counter()
            else:
                images += config.train_bs
        jax.block_until_ready(state)
        seconds += time.perf_counter() - t0
    return images / seconds


def throughput(rounds: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"program": [], "plain loop": []}
    for _ in range(rounds):
        with tempfile.TemporaryDirectory() as tmp:
            final = train_and_evaluate(THROUGHPUT, workdir=tmp)
        out["program"].append(final["images_per_second"])
        out["plain loop"].append(plain_loop_images_per_second(THROUGHPUT))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.program", description=__doc__)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians reported)")
    p.add_argument("--skip-wall", action="store_true", help="throughput only")
    args = p.parse_args(argv)
    print(f"# The training program's costs on {hardware_description()}, {args.rounds} rounds")
    if not args.skip_wall:
        walls = fixed_costs(args.rounds)
        med = {k: statistics.median(v) for k, v in walls.items()}
        for name, values in walls.items():
            print(
                f"{name:>18}: median {med[name]:.2f} s  ({', '.join(f'{v:.2f}' for v in values)})"
            )
        for name in ("main, warm cache", "main, cold cache"):
            print(f"ratio {name} / minimal script: {med[name] / med['minimal']:.2f}")
    rates = throughput(args.rounds)
    ratios = [p / q for p, q in zip(rates["program"], rates["plain loop"])]
    for name, values in rates.items():
        print(f"{name:>18}: images/s {', '.join(f'{v:,.0f}' for v in values)}")
    print(
        f"ratio program / plain loop (steady-state images/s, {THROUGHPUT.arch} depth "
        f"{THROUGHPUT.depth} width {THROUGHPUT.width} on {THROUGHPUT.dataset}): median "
        f"{statistics.median(ratios):.2f} ({', '.join(f'{r:.2f}' for r in ratios)})"
    )
    return 0


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    sys.exit(main())
