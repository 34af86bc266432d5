"""The tuning protocol: grids, choosing a learning rate on validation runs only, running one cell
of the table (grid, then final runs over seeds), and summarising cells into the table's numbers."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, Protocol, TypeGuard

import numpy as np

from benchmarks.compare.workloads import ENTRIES, Entry, Workload
from benchmarks.data import DATASETS
from benchmarks.optimizers import OPTIMIZERS

VALIDATION_SPLIT = 0.2
TARGET_FRACTION = 0.95
HALF_DECADE = (1.0, 3.0)  # The mantissas of a half-decade grid: ..., 1e-3, 3e-3, 1e-2, ...


def _finite(x: Any) -> TypeGuard[float]:
    return isinstance(x, int | float) and math.isfinite(x)


def _default_lr(entry: Entry) -> float:
    lr = OPTIMIZERS[entry.optimizer].default_lr
    if lr is None:
        raise ValueError(
            f"row {entry.label!r} has a grid but {entry.optimizer} takes no learning rate"
        )
    return lr


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


def _on_half_decades(lr: float) -> tuple[int, int] | None:
    """``(exponent, index into HALF_DECADE)`` when ``lr`` is ``1e-k`` or ``3e-k`` (3 significant
    digits), else None."""
    exponent = math.floor(math.log10(lr) + 1e-9)
    mantissa = float(f"{lr / 10.0**exponent:.3g}")
    return (exponent, HALF_DECADE.index(mantissa)) if mantissa in HALF_DECADE else None


def point_beyond(grid: Sequence[float], side: str) -> float:
    """The next learning rate past the grid's ``side`` edge (``"up"``: above its largest point,
    ``"down"``: below its smallest). On the half-decade lattice (1, 3, 10, 30, ... times a power
    of ten) the next lattice point; otherwise the edge times (or divided by) the ratio of the two
    outermost points on that side."""
    points = sorted(grid)
    if len(points) < 2:
        raise ValueError(f"a grid needs two points to be extended, got {list(grid)}")
    if side not in ("up", "down"):
        raise ValueError(f"side must be 'up' or 'down', got {side!r}")
    edge = points[-1] if side == "up" else points[0]
    lattice = _on_half_decades(edge)
    if lattice is not None:
        exponent, i = lattice
        i += 1 if side == "up" else -1
        exponent, i = exponent + i // len(HALF_DECADE), i % len(HALF_DECADE)
        return float(f"{HALF_DECADE[i] * 10.0**exponent:.3g}")
    ratio = points[-1] / points[-2] if side == "up" else points[1] / points[0]
    return float(f"{edge * ratio if side == 'up' else edge / ratio:.3g}")


def open_edge(records: Sequence[dict[str, Any]], metric: str = "accuracy") -> str | None:
    """Which edge of the grid the chosen learning rate sits on (``"up"`` or ``"down"``), or None
    when it is interior: then the grid is closed.

    The chosen point is ``select_lr``'s; a diverged point (NaN) ranks last, so a grid whose top
    point diverged is closed above: the choice cannot sit on a diverged edge unless every point
    diverged, and then the grid opens downwards, towards smaller steps."""
    chosen = select_lr(records, metric)
    lrs = sorted(r["lr"] for r in records)
    if not any(_finite(r.get(f"val_{metric}")) for r in records):
        return "down"
    if chosen == lrs[-1]:
        return "up"
    if chosen == lrs[0]:
        return "down"
    return None


def parse_grid(text: str | None) -> int | tuple[float, ...] | None:
    """``--grid``: a number of points (``"3"``) or explicit learning rates (``"1e-3,1e-2"``)."""
    if text is None:
        return None
    text = text.strip()
    if "," not in text and text.isdigit():
        if int(text) < 1:
            raise ValueError(f"--grid wants at least 1 point, got {text!r}")
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
                e = dataclasses.replace(e, grid=(_default_lr(e),))
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


def tune(
    runner: Runs, workload: Workload, entry: Entry, seed: int, max_extensions: int = 0
) -> tuple[list[dict[str, Any]], float | None, list[float]]:
    """A tuned entry's grid runs on the validation split (with ``seed``), extended by one point
    at a time past the edge the choice sits on (``open_edge``, ``point_beyond``) until the
    choice is interior or ``max_extensions`` points were added. Returns the grid runs (in the
    order run), the chosen learning rate, and the points added."""
    if not entry.tuned:
        return [], (entry.grid[0] if entry.grid else None), []
    runs = [runner.run(workload, entry, lr, seed, validation=True) for lr in entry.grid]
    added: list[float] = []
    while len(added) < max_extensions:
        side = open_edge(runs, workload.metric)
        if side is None:
            break
        lr = point_beyond([r["lr"] for r in runs], side)
        added.append(lr)
        runs.append(runner.run(workload, entry, lr, seed, validation=True))
    return runs, select_lr(runs, workload.metric), added


def run_cell(
    runner: Runs,
    workload: Workload,
    entry: Entry,
    seeds: Sequence[int],
    max_extensions: int | None = None,
) -> dict[str, Any]:
    """Every run of one table cell: the grid (if tuned; extended past an edge choice up to
    ``max_extensions`` points, by default the workload's ``extend_grid``), then the final runs,
    one per seed.

    The grid runs once, with the first seed: the seeds vary the initialisation and the batch
    order, while the train/test split stays the data seed's, so one choice serves every seed.
    """
    cap = workload.extend_grid if max_extensions is None else max_extensions
    grid_runs, chosen_lr, added = tune(runner, workload, entry, seeds[0], cap)
    chosen = {seed: chosen_lr for seed in seeds}
    final_runs = [runner.run(workload, entry, chosen[s], s, validation=False) for s in seeds]
    grid = sorted(r["lr"] for r in grid_runs) if entry.tuned else list(entry.grid)
    return {
        "label": entry.label,
        "optimizer": entry.optimizer,
        "gain": entry.gain,
        "description": entry.description,
        "grid": grid,
        "grid_declared": list(entry.grid),
        "grid_added": added,
        "grid_closed": not entry.tuned or open_edge(grid_runs, workload.metric) is None,
        "tuned": entry.tuned,
        "chosen_lr": {str(s): chosen[s] for s in seeds},
        "grid_runs": grid_runs,
        "final_runs": final_runs,
    }


def _better(metric: str) -> Any:
    return min if metric == "loss" else max


def rows_deciding_the_bar(
    summary: dict[str, Any],
    cells: Sequence[dict[str, Any]],
    candidate: str,
    peers: Sequence[str],
    metric: str = "accuracy",
) -> list[str]:
    """The rows that decide the bar whose spreads overlap: the candidate, the best tuned row and
    the best zero-settings peer (a label in ``peers``), each pair of the candidate with one of the
    other two whose intervals mean ± std (the summary's) overlap. These rows get more seeds."""
    _check_metric(metric)
    stats = {s["label"]: s for s in summary["cells"]}
    if candidate not in stats:
        raise ValueError(f"the candidate {candidate!r} is not a row of this table: {sorted(stats)}")
    better = _better(metric)

    def best(labels: list[str]) -> str | None:
        scored = [lab for lab in labels if _finite(stats[lab]["mean"])]
        return better(scored, key=lambda lab: stats[lab]["mean"]) if scored else None

    tuned = best([c["label"] for c in cells if c["tuned"]])
    peer = best([lab for lab in stats if lab in peers])
    c = stats[candidate]
    out = set()
    for other in (tuned, peer):
        if other is None or other == candidate:
            continue
        o = stats[other]
        if abs(c["mean"] - o["mean"]) <= c["std"] + o["std"]:  # [m - s, m + s] overlap.
            out |= {candidate, other}
    return sorted(out)


def last_fifth_rise(curve: Sequence[dict[str, Any]], key: str = "val_accuracy") -> float:
    """How much ``key`` rose over the last fifth of the epochs of ``curve`` (per-epoch rows):
    its last value minus its value a fifth of the epochs (at least one) before the end."""
    if len(curve) < 2:
        raise ValueError(f"a rise needs a curve of two epochs or more, got {len(curve)}")
    back = max(1, len(curve) // 5)
    last, before = curve[-1].get(key), curve[-1 - back].get(key)
    if not (_finite(last) and _finite(before)):
        return math.nan
    return float(last - before)


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
