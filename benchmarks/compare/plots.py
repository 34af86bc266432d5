"""The suite's plots: test accuracy against epochs, and final accuracy against total compute.

One panel per workload; each optimizer row keeps its colour in both plots.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

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
    "hypergradient_sgd": "gold",
    "hypergradient_sgd_h3": "darkgoldenrod",
    "hypergradient_adam": "lime",
}


def _colors(cells: Sequence[dict[str, Any]]) -> list[Any]:
    import matplotlib

    spare = matplotlib.colormaps["tab20"]
    return [_COLORS.get(c["label"], spare(i % 20)) for i, c in enumerate(cells)]


def _is_agd(cell: dict[str, Any]) -> bool:
    """AGD and its variants are drawn heavier, as the subject of the comparison."""
    return cell["optimizer"].startswith("agd")


def _panels(
    result: dict[str, Any], path: str, title: str, draw: Callable[[Any, dict[str, Any], list], None]
) -> None:
    """One panel per workload, drawn by ``draw(ax, workload, colors)``, saved to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = result["workloads"]
    fig, axes = plt.subplots(1, len(workloads), figsize=(6.5 * len(workloads), 4.5), squeeze=False)
    for ax, w in zip(axes[0], workloads):
        draw(ax, w, _colors(w["cells"]))
        ax.set_title(w["title"], fontsize=9)
    if axes[0][-1].get_legend_handles_labels()[0]:  # A panel with nothing drawn has no legend.
        axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"{result['suite']}: {title}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _metric(w: dict[str, Any]) -> str:
    return w.get("metric", "accuracy")


def _draw_curves(ax, w: dict[str, Any], colors: list) -> None:
    key = f"test_{_metric(w)}"
    for color, cell in zip(colors, w["cells"]):
        curves = [r["curve"] for r in cell["final_runs"]]
        n = min(len(c) for c in curves)
        if n == 0:
            continue
        acc = np.array(
            [[np.nan if r.get(key) is None else r[key] for r in c[:n]] for c in curves],
            dtype=np.float64,
        )
        epochs = np.arange(1, n + 1)
        style = "-" if _is_agd(cell) else "--" if cell["tuned"] else ":"
        width = 2.2 if _is_agd(cell) else 1.3
        ax.plot(epochs, acc.mean(axis=0), style, color=color, lw=width, label=cell["label"])
        if acc.shape[0] > 1:
            ax.fill_between(epochs, acc.min(axis=0), acc.max(axis=0), color=color, alpha=0.12)
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"test {_metric(w)} (mean over seeds; band: min-max)")
    ax.grid(alpha=0.3)


def _draw_compute(ax, w: dict[str, Any], colors: list) -> None:
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
        marker = "*" if _is_agd(cell) else "s" if cell["tuned"] else "o"
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
    ax.set_xlabel("total training steps, learning-rate grid included (log; equal values spread)")
    ax.set_ylabel(f"final test {_metric(w)} (mean ± std)")
    ax.grid(alpha=0.3, which="both")


def plot_curves(result: dict[str, Any], path: str) -> None:
    title = "solid AGD, dashed tuned (chosen lr), dotted lr-free defaults"
    _panels(result, path, title, _draw_curves)


def plot_compute(result: dict[str, Any], path: str) -> None:
    title = "accuracy against the compute it cost (star AGD, square tuned)"
    _panels(result, path, title, _draw_compute)


def _draw_step_sizes(ax, w: dict[str, Any], colors: list) -> None:
    for color, cell in zip(colors, w["cells"]):
        curves = [r["curve"] for r in cell["final_runs"]]
        for key, what in (("eta", "eta"), ("learning_rate", "learned step")):
            n = min(len(c) for c in curves) if curves else 0
            if n == 0 or any(key not in r for c in curves for r in c[:n]):
                continue
            values = np.array([[r[key] for r in c[:n]] for c in curves], dtype=np.float64)
            style = "-" if _is_agd(cell) else ":"
            label = f"{cell['label']} ({what})"
            ax.plot(np.arange(1, n + 1), values.mean(axis=0), style, color=color, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("step size, epoch mean (mean over seeds; log)")
    ax.grid(alpha=0.3, which="both")


def plot_step_sizes(result: dict[str, Any], path: str) -> None:
    title = "AGD's eta (a relative step) and hypergradient's learned step size"
    _panels(result, path, title, _draw_step_sizes)
