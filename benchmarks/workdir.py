"""A run's folder: where each file goes, and reading and writing them.

``<workdir>/config.json`` (the ``Config``), ``metrics.jsonl`` (one JSON line per epoch),
``summary.json`` (the final metrics), ``curves.png`` (``reporting.plot_curves``) and
``checkpoints/`` (``checkpointing``). Only process 0 writes files.
"""

from __future__ import annotations

import json
import os
from typing import Any

from benchmarks.config import Config

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
PLOT_FILE = "curves.png"


def default_workdir(config: Config) -> str:
    return os.path.join(
        "runs", f"{config.dataset}_{config.arch}_{config.optimizer}_seed{config.seed}"
    )


def prepare(workdir: str, config: Config, is_main: bool) -> None:
    """Creates the folder and writes the config."""
    os.makedirs(workdir, exist_ok=True)
    if is_main:
        config.save(workdir)


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_metrics(workdir: str, rows: list[dict[str, Any]]) -> None:
    with open(os.path.join(workdir, METRICS_FILE), "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def write_summary(workdir: str, summary: dict[str, Any]) -> None:
    with open(os.path.join(workdir, SUMMARY_FILE), "w") as f:
        json.dump(summary, f, indent=2)
