"""The evidence suite's command line: ``python -m benchmarks.compare``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
import time
from collections.abc import Sequence
from typing import Any

from benchmarks.compare.protocol import (
    TARGET_FRACTION,
    VALIDATION_SPLIT,
    entries_for,
    parse_grid,
    run_cell,
    summarize,
)
from benchmarks.compare.report import write_outputs
from benchmarks.compare.runner import Runner
from benchmarks.compare.workloads import ENTRIES, SUITES, needs_data_dir
from benchmarks.data import DATASETS
from benchmarks.reporting import hardware_description

DESCRIPTION = (
    "Evidence suite: AGD against tuned and learning-rate-free baselines, tuning cost included."
)


def _default_grids(entries: Sequence[Any] = ENTRIES) -> str:
    """The default grids in words: ``5 points (sgd_momentum 0.003..0.3; adam, nadamw 1e-4..0.01)``."""
    grids: dict[tuple[float, ...], list[str]] = {}
    for e in entries:
        if e.tuned:
            grids.setdefault(e.grid, []).append(e.label)
    if not grids:
        return "none (no row is tuned)"
    sizes = sorted({len(g) for g in grids})
    ranges = "; ".join(f"{', '.join(labels)} {g[0]:g}..{g[-1]:g}" for g, labels in grids.items())
    return f"{'/'.join(map(str, sizes))} log-spaced points ({ranges})"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.compare", description=DESCRIPTION)
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
        "--add-to",
        default=None,
        help="add the rows trained now (--optimizers) to a saved <suite>.json of the same suite "
        "and seeds, recomputing its table and plots, instead of writing a new one",
    )
    p.add_argument(
        "--from-json",
        default=None,
        help="train nothing: redraw the table and plots of a saved <suite>.json into --out; "
        "several comma-separated files of one suite are merged (rows added to each workload, a "
        "later file's row replacing an earlier one's of the same label) and the merged JSON saved",
    )
    args = p.parse_args(argv)
    if args.from_json:
        return args
    if args.quick:
        args.seeds, args.epochs = 1, args.epochs or 2
        args.grid = args.grid or "2"
    if needs_data_dir(args.suite) and args.data_dir is None and not args.download:
        p.error(f"--suite {args.suite} needs --data-dir (the dataset is not downloaded here)")
    if args.seeds < 1:
        p.error("--seeds must be >= 1")
    try:
        args.grid = parse_grid(args.grid)
    except ValueError as e:
        p.error(str(e))
    return args


def merge_results(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One suite's results from several runs of the program (for example one per subset of
    ``--optimizers``): each workload's rows in order of first appearance, a later result's row
    replacing an earlier one of the same label, and the summaries recomputed."""
    suites = {r["suite"] for r in results}
    if len(suites) != 1:
        raise ValueError(f"--from-json: files of different suites {sorted(suites)} cannot merge")
    merged = json.loads(json.dumps(results[0]))
    merged["meta"]["command"] = " ; ".join(r["meta"]["command"] for r in results)
    for key in ("added", "merged"):  # Every file's later additions and merges stay on record.
        records = [a for r in results for a in r["meta"].get(key, [])]
        if records:
            merged["meta"][key] = records
    workloads = {w["name"]: w for w in merged["workloads"]}
    for result in results[1:]:
        for w in result["workloads"]:
            if w["name"] not in workloads:
                workloads[w["name"]] = {**w, "cells": []}
                merged["workloads"].append(workloads[w["name"]])
            _put_cells(workloads[w["name"]], w["cells"])
    return merged


def _put_cells(workload: dict[str, Any], cells: Sequence[dict[str, Any]]) -> None:
    """Adds ``cells`` to a saved workload's rows (one of the same label is replaced, keeping its
    place) and recomputes the workload's summary."""
    by_label = {c["label"]: c for c in workload["cells"]}
    by_label.update({c["label"]: c for c in cells})
    workload["cells"] = list(by_label.values())
    workload["summary"] = summarize(workload["cells"], workload.get("metric", "accuracy"))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json:
        paths = [p for p in args.from_json.split(",") if p]
        results = []
        for path in paths:
            with open(path) as f:
                results.append(json.load(f))
        merged = results[0]
        if len(results) > 1:
            merged = merge_results(results)
            merged["meta"].setdefault("merged", []).append(_command_line(argv))
        write_outputs(merged, args.out, write_json=len(results) > 1)
        return 0
    import jax
    import optax

    suite = args.suite
    if args.add_to:  # Refuse before training anything.
        _load_compatible(args.add_to, suite, args.seeds, hardware_description())
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
    elif all(DATASETS[w.config["dataset"]].caches for w in workloads):  # Generated once.
        overrides["data_dir"] = os.path.join(args.runs_dir, "data")
    if args.download:
        overrides["download"] = True
    runner = Runner(runs_dir, overrides, verbose=args.verbose)

    command = _command_line(argv)
    grid_desc = (
        f"{args.grid} points"
        if isinstance(args.grid, int)
        else "/".join(f"{v:g}" for v in args.grid)
        if isinstance(args.grid, tuple)
        else _default_grids([e for w in workloads for e in (w.entries or ENTRIES)])
    )
    result: dict[str, Any] = {
        "suite": suite,
        "meta": {
            "command": command,
            "hardware": hardware_description(),
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
        entries = entries_for(args.grid, names, workload.config["dataset"], workload.entries)
        runner.warm_up(workload)
        cells = [run_cell(runner, workload, e, seeds) for e in entries]
        config = runner.config(workload, entries[0], None, seeds[0], 0.0)
        result["workloads"].append(
            {
                "name": workload.name,
                "title": workload.title,
                "metric": workload.metric,
                "config": {
                    k: v
                    for k, v in dataclasses.asdict(config).items()
                    if k not in ("optimizer", "gain", "lr", "seed")
                },
                "epochs": config.epochs,
                "train_bs": config.train_bs,
                "steps_per_epoch": cells[0]["final_runs"][0]["steps_per_epoch"],
                "cells": cells,
                "summary": summarize(cells, workload.metric),
            }
        )
    result["meta"]["suite_wall_s"] = time.perf_counter() - t_start

    if args.add_to:
        result = add_rows(result, args.add_to)
    write_outputs(result, args.out)
    return 0


def _command_line(argv: Sequence[str] | None) -> str:
    """This invocation as a command to paste."""
    args = sys.argv[1:] if argv is None else argv
    return ("uv run python -m benchmarks.compare " + " ".join(map(shlex.quote, args))).strip()


def _load_compatible(path: str, suite: str, seeds: int, hardware: str) -> dict[str, Any]:
    """The saved result at ``path``, refused unless rows trained now are comparable with it."""
    with open(path) as f:
        base = json.load(f)
    if base["suite"] != suite:
        raise ValueError(f"--add-to {path} holds suite {base['suite']!r}, not {suite!r}")
    for key, value in (("seeds", seeds), ("hardware", hardware)):
        if base["meta"][key] != value:
            raise ValueError(
                f"--add-to {path}: its {key} {base['meta'][key]!r} differs from this run's "
                f"{value!r}; the rows would not be comparable"
            )
    return base


def add_rows(new: dict[str, Any], path: str) -> dict[str, Any]:
    """The saved result at ``path`` with ``new``'s cells added (a cell of the same label is
    replaced) and every workload's summary recomputed; the command is recorded with the rows."""
    base = _load_compatible(path, new["suite"], new["meta"]["seeds"], new["meta"]["hardware"])
    workloads = {w["name"]: w for w in base["workloads"]}
    labels: list[str] = []
    for w in new["workloads"]:
        if w["name"] not in workloads:
            raise ValueError(f"--add-to {path} has no workload {w['name']!r}")
        _put_cells(workloads[w["name"]], w["cells"])
        labels += [cell["label"] for cell in w["cells"]]
    base["meta"].setdefault("added", []).append(
        {"command": new["meta"]["command"], "rows": sorted(set(labels))}
    )
    return base
