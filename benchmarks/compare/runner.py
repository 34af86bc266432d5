"""The runner: single trainings of the training program, recorded for the suite."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import sys
import time
from typing import Any

from benchmarks.compare.protocol import VALIDATION_SPLIT
from benchmarks.compare.workloads import ENTRIES, Entry, Workload
from benchmarks.config import Config
from benchmarks.optimizers import OPTIMIZERS
from benchmarks.run_folder import read_metrics

RECORD_FILE = "record.json"  # A finished run's record, beside its metrics.


def _lr_tag(lr: float | None) -> str:
    return "default" if lr is None else f"lr{lr:g}"


def load_record(workdir: str, key: str) -> dict[str, Any] | None:
    """The record a finished run left in ``workdir``, if it was made with the settings ``key``
    (``Config.computation_key``); None otherwise (no run, an unfinished one, other settings)."""
    path = os.path.join(workdir, RECORD_FILE)
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return None
    if saved.get("config_key") != key:
        return None
    return saved["record"]


def save_record(workdir: str, key: str, record: dict[str, Any]) -> None:
    """Writes a finished run's record (atomically: a run stopped mid-write leaves none)."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, RECORD_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        # NumPy scalars as Python numbers; NaN (a diverged run) is kept as NaN.
        json.dump({"config_key": key, "record": record}, f, default=lambda x: x.item())
    os.replace(tmp, path)


def _agd_rule(entry: Entry) -> dict[str, Any]:
    """The Config field naming AGD's rule, for the rows of ``agd`` only."""
    return {"agd_rule": entry.agd_rule} if entry.optimizer == "agd" else {}


class Runner:
    """Runs single trainings of the training program and records them.

    With ``resume`` (the default), a run whose workdir holds the record of a finished run of the
    same settings is not trained again: its record is read back, so that a suite stopped midway
    goes on where it stopped when its command is given again."""

    def __init__(
        self,
        runs_dir: str,
        overrides: dict[str, Any],
        verbose: bool = False,
        resume: bool = True,
    ):
        self.runs_dir = runs_dir
        self.overrides = overrides
        self.verbose = verbose
        self.resume = resume
        self.count = 0
        self.reused = 0
        self._cold: set[str] = set()  # Workloads whose warm-up waits for a run to train.
        self.warm_up_dir = "warm_up"  # Under runs_dir; one per process when several train at once.

    def config(self, workload: Workload, entry: Entry, lr, seed: int, split: float) -> Config:
        values: dict[str, Any] = dict(workload.config)
        values.update(self.overrides)
        return Config(
            **values,
            optimizer=entry.optimizer,
            optimizer_options=dict(entry.options),
            gain=entry.gain,
            lr=lr,
            **_agd_rule(entry),
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
        key = config.computation_key()
        if self.resume:
            record = load_record(workdir, key)
            if record is not None:
                self.reused += 1
                return record
        if workload.name in self._cold:
            self._cold.discard(workload.name)
            self.warm_up_now(workload)
        with contextlib.suppress(FileNotFoundError):  # Another settings' record: stale now.
            os.remove(os.path.join(workdir, RECORD_FILE))
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
        save_record(workdir, key, record)
        return record

    def warm_up(self, workload: Workload) -> None:
        """Tiny uncounted runs (AGD, SGD), so that no counted run pays the process's one-time
        start-up costs (JAX initialisation, compiling AGD's orthogonal initialisation). With
        ``resume``, they wait for the workload's first run that is not read back."""
        if self.resume:
            self._cold.add(workload.name)
        else:
            self.warm_up_now(workload)

    def warm_up_now(self, workload: Workload) -> None:
        from benchmarks.run import train_and_evaluate

        entries = {e.label: e for e in ENTRIES}
        for entry, lr in ((entries["agd"], None), (entries["sgd_momentum"], 0.01)):
            config = self.config(workload, entry, lr, 0, 0.0)
            config = dataclasses.replace(config, epochs=1, max_steps_per_epoch=2)
            with contextlib.redirect_stdout(io.StringIO()):
                train_and_evaluate(
                    config, os.path.join(self.runs_dir, self.warm_up_dir, entry.label)
                )
