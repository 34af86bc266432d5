"""The runner: single trainings of the training program, recorded for the suite."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import sys
import time
from typing import Any

from benchmarks.compare.protocol import VALIDATION_SPLIT
from benchmarks.compare.workloads import ENTRIES, Entry, Workload
from benchmarks.config import Config
from benchmarks.optimizers import OPTIMIZERS
from benchmarks.run_folder import read_metrics


def _lr_tag(lr: float | None) -> str:
    return "default" if lr is None else f"lr{lr:g}"


class Runner:
    """Runs single trainings of the training program and records them."""

    def __init__(self, runs_dir: str, overrides: dict[str, Any], verbose: bool = False):
        self.runs_dir = runs_dir
        self.overrides = overrides
        self.verbose = verbose
        self.count = 0

    def config(self, workload: Workload, entry: Entry, lr, seed: int, split: float) -> Config:
        values = dict(workload.config)
        values.update(self.overrides)
        return Config(
            **values,
            optimizer=entry.optimizer,
            optimizer_options=dict(entry.options),
            gain=entry.gain,
            lr=lr,
            **({"agd_rule": entry.agd_rule} if entry.optimizer == "agd" else {}),
            schedule=entry.schedule,
            warmup_epochs=entry.warmup_epochs,
            seed=seed,
            validation_split=split,
            progress=False,
            checkpoint=False,
            overwrite=True,  # The suite owns its run folders: a rerun replaces a run.
        ).validate()

    def run(
        self, workload: Workload, entry: Entry, lr: float | None, seed: int, validation: bool
    ) -> dict[str, Any]:
        from benchmarks.run import NonFiniteError, train_and_evaluate

        split = VALIDATION_SPLIT if validation else 0.0
        config = self.config(workload, entry, lr, seed, split)
        kind = "grid" if validation else "final"
        workdir = os.path.join(
            self.runs_dir, workload.name, entry.label, f"{kind}_{_lr_tag(lr)}_seed{seed}"
        )
        out = io.StringIO()
        t0 = time.perf_counter()
        diverged, steps = None, None
        try:
            with contextlib.redirect_stdout(sys.stdout if self.verbose else out):
                final = train_and_evaluate(config, workdir)
        except NonFiniteError as e:  # A diverged run is a result (NaN, ranked last), not a crash.
            diverged = str(e)
            nan = float("nan")
            final = dict(test_accuracy=nan, test_loss=nan, train_loss=nan)
            final["steps_per_epoch"], steps = e.steps_per_epoch, e.steps
        wall = time.perf_counter() - t0
        rows = read_metrics(workdir)
        spe = final["steps_per_epoch"]
        self.count += 1
        prefix = "val" if validation else "test"
        curve = [
            {
                "epoch": r["epoch"],
                "train_loss": r.get("train_loss"),
                "train_accuracy": r.get("train_accuracy"),
                f"{prefix}_loss": r.get("test_loss"),
                f"{prefix}_accuracy": r.get("test_accuracy"),
                **{name: r[name] for name in OPTIMIZERS[entry.optimizer].logged if name in r},
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
            "steps": spe * len(rows) if steps is None else steps,
            "wall_s": wall,
            f"{prefix}_accuracy": final.get("test_accuracy"),
            f"{prefix}_loss": final.get("test_loss"),
            "train_loss": final.get("train_loss"),
            "curve": curve,
            "workdir": workdir,
        }
        if diverged is not None:
            record["diverged"] = diverged
        value = record[f"{prefix}_{workload.metric}"]
        print(
            f"[{self.count}] {workload.name} {entry.label} {kind} {_lr_tag(lr)} seed {seed}: "
            f"{prefix} {workload.metric} {value:.4f}, {record['steps']} steps, {wall:.1f} s"
            + (" (diverged: stopped at a non-finite loss or state)" if diverged else ""),
            flush=True,
        )
        return record

    def warm_up(self, workload: Workload) -> None:
        """Tiny uncounted runs (AGD, SGD), so that no counted run pays the process's one-time
        start-up costs (JAX initialisation, compiling AGD's orthogonal initialisation)."""
        from benchmarks.run import train_and_evaluate

        entries = {e.label: e for e in ENTRIES}
        for entry, lr in ((entries["agd"], None), (entries["sgd_momentum"], 0.01)):
            config = self.config(workload, entry, lr, 0, 0.0)
            config = dataclasses.replace(config, epochs=1, max_steps_per_epoch=2)
            with contextlib.redirect_stdout(io.StringIO()):
                train_and_evaluate(config, os.path.join(self.runs_dir, "warm_up", entry.label))
