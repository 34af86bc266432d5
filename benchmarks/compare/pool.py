"""Several cells trained at once (``--jobs N``): N worker processes, each with one XLA thread
(left to the operating system to place: pinning each to a core was slower on a shared machine),
take the cells of a task list in turn (a cell is claimed by creating its claim file,
so no two workers train it) and leave each run's record in its workdir. The suite then reads every
run back (``Runner``'s resume), so the tables are made exactly as by one process.

A worker is ``worker(TASKS, INDEX)`` in a process of its own (``WORKER``: started with ``-c``,
since the package imports this module before ``-m`` could run it).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

from benchmarks.compare.workloads import SUITES, Entry

# One XLA thread per process: the processes, not the threads of one, share the cores.
ONE_THREAD = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


WORKER = (
    "import sys\nfrom benchmarks.compare.pool import worker\n"
    "sys.exit(worker(sys.argv[1], int(sys.argv[2])))"
)


def _entry_to_json(entry: Entry) -> dict[str, Any]:
    return dataclasses.asdict(entry)


def _entry_from_json(values: dict[str, Any]) -> Entry:
    values = dict(values)
    values["grid"] = tuple(values["grid"])
    values["options"] = tuple(tuple(o) for o in values["options"])
    return Entry(**values)


def _cost(task: dict[str, Any]) -> int:
    """Runs a task will train at least: its grid and its seeds."""
    return len(task["entry"]["grid"]) * (len(task["entry"]["grid"]) > 1) + len(task["seeds"] or ())


def run_in_workers(
    suite: str,
    runner: Any,
    tasks: Sequence[tuple[str, Entry, list[int] | None, int | None]],
    jobs: int,
    fresh: bool = False,
) -> None:
    """Trains ``tasks`` (workload name, entry, seeds or None for the grid alone, the grid's
    extension cap or None for the workload's) in ``jobs`` worker processes; returns when all
    are done. A worker that fails is reported; its cells are left to the caller."""
    if not tasks:
        return
    os.makedirs(runner.runs_dir, exist_ok=True)
    claims = tempfile.mkdtemp(prefix="claims_", dir=runner.runs_dir)
    spec = {
        "suite": suite,
        "runs_dir": runner.runs_dir,
        "overrides": runner.overrides,
        "verbose": runner.verbose,
        "fresh": fresh,
        "claims": claims,
        "tasks": sorted(
            (
                {"workload": w, "entry": _entry_to_json(e), "seeds": s, "max_extensions": m}
                for w, e, s, m in tasks
            ),
            key=_cost,
            reverse=True,  # The longest first: the workers end together.
        ),
    }
    path = os.path.join(claims, "tasks.json")
    with open(path, "w") as f:
        json.dump(spec, f)
    flags = " ".join(filter(None, (os.environ.get("XLA_FLAGS", ""), ONE_THREAD)))
    env = dict(os.environ, XLA_FLAGS=flags)
    print(f"training {len(tasks)} cells in {jobs} processes", flush=True)
    procs = []
    try:
        for i in range(jobs):
            argv = [sys.executable, "-c", WORKER, path, str(i)]
            procs.append(subprocess.Popen(argv, env=env))
        codes = [p.wait() for p in procs]
    finally:  # Stopped (Ctrl-C): the workers stop too; their finished runs stay recorded.
        for p in procs:
            if p.poll() is None:
                p.terminate()
        shutil.rmtree(claims, ignore_errors=True)
    failed = [i for i, code in enumerate(codes) if code]
    if failed:
        print(f"workers {failed} failed (exit {[codes[i] for i in failed]}); their cells are "
              "trained next, in this process", flush=True)  # fmt: skip


def _claim(claims: str, index: int) -> bool:
    try:
        os.close(os.open(os.path.join(claims, f"{index}.claim"), os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return False
    return True


def worker(path: str, index: int) -> int:
    from benchmarks.compare.protocol import run_cell, tune
    from benchmarks.compare.runner import Runner

    with open(path) as f:
        spec = json.load(f)
    runner = Runner(spec["runs_dir"], spec["overrides"], spec["verbose"], resume=not spec["fresh"])
    runner.warm_up_dir = f"warm_up_{index}"
    workloads = {w.name: w for w in SUITES[spec["suite"]]}
    warmed: set[str] = set()
    for i, task in enumerate(spec["tasks"]):
        if not _claim(spec["claims"], i):
            continue
        workload = workloads[task["workload"]]
        if workload.name not in warmed:
            runner.warm_up(workload)
            warmed.add(workload.name)
        entry = _entry_from_json(task["entry"])
        cap = task["max_extensions"]
        if task["seeds"] is None:
            tune(runner, workload, entry, 0, workload.extend_grid if cap is None else cap)
        else:
            run_cell(runner, workload, entry, task["seeds"], cap)
    return 0
