"""Evidence suite: AGD against tuned and learning-rate-free baselines, tuning cost included.

``python -m benchmarks.compare --suite digits`` (or ``mnist1d``; ``cifar10``, ``cifar100`` and
``imagenet`` with ``--data-dir``) trains every optimizer on every workload of the suite and writes,
under ``--out`` (default ``benchmarks/results``):

* ``<suite>.md``: per workload, final test accuracy (mean ± std over seeds), steps to reach 95% of
  the best final accuracy, and the total compute spent, the whole learning-rate grid included;
* ``<suite>_curves.png``: test accuracy against epochs, per optimizer (mean over seeds);
* ``<suite>_compute.png``: final test accuracy against total compute, tuning included;
* ``<suite>.json``: every run (configuration, per-epoch curve, steps and wall seconds).

Protocol. AGD runs with no hyperparameter (gain 1, the published algorithm) and with gain 10.
SGD with momentum, Adam and NadamW are tuned over a log-spaced learning-rate grid: each grid point
is trained once on 80% of the training set and scored on the held-out 20%
(``Config.validation_split``); the learning rate with the best final validation accuracy is then
trained with every seed on the real train/test split. The test set is never looked at to choose.
optax's learning-rate-free optimizers run at their defaults. The seeds vary the initialisation
and the batch order; the train/test split is the data seed's (``Config.data_seed``, the standard
split), the same for every seed, so one grid serves them all and never sees a test example.

Modules: ``workloads`` (the table's optimizer rows and each suite's workloads), ``protocol``
(grids, the choice of learning rate, a cell's runs, summaries), ``runner`` (one training run,
recorded), ``report`` (markdown and JSON), ``plots``, ``saved`` (saved results redrawn, merged
or extended), ``cli`` (the command line).
"""

from benchmarks.compare.cli import main, parse_args
from benchmarks.compare.plots import plot_compute, plot_curves, plot_step_sizes
from benchmarks.compare.protocol import (
    entries_for,
    grid_points,
    mean_std,
    parse_grid,
    run_cell,
    select_lr,
    steps_to_target,
    summarize,
)
from benchmarks.compare.report import markdown, write_outputs
from benchmarks.compare.runner import Runner
from benchmarks.compare.workloads import ENTRIES, SUITES, Entry, Workload

__all__ = [
    "ENTRIES",
    "SUITES",
    "Entry",
    "Runner",
    "Workload",
    "entries_for",
    "grid_points",
    "main",
    "markdown",
    "mean_std",
    "parse_args",
    "parse_grid",
    "plot_compute",
    "plot_curves",
    "plot_step_sizes",
    "run_cell",
    "select_lr",
    "steps_to_target",
    "summarize",
    "write_outputs",
]
