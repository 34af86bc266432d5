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
optax's learning-rate-free optimizers run at their defaults. Where a dataset's train/test split
itself depends on the seed (scikit-learn's digits), the grid is run once per seed, on that seed's
training set, so no choice ever sees examples that are test examples of the run it is used for.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import io
import json
import math
import os
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from benchmarks.config import Config

VALIDATION_SPLIT = 0.2
# Datasets whose train/test split is drawn from the seed: tune on each seed's own training set.
SPLIT_DEPENDS_ON_SEED = ("digits",)
# Datasets where Config.validation_split does not apply (streamed): no grid is allowed.
NO_VALIDATION_SPLIT = ("imagenet",)
SUITES_NEEDING_DATA = ("cifar10", "cifar100", "imagenet")
TARGET_FRACTION = 0.95


# --------------------------------------------------------------------------------------------------
# What is compared.


@dataclasses.dataclass(frozen=True)
class Entry:
    """One optimizer cell of the table: ``grid`` empty means run at its defaults, untuned."""

    label: str
    optimizer: str
    gain: float = 1.0
    grid: tuple[float, ...] = ()
    description: str = ""

    @property
    def tuned(self) -> bool:
        return len(self.grid) > 1


SGD_GRID = (3e-3, 1e-2, 3e-2, 1e-1, 3e-1)
ADAM_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)

ENTRIES: tuple[Entry, ...] = (
    Entry("agd", "agd", 1.0, description="AGD, gain 1 (the published algorithm, no setting)"),
    Entry("agd_gain10", "agd", 10.0, description="AGD, gain 10"),
    Entry("sgd_momentum", "sgd", grid=SGD_GRID, description="SGD, momentum 0.9, tuned lr"),
    Entry("adam", "adam", grid=ADAM_GRID, description="Adam, tuned lr"),
    Entry("nadamw", "nadamw", grid=ADAM_GRID, description="NadamW (weight decay 0), tuned lr"),
    Entry("prodigy", "prodigy", description="Prodigy, defaults"),
    Entry("dog", "dog", description="DoG, defaults"),
    Entry("dadapt_adamw", "dadapt_adamw", description="D-Adaptation AdamW, defaults"),
    Entry("cocob", "cocob", description="COCOB, defaults"),
    Entry("mechanize", "mechanize", description="Mechanic on Adam, defaults"),
    Entry(
        "schedule_free_adamw", "schedule_free_adamw", description="Schedule-free AdamW, defaults"
    ),
)


@dataclasses.dataclass(frozen=True)
class Workload:
    """One model on one dataset: ``config`` holds the ``Config`` fields it fixes."""

    name: str
    title: str
    config: dict[str, Any]


SUITES: dict[str, tuple[Workload, ...]] = {
    "digits": (
        Workload(
            "digits_fcn",
            "digits (8x8), FCN depth 3 width 256, cross-entropy",
            dict(dataset="digits", arch="fcn", depth=3, width=256, loss="xent", epochs=40),
        ),
    ),
    "mnist1d": (
        Workload(
            "mnist1d_mlp",
            "MNIST-1D, FCN depth 3 width 256, cross-entropy",
            dict(dataset="mnist1d", arch="fcn", depth=3, width=256, loss="xent", epochs=60),
        ),
        Workload(
            "mnist1d_cnn",
            "MNIST-1D, CNN1D (3 convs of 32 channels + linear), cross-entropy",
            dict(dataset="mnist1d", arch="cnn1d", depth=4, width=32, loss="xent", epochs=60),
        ),
    ),
    # The paper's workloads (square loss and batch 128 on CIFAR; cross-entropy and batch 1024 on
    # ImageNet). They need the data on disk (--data-dir) and an accelerator.
    "cifar10": (
        Workload(
            "cifar10_fcn16",
            "CIFAR-10, FCN depth 16 width 512, square loss",
            dict(dataset="cifar10", arch="fcn", depth=16, width=512, loss="mse", epochs=200),
        ),
        Workload(
            "cifar10_resnet18",
            "CIFAR-10, ResNet-18, square loss",
            dict(
                dataset="cifar10", arch="resnet18", depth=None, width=None, loss="mse", epochs=200
            ),
        ),
    ),
    "cifar100": (
        Workload(
            "cifar100_vgg16",
            "CIFAR-100, VGG-16, square loss",
            dict(dataset="cifar100", arch="vgg16", depth=None, width=None, loss="mse", epochs=200),
        ),
    ),
    "imagenet": (
        Workload(
            "imagenet_resnet50",
            "ImageNet, ResNet-50, cross-entropy, batch 1024",
            dict(
                dataset="imagenet",
                arch="resnet50",
                depth=None,
                width=None,
                loss="xent",
                train_bs=1024,
                test_bs=1024,
                epochs=350,
            ),
        ),
    ),
}
# ImageNet has no held-out split in the training program: the baselines run at one learning rate
# each (SGD at 0.1 as in the paper), untuned, rather than be tuned on the validation (test) set.
FIXED_LR = {"sgd": 0.1, "adam": 1e-3, "nadamw": 1e-3}


# --------------------------------------------------------------------------------------------------
# Pure helpers (unit tested).


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


def select_lr(records: Sequence[dict[str, Any]]) -> float:
    """The learning rate of the grid record with the best final *validation* accuracy.

    Each record is one grid run: ``{"lr", "split": "validation", "val_accuracy", "val_loss"}``.
    Only those fields are read; a record from any other split is refused, so the choice cannot
    depend on test metrics. Ties go to the lower validation loss, then the smaller learning rate;
    a diverged run (NaN) ranks last.
    """
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
        return (-acc, loss, r["lr"])

    return min(records, key=key)["lr"]


def steps_to_target(
    rows: Sequence[dict[str, Any]], target: float, steps_per_epoch: int, key: str = "test_accuracy"
) -> int | None:
    """Training steps until the per-epoch ``key`` first reaches ``target`` (None if never)."""
    for row in rows:
        value = row.get(key)
        if _finite(value) and value >= target:
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
    grid: int | tuple[float, ...] | None, names: Sequence[str] | None, dataset: str
) -> list[Entry]:
    """The suite's entries, with ``grid`` applied to the tuned ones and ``names`` selected."""
    known = {e.label: e for e in ENTRIES}
    if names:
        unknown = sorted(set(names) - set(known))
        if unknown:
            raise ValueError(f"unknown optimizers {unknown}; expected some of {sorted(known)}")
    out = []
    for e in ENTRIES:
        if names and e.label not in names:
            continue
        if e.grid:
            if dataset in NO_VALIDATION_SPLIT:
                e = dataclasses.replace(e, grid=(FIXED_LR[e.optimizer],))
            elif isinstance(grid, int):
                e = dataclasses.replace(e, grid=grid_points(min(e.grid), max(e.grid), grid))
            elif isinstance(grid, tuple):
                e = dataclasses.replace(e, grid=tuple(sorted(grid)))
        out.append(e)
    return out


# --------------------------------------------------------------------------------------------------
# Running.


def _steps_per_epoch(config: Config, cache: dict) -> int:
    """Optimizer steps per epoch of ``config``, as the training program counts them."""
    from benchmarks.training import load_data

    key = (config.dataset, config.data_dir, config.validation_split)
    if key not in cache:
        cache[key] = load_data(config).num_train
    steps = cache[key] // config.train_bs
    if config.max_steps_per_epoch:
        steps = min(steps, config.max_steps_per_epoch)
    return steps


def _clean(x: Any) -> Any:
    """JSON-safe: NaN and infinities as None, numpy scalars as Python numbers."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_clean(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float):
        return float(f"{x:.6g}") if math.isfinite(x) else None
    return x


def _lr_tag(lr: float | None) -> str:
    return "default" if lr is None else f"lr{lr:g}"


class Runner:
    """Runs single trainings of the training program and records them."""

    def __init__(self, runs_dir: str, overrides: dict[str, Any], verbose: bool = False):
        self.runs_dir = runs_dir
        self.overrides = overrides
        self.verbose = verbose
        self.spe_cache: dict = {}
        self.count = 0

    def config(self, workload: Workload, entry: Entry, lr, seed: int, split: float) -> Config:
        values = dict(workload.config)
        values.update(self.overrides)
        return Config(
            **values,
            optimizer=entry.optimizer,
            gain=entry.gain,
            lr=lr,
            seed=seed,
            validation_split=split,
            progress=False,
            checkpoint=False,
        ).validate()

    def run(
        self, workload: Workload, entry: Entry, lr: float | None, seed: int, validation: bool
    ) -> dict[str, Any]:
        from benchmarks.training import train_and_evaluate

        split = VALIDATION_SPLIT if validation else 0.0
        config = self.config(workload, entry, lr, seed, split)
        kind = "grid" if validation else "final"
        workdir = os.path.join(
            self.runs_dir, workload.name, entry.label, f"{kind}_{_lr_tag(lr)}_seed{seed}"
        )
        spe = _steps_per_epoch(config, self.spe_cache)
        out = io.StringIO()
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(sys.stdout if self.verbose else out):
            final = train_and_evaluate(config, workdir)
        wall = time.perf_counter() - t0
        from benchmarks.training import read_metrics

        rows = read_metrics(workdir)
        self.count += 1
        prefix = "val" if validation else "test"
        curve = [
            {
                "epoch": r["epoch"],
                "train_loss": r.get("train_loss"),
                "train_accuracy": r.get("train_accuracy"),
                f"{prefix}_loss": r.get("test_loss"),
                f"{prefix}_accuracy": r.get("test_accuracy"),
                **({"eta": r["eta"]} if "eta" in r else {}),
            }
            for r in rows
        ]
        record = {
            "kind": kind,
            "split": "validation" if validation else "test",
            "label": entry.label,
            "optimizer": entry.optimizer,
            "gain": entry.gain,
            "lr": lr,
            "seed": seed,
            "epochs": config.epochs,
            "steps_per_epoch": spe,
            "steps": spe * len(rows),
            "wall_s": wall,
            f"{prefix}_accuracy": final.get("test_accuracy"),
            f"{prefix}_loss": final.get("test_loss"),
            "train_loss": final.get("train_loss"),
            "curve": curve,
            "workdir": workdir,
        }
        acc = record[f"{prefix}_accuracy"]
        print(
            f"[{self.count}] {workload.name} {entry.label} {kind} {_lr_tag(lr)} seed {seed}: "
            f"{prefix} accuracy {acc:.4f}, {record['steps']} steps, {wall:.1f} s",
            flush=True,
        )
        return record

    def warm_up(self, workload: Workload) -> None:
        """Tiny uncounted runs (AGD, SGD), so that no counted run pays the process's one-time
        start-up costs (JAX initialisation, compiling AGD's orthogonal initialisation)."""
        from benchmarks.training import train_and_evaluate

        for entry, lr in ((ENTRIES[0], None), (ENTRIES[2], 0.01)):
            config = self.config(workload, entry, lr, 0, 0.0)
            config = dataclasses.replace(config, epochs=1, max_steps_per_epoch=2)
            with contextlib.redirect_stdout(io.StringIO()):
                train_and_evaluate(config, os.path.join(self.runs_dir, "warm_up", entry.label))


def run_cell(
    runner: Runner, workload: Workload, entry: Entry, seeds: Sequence[int]
) -> dict[str, Any]:
    """Every run of one table cell: the grid (if tuned), then the final runs, one per seed."""
    per_seed = workload.config["dataset"] in SPLIT_DEPENDS_ON_SEED
    grid_runs: list[dict[str, Any]] = []
    chosen: dict[int, float | None] = {}
    if entry.tuned:
        tune_seeds = list(seeds) if per_seed else [seeds[0]]
        for s in tune_seeds:
            runs = [runner.run(workload, entry, lr, s, validation=True) for lr in entry.grid]
            grid_runs += runs
            lr = select_lr(runs)
            for seed in seeds if not per_seed else [s]:
                chosen[seed] = lr
    else:
        for seed in seeds:
            chosen[seed] = entry.grid[0] if entry.grid else None
    final_runs = [runner.run(workload, entry, chosen[s], s, validation=False) for s in seeds]
    return {
        "label": entry.label,
        "optimizer": entry.optimizer,
        "gain": entry.gain,
        "description": entry.description,
        "grid": list(entry.grid),
        "tuned": entry.tuned,
        "tuned_per_seed": bool(entry.tuned and per_seed),
        "chosen_lr": {str(s): chosen[s] for s in seeds},
        "grid_runs": grid_runs,
        "final_runs": final_runs,
    }


# --------------------------------------------------------------------------------------------------
# Summaries, table and plots.


def summarize(cells: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per cell: accuracy mean/std, steps to 95% of the workload's best, and compute totals."""
    out = []
    for c in cells:
        accs = [r["test_accuracy"] for r in c["final_runs"]]
        mean, std = mean_std(accs)
        out.append(dict(label=c["label"], mean=mean, std=std, n=len(accs)))
    means = [s["mean"] for s in out if _finite(s["mean"])]
    best = max(means) if means else math.nan
    target = TARGET_FRACTION * best
    for s, c in zip(out, cells):
        reached = [
            steps_to_target(r["curve"], target, r["steps_per_epoch"]) for r in c["final_runs"]
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
    return {"best_mean_accuracy": best, "target_accuracy": target, "cells": out}


def _lr_text(cell: dict[str, Any], s: dict[str, Any]) -> str:
    if cell["optimizer"] == "agd":
        return f"none (gain {cell['gain']:g})"
    if not cell["tuned"]:
        lr = s["chosen_lrs"][0]
        return "default" if lr is None else f"{lr:g} (fixed)"
    text = " / ".join(f"{lr:g}" for lr in s["chosen_lrs"])
    if len(set(s["chosen_lrs"])) == 1:
        text = f"{s['chosen_lrs'][0]:g}"
    return text + (" (grid edge)" if s["grid_edge"] else "")


def _fmt_steps(x: float | None) -> str:
    return "-" if x is None else f"{x:,.0f}"


def markdown(suite: str, result: dict[str, Any]) -> str:
    meta = result["meta"]
    lines = [
        f"# Evidence suite: {suite}",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"Hardware: {meta['hardware']}; JAX {meta['jax']}, optax {meta['optax']}. "
        f"{meta['seeds']} seed(s) per final cell; learning-rate grids of "
        f"{meta['grid_description']}, each point trained once on 80% of the training set and "
        "scored on the held-out 20% (final validation accuracy picks the learning rate; the test "
        "set is never used to choose). Constant learning rates, no weight decay.",
        "",
        "Columns: final test accuracy (mean ± sample std over seeds); steps to 95% of the best "
        "final accuracy in the table (first epoch whose test accuracy reaches it, times steps per "
        "epoch; mean over the seeds that reach it); total compute = every training step and wall "
        "second spent on the cell, the whole learning-rate grid included (wall seconds include "
        "compilation and evaluation, on a shared machine: indicative only).",
        "",
    ]
    for w in result["workloads"]:
        summ = w["summary"]
        lines += [
            f"## {w['title']}",
            "",
            f"{w['epochs']} epochs of {w['steps_per_epoch']} steps (batch {w['train_bs']}). "
            f"Best mean final test accuracy {summ['best_mean_accuracy']:.4f}; "
            f"95% of it: {summ['target_accuracy']:.4f}.",
            "",
        ]
        if any(c.get("tuned_per_seed") for c in w["cells"]):
            lines += [
                "This dataset's train/test split is drawn from the seed, so each tuned optimizer's "
                "grid is run on every seed's own training set (one grid per seed, all counted in "
                "its compute) and the learning rates chosen are listed per seed.",
                "",
            ]
        lines += [
            "| optimizer | learning rate | test accuracy | steps to 95% of best | grid runs "
            "| total steps (incl. grid) | total wall s (incl. grid) |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for cell, s in zip(w["cells"], summ["cells"]):
            reached = _fmt_steps(s["steps_to_target"])
            if s["steps_to_target"] is not None and s["reached"] < s["n"]:
                reached += f" ({s['reached']}/{s['n']} seeds)"
            elif s["steps_to_target"] is None:
                reached = "not reached"
            lines.append(
                f"| {cell['label']} | {_lr_text(cell, s)} | {s['mean']:.4f} ± {s['std']:.4f} "
                f"| {reached} | {s['grid_runs']} | {s['total_steps']:,} | {s['total_wall_s']:.0f} |"
            )
        lines.append("")
    return "\n".join(lines)


_COLORS = {
    "agd": "tab:blue",
    "agd_gain10": "tab:cyan",
    "sgd_momentum": "tab:orange",
    "adam": "tab:green",
    "nadamw": "tab:red",
    "prodigy": "tab:purple",
    "dog": "tab:brown",
    "dadapt_adamw": "tab:pink",
    "cocob": "tab:gray",
    "mechanize": "tab:olive",
    "schedule_free_adamw": "black",
}


def _colors(cells: Sequence[dict[str, Any]]) -> list[Any]:
    import matplotlib

    spare = matplotlib.colormaps["tab20"]
    return [_COLORS.get(c["label"], spare(i % 20)) for i, c in enumerate(cells)]


def plot_curves(result: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = result["workloads"]
    fig, axes = plt.subplots(1, len(workloads), figsize=(6.5 * len(workloads), 4.5), squeeze=False)
    for ax, w in zip(axes[0], workloads):
        colors = _colors(w["cells"])
        for color, cell in zip(colors, w["cells"]):
            curves = [r["curve"] for r in cell["final_runs"]]
            n = min(len(c) for c in curves)
            if n == 0:
                continue
            acc = np.array(
                [
                    [
                        np.nan if c[i]["test_accuracy"] is None else c[i]["test_accuracy"]
                        for i in range(n)
                    ]
                    for c in curves
                ],
                dtype=np.float64,
            )
            epochs = np.arange(1, n + 1)
            mean = acc.mean(axis=0)
            style = "-" if cell["optimizer"] == "agd" else "--" if cell["tuned"] else ":"
            width = 2.2 if cell["optimizer"] == "agd" else 1.3
            ax.plot(epochs, mean, style, color=color, lw=width, label=cell["label"])
            if acc.shape[0] > 1:
                ax.fill_between(epochs, acc.min(axis=0), acc.max(axis=0), color=color, alpha=0.12)
        ax.set_title(w["title"], fontsize=9)
        ax.set_xlabel("epoch")
        ax.set_ylabel("test accuracy (mean over seeds; band: min-max)")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"{result['suite']}: solid AGD, dashed tuned (chosen lr), dotted lr-free defaults")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_compute(result: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = result["workloads"]
    fig, axes = plt.subplots(1, len(workloads), figsize=(6.5 * len(workloads), 4.5), squeeze=False)
    for ax, w in zip(axes[0], workloads):
        colors = _colors(w["cells"])
        summaries = w["summary"]["cells"]
        # Cells with the same compute (every untuned one) are spread slightly along x to be seen.
        groups: dict[float, list[int]] = collections.defaultdict(list)
        for i, s in enumerate(summaries):
            groups[s["total_steps"]].append(i)
        spread = {}
        for members in groups.values():
            for k, i in enumerate(members):
                spread[i] = 1.03 ** (k - (len(members) - 1) / 2)
        for i, (color, cell, s) in enumerate(zip(colors, w["cells"], summaries)):
            marker = "*" if cell["optimizer"] == "agd" else "s" if cell["tuned"] else "o"
            ax.errorbar(
                s["total_steps"] * spread[i],
                s["mean"],
                yerr=s["std"],
                fmt=marker,
                color=color,
                ms=12 if marker == "*" else 7,
                capsize=3,
                label=cell["label"],
            )
        ax.set_xscale("log")
        ax.set_title(w["title"], fontsize=9)
        ax.set_xlabel(
            "total training steps, learning-rate grid included (log; equal values spread)"
        )
        ax.set_ylabel("final test accuracy (mean ± std)")
        ax.grid(alpha=0.3, which="both")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.suptitle(
        f"{result['suite']}: accuracy against the compute it cost (star AGD, square tuned)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------
# The program.


def _hardware() -> str:
    import jax

    dev = jax.devices()[0]
    if dev.platform == "cpu":
        return f"a {os.cpu_count()}-core CPU ({platform.machine()})"
    return f"{len(jax.devices())} x {dev.device_kind}"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.compare", description=__doc__.splitlines()[0]
    )
    p.add_argument("--suite", choices=tuple(SUITES), default="digits")
    p.add_argument("--data-dir", default=None, help="dataset folder (cifar10, cifar100, imagenet)")
    p.add_argument("--download", action="store_true", help="download CIFAR if missing")
    p.add_argument("--seeds", type=int, default=3, help="seeds per final cell")
    p.add_argument("--epochs", type=int, default=None, help="override every workload's epochs")
    p.add_argument(
        "--grid",
        default=None,
        help="learning-rate grid of the tuned baselines: a point count (log-spaced over each "
        "optimizer's default range) or comma-separated values",
    )
    p.add_argument("--optimizers", default=None, help="comma-separated subset of the table rows")
    p.add_argument("--workloads", default=None, help="comma-separated subset of the suite")
    p.add_argument("--train-bs", type=int, default=None, help="override the batch size")
    p.add_argument("--out", default=os.path.join("benchmarks", "results"))
    p.add_argument("--runs-dir", default="runs", help="workdirs go to RUNS_DIR/compare/<suite>")
    p.add_argument(
        "--quick", action="store_true", help="smoke run: 1 seed, 2 epochs, 2 grid points"
    )
    p.add_argument("--verbose", action="store_true", help="show the per-epoch lines of every run")
    p.add_argument(
        "--from-json",
        default=None,
        help="train nothing: redraw the table and plots of a saved <suite>.json into --out",
    )
    args = p.parse_args(argv)
    if args.from_json:
        return args
    if args.quick:
        args.seeds, args.epochs = 1, args.epochs or 2
        args.grid = args.grid or "2"
    if args.suite in SUITES_NEEDING_DATA and args.data_dir is None and not args.download:
        p.error(f"--suite {args.suite} needs --data-dir (the dataset is not downloaded here)")
    if args.seeds < 1:
        p.error("--seeds must be >= 1")
    try:
        args.grid = parse_grid(args.grid)
    except ValueError as e:
        p.error(str(e))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json:
        with open(args.from_json) as f:
            write_outputs(json.load(f), args.out, write_json=False)
        return 0
    import jax
    import optax

    suite = args.suite
    workloads = list(SUITES[suite])
    if args.workloads:
        wanted = [w.strip() for w in args.workloads.split(",") if w.strip()]
        workloads = [w for w in workloads if w.name in wanted]
        if not workloads:
            raise SystemExit(f"no workload of suite {suite} among {wanted}")
    names = [n.strip() for n in args.optimizers.split(",")] if args.optimizers else None
    overrides: dict[str, Any] = {}
    if args.epochs:
        overrides["epochs"] = args.epochs
    if args.train_bs:
        overrides["train_bs"] = args.train_bs
    runs_dir = os.path.join(args.runs_dir, "compare", suite)
    if args.data_dir is not None:
        overrides["data_dir"] = args.data_dir
    elif suite == "mnist1d":  # Cache the generated arrays instead of regenerating for every run.
        overrides["data_dir"] = os.path.join(args.runs_dir, "data")
    if args.download:
        overrides["download"] = True
    runner = Runner(runs_dir, overrides, verbose=args.verbose)

    command = "uv run python -m benchmarks.compare " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)
    )
    grid_desc = (
        f"{args.grid} points"
        if isinstance(args.grid, int)
        else "/".join(f"{v:g}" for v in args.grid)
        if isinstance(args.grid, tuple)
        else f"{len(SGD_GRID)} points (SGD {SGD_GRID[0]:g}..{SGD_GRID[-1]:g}, Adam and NadamW "
        f"{ADAM_GRID[0]:g}..{ADAM_GRID[-1]:g}, half-decade steps)"
    )
    result: dict[str, Any] = {
        "suite": suite,
        "meta": {
            "command": command.strip(),
            "hardware": _hardware(),
            "jax": jax.__version__,
            "optax": optax.__version__,
            "seeds": args.seeds,
            "grid_description": grid_desc,
            "validation_split": VALIDATION_SPLIT,
            "target_fraction": TARGET_FRACTION,
        },
        "workloads": [],
    }
    seeds = list(range(args.seeds))
    t_start = time.perf_counter()
    for workload in workloads:
        entries = entries_for(args.grid, names, workload.config["dataset"])
        runner.warm_up(workload)
        cells = [run_cell(runner, workload, e, seeds) for e in entries]
        config = runner.config(workload, entries[0], None, seeds[0], 0.0)
        result["workloads"].append(
            {
                "name": workload.name,
                "title": workload.title,
                "config": {
                    k: v
                    for k, v in dataclasses.asdict(config).items()
                    if k not in ("optimizer", "gain", "lr", "seed")
                },
                "epochs": config.epochs,
                "train_bs": config.train_bs,
                "steps_per_epoch": _steps_per_epoch(config, runner.spe_cache),
                "cells": cells,
                "summary": summarize(cells),
            }
        )
    result["meta"]["suite_wall_s"] = time.perf_counter() - t_start

    write_outputs(result, args.out)
    return 0


def write_outputs(result: dict[str, Any], out: str, write_json: bool = True) -> dict[str, str]:
    """The table, the JSON and the two plots of a suite's result, under ``out``."""
    suite = result["suite"]
    os.makedirs(out, exist_ok=True)
    paths = {
        "markdown": os.path.join(out, f"{suite}.md"),
        "json": os.path.join(out, f"{suite}.json"),
        "curves": os.path.join(out, f"{suite}_curves.png"),
        "compute": os.path.join(out, f"{suite}_compute.png"),
    }
    text = markdown(suite, result)
    with open(paths["markdown"], "w") as f:
        f.write(text + "\n")
    if write_json:
        with open(paths["json"], "w") as f:
            json.dump(_clean(result), f, separators=(",", ":"))
            f.write("\n")
    plot_curves(result, paths["curves"])
    plot_compute(result, paths["compute"])
    print(text, flush=True)
    if not write_json:
        del paths["json"]
    print("wrote " + ", ".join(paths.values()), flush=True)
    return paths


if __name__ == "__main__":
    sys.exit(main())
