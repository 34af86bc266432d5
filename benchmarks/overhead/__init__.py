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

5. **Compile and eager cost** (``--compile``, instead of the above): seconds to compile the
   jitted update and to call it without ``jit``, for ``agd``, ``agd_momentum`` and ``optax.adam``
   on stacks of dense layers with biases from 10 to 2,000 leaves, as ratios to Adam's.

Modules: ``zoo`` (the optimizers and parameter trees measured), ``measure`` (timing and state
bytes), ``hlo`` (counting XLA's kernels), ``report`` (the markdown), ``compile_cost`` (the
compile and eager cost), ``cli`` (the command line).
"""

from benchmarks.overhead.cli import main, parse_args, run
from benchmarks.overhead.hlo import fusion_counts, smallest_weight, update_hlo
from benchmarks.overhead.measure import state_bytes, time_train_steps, time_updates
from benchmarks.overhead.report import markdown
from benchmarks.overhead.zoo import BASELINE, OPTIMIZERS, TREES, gpt2_small, num_params, tiny_cnn

__all__ = [
    "BASELINE",
    "OPTIMIZERS",
    "TREES",
    "fusion_counts",
    "gpt2_small",
    "main",
    "markdown",
    "num_params",
    "parse_args",
    "run",
    "smallest_weight",
    "state_bytes",
    "time_train_steps",
    "time_updates",
    "tiny_cnn",
    "update_hlo",
]
