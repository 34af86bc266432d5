"""The evidence suite's command line: ``python -m benchmarks.compare``."""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

from benchmarks.compare.pool import run_in_workers
from benchmarks.compare.protocol import (
    TARGET_FRACTION,
    VALIDATION_SPLIT,
    entries_for,
    parse_grid,
    rows_deciding_the_bar,
    run_cell,
    summarize,
)
from benchmarks.compare.report import write_outputs
from benchmarks.compare.runner import Runner
from benchmarks.compare.saved import (
    add_rows,
    command_line,
    load_compatible,
    put_cells,
    redraw_from_json,
)
from benchmarks.compare.sizing import epoch_rule, time_one
from benchmarks.compare.workloads import (
    ENTRIES,
    PEERS,
    SUITES,
    Entry,
    Workload,
    candidate_entries,
    needs_data_dir,
)
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
    """The command line ``argv`` (``sys.argv[1:]`` when None), checked; ``--grid`` parsed."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.compare", description=DESCRIPTION)
    _add_selection_flags(p)
    _add_output_flags(p)
    _add_saved_result_flags(p)
    _add_protocol_flags(p)
    _add_mode_flags(p)
    args = p.parse_args(argv)
    if args.from_json:
        return args
    _check_args(p, args)
    return args


def _add_selection_flags(p: argparse.ArgumentParser) -> None:
    """What is trained: the suite and its data, the seeds, epochs, grid, rows and workloads."""
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


def _add_output_flags(p: argparse.ArgumentParser) -> None:
    """Where the results and workdirs go, and how much of a run is done and shown."""
    p.add_argument("--out", default=os.path.join("benchmarks", "results"))
    p.add_argument("--runs-dir", default="runs", help="workdirs go to RUNS_DIR/compare/<suite>")
    p.add_argument(
        "--quick", action="store_true", help="smoke run: 1 seed, 2 epochs, 2 grid points"
    )
    p.add_argument("--verbose", action="store_true", help="show the per-epoch lines of every run")


def _add_saved_result_flags(p: argparse.ArgumentParser) -> None:
    """Rows added to a saved result, and saved results redrawn or merged."""
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


def _add_protocol_flags(p: argparse.ArgumentParser) -> None:
    """The protocol's options: candidate rows, grid extensions, reuse of runs, extra seeds."""
    p.add_argument(
        "--candidates",
        default=None,
        help="comma-separated optimizer names (registered in benchmarks/optimizers.py) added as "
        "rows of every workload, beside the suite's own",
    )
    p.add_argument(
        "--max-extensions",
        type=int,
        default=None,
        help="points a tuned row's grid may gain past the edge its choice sits on (default: the "
        "workload's; 4 in heldout2, 0 elsewhere)",
    )
    p.add_argument(
        "--fresh",
        action="store_true",
        help="train every run again (by default a run whose workdir holds the record of a "
        "finished run of the same settings is read back, not retrained: a stopped suite resumes)",
    )
    p.add_argument(
        "--extra-seeds-for",
        default=None,
        help="rows that get --extra-seeds seeds instead of --seeds (their first runs reused): "
        "comma-separated labels, or 'bar:CANDIDATE' for the rows deciding the bar whose "
        "spreads overlap (CANDIDATE, the best tuned row, the best zero-settings peer), per workload",
    )
    p.add_argument("--extra-seeds", type=int, default=5, help="seeds of --extra-seeds-for rows")


def _add_mode_flags(p: argparse.ArgumentParser) -> None:
    """The sizing modes (``--epoch-rule``, ``--time-one``) and the worker processes."""
    p.add_argument(
        "--epoch-rule",
        action="store_true",
        help="run only the tuned rows' grids (validation runs) and print, for the best tuned row, "
        "the rise of its validation accuracy over the last fifth of its epochs",
    )
    p.add_argument(
        "--time-one",
        default=None,
        metavar="ROW",
        help="sizing: one final-split run of ROW on the one workload of --workloads, printing "
        "only its wall time and the runs the workload's rows need (no loss, no accuracy)",
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="cells trained at once, each in its own process with one XLA thread",
    )


def _check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Applies ``--quick``, refuses inconsistent flags (``p.error``) and parses ``--grid``."""
    if args.quick:
        args.seeds, args.epochs = 1, args.epochs or 2
        args.grid = args.grid or "2"
    if needs_data_dir(args.suite) and args.data_dir is None and not args.download:
        p.error(f"--suite {args.suite} needs --data-dir (the dataset is not downloaded here)")
    if args.seeds < 1:
        p.error("--seeds must be >= 1")
    if args.extra_seeds_for and args.extra_seeds <= args.seeds:
        p.error(f"--extra-seeds ({args.extra_seeds}) must exceed --seeds ({args.seeds})")
    if args.jobs < 1:
        p.error("--jobs must be >= 1")
    if args.max_extensions is not None and args.max_extensions < 0:
        p.error("--max-extensions must be >= 0")
    try:
        args.grid = parse_grid(args.grid)
    except ValueError as e:
        p.error(str(e))


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line ``argv`` (``sys.argv[1:]`` when None); returns the exit status."""
    args = parse_args(argv)
    if args.from_json:
        return redraw_from_json(args.from_json, args.out, argv)
    if args.add_to:  # Refuse before training anything.
        load_compatible(args.add_to, args.suite, args.seeds, hardware_description())
    workloads = _selected_workloads(args)
    plan = _plan(args, workloads)
    runner = _make_runner(args, workloads)
    if args.time_one:
        return time_one(runner, workloads, plan, args.time_one, args.seeds)
    if args.epoch_rule:
        return _run_epoch_rule(args, runner, workloads, plan)
    return _run_suite(args, argv, runner, workloads, plan)


def _plan(args: argparse.Namespace, workloads: Sequence[Workload]) -> dict[str, list[Entry]]:
    """Per workload name, the rows to train (``--grid``, ``--optimizers``, ``--candidates``)."""
    names = [n.strip() for n in args.optimizers.split(",")] if args.optimizers else None
    candidates = [n.strip() for n in (args.candidates or "").split(",") if n.strip()]
    return {w.name: _workload_entries(w, args.grid, names, candidates) for w in workloads}


def _run_epoch_rule(
    args: argparse.Namespace,
    runner: Runner,
    workloads: Sequence[Workload],
    plan: dict[str, list[Entry]],
) -> int:
    """``--epoch-rule``: trains only the tuned rows' grids and prints the epoch rule."""
    tuned = {w.name: [e for e in plan[w.name] if e.tuned] for w in workloads}
    _pool(args, runner, workloads, tuned, seeds=None)
    return epoch_rule(runner, workloads, tuned, args.max_extensions, args.out)


def _run_suite(
    args: argparse.Namespace,
    argv: Sequence[str] | None,
    runner: Runner,
    workloads: Sequence[Workload],
    plan: dict[str, list[Entry]],
) -> int:
    """The suite run: every cell of ``plan``, the ``--extra-seeds-for`` rows' extra seeds, and
    the outputs written (added to ``--add-to``'s result when given)."""
    result = _new_result(args, argv, workloads, plan)
    seeds = list(range(args.seeds))
    t_start = time.perf_counter()
    _pool(args, runner, workloads, plan, seeds)
    for workload in workloads:
        entries = plan[workload.name]
        runner.warm_up(workload)
        cells = [run_cell(runner, workload, e, seeds, args.max_extensions) for e in entries]
        result["workloads"].append(_workload_result(runner, workload, entries, cells, seeds))
    runner.resume = True  # With --fresh too: the runs trained just now are reused below.
    if args.extra_seeds_for:
        _add_extra_seeds(args, runner, workloads, plan, result)
    result["meta"]["suite_wall_s"] = time.perf_counter() - t_start
    if runner.reused:
        result["meta"]["runs_reused"] = runner.reused

    if args.add_to:
        result = add_rows(result, args.add_to)
    write_outputs(result, args.out)
    return 0


def _grid_description(grid: int | tuple[float, ...] | None, entries: Sequence[Entry]) -> str:
    """``--grid`` in words: its point count, its values, or the default grids of ``entries``."""
    if isinstance(grid, int):
        return f"{grid} points"
    if isinstance(grid, tuple):
        return "/".join(f"{v:g}" for v in grid)
    return _default_grids(entries)


def _new_result(
    args: argparse.Namespace,
    argv: Sequence[str] | None,
    workloads: Sequence[Workload],
    plan: dict[str, list[Entry]],
) -> dict[str, Any]:
    """The suite's result before any workload: the suite, and the run's settings in ``meta``."""
    import jax
    import optax

    command = command_line(argv)
    grid_desc = _grid_description(args.grid, [e for w in workloads for e in plan[w.name]])
    return {
        "suite": args.suite,
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


def _add_extra_seeds(
    args: argparse.Namespace,
    runner: Runner,
    workloads: Sequence[Workload],
    plan: dict[str, list[Entry]],
    result: dict[str, Any],
) -> None:
    """``--extra-seeds-for``: trains the chosen rows with ``--extra-seeds`` seeds (their first
    runs reused), replaces their cells in ``result`` and records the rule in its ``meta``."""
    more = _rows_for_more_seeds(args.extra_seeds_for, result["workloads"])
    wanted = {w: [e for e in plan[w] if e.label in labels] for w, labels in more.items()}
    _pool(args, runner, workloads, wanted, list(range(args.extra_seeds)))
    for workload, saved in zip(workloads, result["workloads"]):
        extra = [
            run_cell(runner, workload, e, range(args.extra_seeds), args.max_extensions)
            for e in wanted[workload.name]
        ]
        put_cells(saved, extra)
    result["meta"]["extra_seeds"] = {
        "seeds": args.extra_seeds,
        "rule": args.extra_seeds_for,
        "rows": more,
    }


def _selected_workloads(args: argparse.Namespace) -> list[Workload]:
    workloads = list(SUITES[args.suite])
    if args.workloads:
        wanted = [w.strip() for w in args.workloads.split(",") if w.strip()]
        workloads = [w for w in workloads if w.name in wanted]
        if not workloads:
            raise SystemExit(f"no workload of suite {args.suite} among {wanted}")
    return workloads


def _workload_entries(
    workload: Workload,
    grid: int | tuple[float, ...] | None,
    names: Sequence[str] | None,
    candidates: Sequence[str],
) -> list[Entry]:
    """The workload's rows (its own, or ``ENTRIES``, and the ``candidates``'), ``grid`` applied
    and ``names`` selected."""
    own = tuple(workload.entries or ENTRIES)
    known = {e.label for e in own}
    extra = tuple(e for e in candidate_entries(candidates) if e.label not in known)
    return entries_for(grid, names, workload.config["dataset"], own + extra)


def _make_runner(args: argparse.Namespace, workloads: Sequence[Workload]) -> Runner:
    overrides: dict[str, Any] = {}
    if args.epochs:
        overrides["epochs"] = args.epochs
    if args.train_bs:
        overrides["train_bs"] = args.train_bs
    if args.data_dir is not None:
        overrides["data_dir"] = args.data_dir
    elif all(DATASETS[w.config["dataset"]].caches for w in workloads):  # Generated once.
        overrides["data_dir"] = os.path.join(args.runs_dir, "data")
    if args.download:
        overrides["download"] = True
    runs_dir = os.path.join(args.runs_dir, "compare", args.suite)
    return Runner(runs_dir, overrides, verbose=args.verbose, resume=not args.fresh)


def _pool(
    args: argparse.Namespace,
    runner: Runner,
    workloads: Sequence[Workload],
    plan: Mapping[str, Sequence[Entry]],
    seeds: Sequence[int] | None,
) -> None:
    """With ``--jobs N`` (N > 1), trains the cells of ``plan`` (only their grids when ``seeds``
    is None) in N worker processes first; the caller then reads every run back."""
    if args.jobs <= 1:
        return
    tasks = [
        (w.name, e, None if seeds is None else list(seeds), args.max_extensions)
        for w in workloads
        for e in plan.get(w.name, ())
    ]
    run_in_workers(args.suite, runner, tasks, args.jobs, fresh=args.fresh)
    runner.resume = True  # What the workers trained is read back, --fresh or not.


def _workload_result(
    runner: Runner,
    workload: Workload,
    entries: Sequence[Entry],
    cells: list[dict[str, Any]],
    seeds: Sequence[int],
) -> dict[str, Any]:
    config = runner.config(workload, entries[0], None, seeds[0], 0.0)
    return {
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


def _rows_for_more_seeds(rule: str, workloads: Sequence[dict[str, Any]]) -> dict[str, list[str]]:
    """Per workload, the rows of ``--extra-seeds-for``: the labels given, or with ``bar:NAME`` the
    rows deciding the bar whose spreads overlap (``rows_deciding_the_bar``)."""
    out = {}
    for w in workloads:
        metric = w.get("metric", "accuracy")
        if rule.startswith("bar:"):
            labels = rows_deciding_the_bar(w["summary"], w["cells"], rule[4:], PEERS, metric)
        else:
            labels = [x.strip() for x in rule.split(",") if x.strip()]
            unknown = sorted(set(labels) - {c["label"] for c in w["cells"]})
            if unknown:
                raise ValueError(f"--extra-seeds-for: no row {unknown} on workload {w['name']}")
        out[w["name"]] = labels
        print(f"{w['name']}: more seeds for {', '.join(labels) or 'no row'}", flush=True)
    return out
