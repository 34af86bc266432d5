"""Sizing a workload before any optimizer's result on it is read.

* ``time_one`` (``--time-one ROW``): one final-split run of one row, timed; it prints the wall time
  and the number of runs the workload's rows need, and nothing about the run's loss or accuracy
  (its workdir is deleted).
* ``epoch_rule`` (``--epoch-rule``): the tuned rows' grids only (validation runs), then, for the
  best tuned row, the rise of its validation accuracy over the last fifth of its epochs: the
  protocol doubles the epochs until that rise is under half a point.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from typing import Any

from benchmarks.compare.protocol import VALIDATION_SPLIT, last_fifth_rise, open_edge, tune
from benchmarks.compare.workloads import Entry, Workload
from benchmarks.data import DATASETS

EPOCH_RULE_POINTS = 0.5  # The rise (accuracy points) under which the epochs are enough.


def time_one(
    runner: Any,
    workloads: Sequence[Workload],
    plan: Mapping[str, Sequence[Entry]],
    label: str,
    seeds: int,
) -> int:
    """Times one final-split run of row ``label`` (a tuned row at its grid's middle point) on the
    one workload given; prints only times and run counts."""
    from benchmarks.run import NonFiniteError, train_and_evaluate

    if len(workloads) != 1:
        raise SystemExit(f"--time-one times one workload: pick one with --workloads, not "
                         f"{[w.name for w in workloads]}")  # fmt: skip
    (workload,) = workloads
    entries = {e.label: e for e in plan[workload.name]}
    if label not in entries:
        raise SystemExit(
            f"--time-one: no row {label!r} on {workload.name}; rows: {sorted(entries)}"
        )
    entry = entries[label]
    lr = entry.grid[len(entry.grid) // 2] if entry.grid else None
    runner.warm_up_now(workload)  # As the suite does: start-up costs are not the run's.
    config = runner.config(workload, entry, lr, 0, 0.0)
    workdir = tempfile.mkdtemp(prefix="time_one_")
    finished = True
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            train_and_evaluate(config, workdir)
    except NonFiniteError:
        finished = False
    finally:
        wall = time.perf_counter() - t0
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"{workload.name}, row {label}, {config.epochs} epochs: one run took {wall:.1f} s"
          + ("" if finished else " (it stopped before its last step: time another row)"))  # fmt: skip
    grid_runs = sum(len(e.grid) for e in plan[workload.name] if e.tuned)
    final_runs = seeds * len(plan[workload.name])
    streamed = DATASETS[workload.config["dataset"]].streamed or workload.metric == "loss"
    share = 1.0 if streamed else 1.0 - VALIDATION_SPLIT  # A grid run's data: 80% of the images.
    hours = (final_runs + share * grid_runs) * wall / 3600
    print(f"its {len(plan[workload.name])} rows need {grid_runs} grid runs (before any extension) "
          f"and {final_runs} final runs at {seeds} seeds: about {hours:.1f} h at this run's pace, "
          "one run at a time")  # fmt: skip
    return 0


def epoch_rule(
    runner: Any,
    workloads: Sequence[Workload],
    tuned: Mapping[str, Sequence[Entry]],
    max_extensions: int | None,
    out: str,
) -> int:
    """For each workload, the tuned rows' grids (extended as the suite does), the best tuned row
    by its chosen point's final validation metric, and that run's rise over the last fifth of its
    epochs, printed (in accuracy points) with the rule's verdict and saved as
    ``<out>/<workload>_epoch_rule.json``."""
    for workload in workloads:
        entries = tuned[workload.name]
        if not entries:
            raise SystemExit(f"--epoch-rule: {workload.name} has no tuned row selected")
        metric, lower = workload.metric, workload.metric == "loss"
        runner.warm_up(workload)
        cap = workload.extend_grid if max_extensions is None else max_extensions
        rows = []
        for entry in entries:
            runs, chosen, added = tune(runner, workload, entry, 0, cap)
            record = next(r for r in runs if r["lr"] == chosen)
            rows.append(
                dict(
                    label=entry.label,
                    grid=sorted(r["lr"] for r in runs),
                    grid_added=added,
                    grid_closed=open_edge(runs, metric) is None,
                    chosen_lr=chosen,
                    score=record[f"val_{metric}"],
                    rise=last_fifth_rise(record["curve"], f"val_{metric}"),
                    epochs=len(record["curve"]),
                )
            )
        scored = [r for r in rows if isinstance(r["score"], float) and math.isfinite(r["score"])]
        if not scored:
            raise SystemExit(f"--epoch-rule: every tuned row diverged on {workload.name}")
        best = (min if lower else max)(scored, key=lambda r: r["score"])
        for r in rows:
            del r["score"]  # Which row is best is kept; its level is not printed or kept.
        points = 100 * best["rise"] * (-1 if lower else 1)
        epochs = best["epochs"]
        back = max(1, epochs // 5)
        enough = points < EPOCH_RULE_POINTS
        what = "validation loss fell by" if lower else "validation accuracy rose by"
        unit = " (x100 nats)" if lower else " points"
        print(
            f"{workload.name}, {epochs} epochs: best tuned row {best['label']} (lr "
            f"{best['chosen_lr']:g}, grid {'closed' if best['grid_closed'] else 'still open'}); "
            f"its {what} {points:.2f}{unit} over the last fifth of its epochs (epoch "
            f"{epochs - back} to {epochs}): "
            + (
                "under 0.5: the epochs are enough"
                if enough
                else f"0.5 or more: double the epochs to {2 * epochs}"
            ),  # fmt: skip
            flush=True,
        )
        for r in rows:
            print(f"  {r['label']}: grid {', '.join(f'{x:g}' for x in r['grid'])}, chosen "
                  f"{r['chosen_lr']:g}{'' if r['grid_closed'] else ' (on the edge)'}")  # fmt: skip
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, f"{workload.name}_epoch_rule.json"), "w") as f:
            json.dump(dict(workload=workload.name, epochs=epochs, best=best["label"],
                           rise_points=round(points, 4), enough=enough, rows=rows), f, indent=1)  # fmt: skip
    return 0
