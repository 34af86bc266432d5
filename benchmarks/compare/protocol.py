"""The tuning protocol: grids, choosing a learning rate on validation runs only, running one cell
of the table (grid, then final runs over seeds), and summarising cells into the table's numbers."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from benchmarks.compare.workloads import ENTRIES, Entry, Workload
from benchmarks.data import DATASETS
from benchmarks.optimizers import OPTIMIZERS

VALIDATION_SPLIT = 0.2
TARGET_FRACTION = 0.95


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


def select_lr(records: Sequence[dict[str, Any]], metric: str = "accuracy") -> float:
    """The learning rate of the grid record with the best final *validation* accuracy (or, with
    ``metric="loss"``, the lowest final validation loss).

    Each record is one grid run: ``{"lr", "split": "validation", "val_accuracy", "val_loss"}``.
    Only those fields are read; a record from any other split is refused, so the choice cannot
    depend on test metrics. Ties go to the lower validation loss, then the smaller learning rate;
    a diverged run (NaN) ranks last.
    """
    _check_metric(metric)
    if not records:
        raise ValueError("select_lr: no grid records")
    for r in records:
        if r.get("split") != "validation":
            raise ValueError(
                f"select_lr: a record with split {r.get('split')!r} was given; the learning rate "
                "is chosen on validation runs only"
            )

    def key(r: dict[str, Any]) -> tuple[float, float, float]:
        acc = r["val_accuracy"] if _finite(r["val_accuracy"]) else -math.inf
        loss = r["val_loss"] if _finite(r["val_loss"]) else math.inf
        return (loss, loss, r["lr"]) if metric == "loss" else (-acc, loss, r["lr"])

    return min(records, key=key)["lr"]


def _check_metric(metric: str) -> None:
    if metric not in ("accuracy", "loss"):
        raise ValueError(f"unknown metric {metric!r}; expected 'accuracy' or 'loss'")


def steps_to_target(
    rows: Sequence[dict[str, Any]],
    target: float,
    steps_per_epoch: int,
    key: str = "test_accuracy",
    lower_is_better: bool = False,
) -> int | None:
    """Training steps until the per-epoch ``key`` first reaches ``target`` (at least it, or at most
    it when ``lower_is_better``); None if never."""
    for row in rows:
        value = row.get(key)
        if _finite(value) and (value <= target if lower_is_better else value >= target):
            return int(row["epoch"]) * steps_per_epoch
    return None


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value); NaN when any value is missing."""
    xs = [v if _finite(v) else math.nan for v in values]
    if not xs:
        return math.nan, math.nan
    arr = np.asarray(xs, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def grid_points(lo: float, hi: float, n: int) -> tuple[float, ...]:
    """``n`` log-spaced learning rates from ``lo`` to ``hi``, rounded to 3 significant digits."""
    if n < 1:
        raise ValueError(f"a grid needs at least one point, got {n}")
    if n == 1:
        return (float(f"{math.sqrt(lo * hi):.3g}"),)
    return tuple(float(f"{x:.3g}") for x in np.geomspace(lo, hi, n))


def parse_grid(text: str | None) -> int | tuple[float, ...] | None:
    """``--grid``: a number of points (``"3"``) or explicit learning rates (``"1e-3,1e-2"``)."""
    if text is None:
        return None
    text = text.strip()
    if "," not in text and text.isdigit():
        return int(text)
    values = tuple(float(v) for v in text.split(",") if v.strip())
    if not values or any(v <= 0 for v in values):
        raise ValueError(f"--grid wants a point count or positive learning rates, got {text!r}")
    return values


def entries_for(
    grid: int | tuple[float, ...] | None,
    names: Sequence[str] | None,
    dataset: str,
    entries: Sequence[Entry] | None = None,
) -> list[Entry]:
    """The suite's entries (``entries``, by default ``ENTRIES``), with ``grid`` applied to the
    tuned ones and ``names`` selected."""
    entries = ENTRIES if entries is None else tuple(entries)
    known = {e.label: e for e in entries}
    if names:
        unknown = sorted(set(names) - set(known))
        if unknown:
            raise ValueError(f"unknown optimizers {unknown}; expected some of {sorted(known)}")
    out = []
    for e in entries:
        if names and e.label not in names:
            continue
        if e.grid:
            if DATASETS[dataset].streamed:  # No held-out split: one fixed, untuned lr.
                e = dataclasses.replace(e, grid=(OPTIMIZERS[e.optimizer].default_lr,))
            elif isinstance(grid, int):
                e = dataclasses.replace(e, grid=grid_points(min(e.grid), max(e.grid), grid))
            elif isinstance(grid, tuple):
                e = dataclasses.replace(e, grid=tuple(sorted(grid)))
        out.append(e)
    return out


class Runs(Protocol):
    """What ``run_cell`` needs: one training run, recorded (``runner.Runner``)."""

    def run(
        self, workload: Workload, entry: Entry, lr: float | None, seed: int, validation: bool
    ) -> dict[str, Any]: ...


def run_cell(
    runner: Runs, workload: Workload, entry: Entry, seeds: Sequence[int]
) -> dict[str, Any]:
    """Every run of one table cell: the grid (if tuned), then the final runs, one per seed.

    The grid runs once, with the first seed: the seeds vary the initialisation and the batch
    order, while the train/test split stays the data seed's, so one choice serves every seed.
    """
    grid_runs: list[dict[str, Any]] = []
    chosen_lr = entry.grid[0] if entry.grid else None
    if entry.tuned:
        grid_runs = [
            runner.run(workload, entry, lr, seeds[0], validation=True) for lr in entry.grid
        ]
        chosen_lr = select_lr(grid_runs, workload.metric)
    chosen = {seed: chosen_lr for seed in seeds}
    final_runs = [runner.run(workload, entry, chosen[s], s, validation=False) for s in seeds]
    return {
        "label": entry.label,
        "optimizer": entry.optimizer,
        "gain": entry.gain,
        "description": entry.description,
        "grid": list(entry.grid),
        "tuned": entry.tuned,
        "chosen_lr": {str(s): chosen[s] for s in seeds},
        "grid_runs": grid_runs,
        "final_runs": final_runs,
    }


def summarize(cells: Sequence[dict[str, Any]], metric: str = "accuracy") -> dict[str, Any]:
    """Per cell: accuracy mean/std, steps to 95% of the workload's best, and compute totals.

    With ``metric="loss"``: test loss mean/std, and steps until the test loss is within
    ``1 / TARGET_FRACTION`` of the best mean final loss (the lowest)."""
    _check_metric(metric)
    key = f"test_{metric}"
    lower = metric == "loss"
    out = []
    for c in cells:
        values = [r[key] for r in c["final_runs"]]
        mean, std = mean_std(values)
        out.append(dict(label=c["label"], mean=mean, std=std, n=len(values)))
    means = [s["mean"] for s in out if _finite(s["mean"])]
    if lower:
        best = min(means) if means else math.nan
        target = best / TARGET_FRACTION
    else:
        best = max(means) if means else math.nan
        target = TARGET_FRACTION * best
    for s, c in zip(out, cells):
        reached = [
            steps_to_target(r["curve"], target, r["steps_per_epoch"], key, lower)
            for r in c["final_runs"]
        ]
        hits = [x for x in reached if x is not None]
        grid_steps = sum(r["steps"] for r in c["grid_runs"])
        final_steps = sum(r["steps"] for r in c["final_runs"])
        lrs = sorted({v for v in c["chosen_lr"].values() if v is not None})
        edge = bool(c["tuned"]) and any(lr in (min(c["grid"]), max(c["grid"])) for lr in lrs)
        s.update(
            steps_to_target=float(np.mean(hits)) if hits else None,
            reached=len(hits),
            grid_runs=len(c["grid_runs"]),
            grid_steps=grid_steps,
            total_steps=grid_steps + final_steps,
            grid_wall_s=sum(r["wall_s"] for r in c["grid_runs"]),
            total_wall_s=sum(r["wall_s"] for r in c["grid_runs"] + c["final_runs"]),
            chosen_lrs=[c["chosen_lr"][k] for k in sorted(c["chosen_lr"], key=int)],
            grid_edge=edge,
        )
    if lower:
        return {"metric": metric, "best_mean_loss": best, "target_loss": target, "cells": out}
    return {"best_mean_accuracy": best, "target_accuracy": target, "cells": out}
