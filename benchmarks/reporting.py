"""Reporting shared by the programs: a run's curves, the hardware in words, JSON-safe values."""

from __future__ import annotations

import math
import os
import platform
from typing import Any

import numpy as np


def hardware_description() -> str:
    """The machine in words: ``a 2-core CPU (x86_64)``, ``one NVIDIA H200``, ``8 x TPU v5 lite``."""
    import jax

    devices = jax.devices()
    if devices[0].platform == "cpu":
        return f"a {os.cpu_count()}-core CPU ({platform.machine()})"
    kind = devices[0].device_kind
    return f"one {kind}" if len(devices) == 1 else f"{len(devices)} x {kind}"


def json_safe(x: Any) -> Any:
    """NaN and infinities as None, numpy scalars as Python numbers, floats to 6 digits."""
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [json_safe(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float):
        return float(f"{x:.6g}") if math.isfinite(x) else None
    return x


def plot_curves(path: str, rows: list[dict[str, Any]], title: str) -> str:
    """A run's loss and accuracy against epochs (rows of ``metrics.jsonl``), as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # Not pyplot: no GUI state, a faster import.

    epochs = [r["epoch"] for r in rows]
    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    ax_loss, ax_acc = fig.subplots(1, 2)
    ax_loss.plot(epochs, [r["train_loss"] for r in rows], label="train")
    ax_loss.plot(epochs, [r["test_loss"] for r in rows], label="test")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    ax_loss.set_yscale("log")
    ax_loss.legend()
    ax_acc.plot(epochs, [r["train_accuracy"] for r in rows], label="train")
    ax_acc.plot(epochs, [r["test_accuracy"] for r in rows], label="test")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("accuracy")
    ax_acc.legend()
    fig.suptitle(title)
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.12, top=0.88, wspace=0.25)  # Fixed: fast.
    fig.savefig(path, dpi=100)
    return path
