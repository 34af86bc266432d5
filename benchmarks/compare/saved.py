"""Saved results of the evidence suite: redrawn, merged (``--from-json``) or extended with new
rows (``--add-to``)."""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Sequence
from typing import Any

from benchmarks.compare.protocol import summarize
from benchmarks.compare.report import write_outputs
from benchmarks.compare.workloads import ENTRIES, SUITES


def merge_results(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One suite's results from several runs of the program (for example one per subset of
    ``--optimizers``): a later result's row replacing an earlier one of the same label, each
    workload's rows in the suite's order (rows it does not declare, such as candidates, after
    them in order of first appearance), and the summaries recomputed."""
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
            put_cells(workloads[w["name"]], w["cells"])
    for w in merged["workloads"]:  # The summary's rows follow the cells' (the report pairs them).
        w["cells"] = _in_suite_order(merged["suite"], w["name"], w["cells"])
        w["summary"] = summarize(w["cells"], w.get("metric", "accuracy"))
    return merged


def _in_suite_order(suite: str, workload: str, cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``cells`` in the order of the suite's rows for ``workload`` (as the program runs and
    tabulates them), undeclared labels after them in their given order."""
    declared = {w.name: w for w in SUITES.get(suite, ())}
    if workload not in declared:
        return cells
    order = {e.label: i for i, e in enumerate(declared[workload].entries or ENTRIES)}
    return sorted(cells, key=lambda c: order.get(c["label"], len(order)))


def put_cells(workload: dict[str, Any], cells: Sequence[dict[str, Any]]) -> None:
    """Adds ``cells`` to a saved workload's rows (one of the same label is replaced, keeping its
    place) and recomputes the workload's summary."""
    by_label = {c["label"]: c for c in workload["cells"]}
    by_label.update({c["label"]: c for c in cells})
    workload["cells"] = list(by_label.values())
    workload["summary"] = summarize(workload["cells"], workload.get("metric", "accuracy"))


def redraw_from_json(from_json: str, out: str, argv: Sequence[str] | None) -> int:
    """``--from-json``: redraws one saved result, or merges several (the merged JSON saved)."""
    paths = [p for p in from_json.split(",") if p]
    results = []
    for path in paths:
        with open(path) as f:
            results.append(json.load(f))
    merged = results[0]
    if len(results) > 1:
        merged = merge_results(results)
        merged["meta"].setdefault("merged", []).append(command_line(argv))
    write_outputs(merged, out, write_json=len(results) > 1)
    return 0


def command_line(argv: Sequence[str] | None) -> str:
    """This invocation as a command to paste."""
    args = sys.argv[1:] if argv is None else argv
    return ("uv run python -m benchmarks.compare " + " ".join(map(shlex.quote, args))).strip()


def load_compatible(path: str, suite: str, seeds: int, hardware: str) -> dict[str, Any]:
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
    base = load_compatible(path, new["suite"], new["meta"]["seeds"], new["meta"]["hardware"])
    workloads = {w["name"]: w for w in base["workloads"]}
    labels: list[str] = []
    for w in new["workloads"]:
        if w["name"] not in workloads:
            raise ValueError(f"--add-to {path} has no workload {w['name']!r}")
        put_cells(workloads[w["name"]], w["cells"])
        labels += [cell["label"] for cell in w["cells"]]
    base["meta"].setdefault("added", []).append(
        {"command": new["meta"]["command"], "rows": sorted(set(labels))}
    )
    return base
