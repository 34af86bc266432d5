"""The suite's outputs: the markdown table, the JSON of every run, and the plots."""

from __future__ import annotations

import json
import os
from typing import Any

from benchmarks.compare.plots import plot_compute, plot_curves, plot_step_sizes
from benchmarks.compare.protocol import TARGET_FRACTION
from benchmarks.optimizers import OPTIMIZERS
from benchmarks.reporting import json_safe

TARGET_TEXT = f"{TARGET_FRACTION:g}"


def _lr_text(cell: dict[str, Any], s: dict[str, Any]) -> str:
    spec = OPTIMIZERS.get(cell["optimizer"])
    if spec is not None and not spec.takes_lr:
        if spec.agd_init:  # AGD and its variants: no learning rate at all.
            return f"none (gain {cell['gain']:g})"
        return "fixed settings"  # One configuration for every workload (AlgoPerf's).
    if cell["optimizer"].startswith("hypergradient"):
        last = [r["curve"][-1].get("learning_rate") for r in cell["final_runs"] if r["curve"]]
        last = [v for v in last if v is not None]
        final = f", last epoch {sum(last) / len(last):.3g}" if last else ""
        start = "its default" if spec is None or spec.default_lr is None else f"{spec.default_lr:g}"
        return f"learned from {start}{final}"
    if not cell["tuned"]:
        lr = s["chosen_lrs"][0]
        return "default" if lr is None else f"{lr:g} (fixed)"
    text = " / ".join(f"{lr:g}" for lr in s["chosen_lrs"])
    if len(set(s["chosen_lrs"])) == 1:
        text = f"{s['chosen_lrs'][0]:g}"
    return text + (" (grid edge)" if s["grid_edge"] else "")


def _spread(s: dict[str, Any], seeds: int | None) -> str:
    """``mean ± std``, with the number of seeds where a row has other than the table's."""
    text = f"{s['mean']:.4f} ± {s['std']:.4f}"
    return text if seeds is None or s["n"] == seeds else f"{text} ({s['n']} seeds)"


def _grids(w: dict[str, Any]) -> list[str]:
    """The final grid of every tuned row whose cell records how it was extended."""
    lines = []
    for cell, s in zip(w["cells"], w["summary"]["cells"]):
        if not cell["tuned"] or "grid_declared" not in cell:
            continue
        points = ", ".join(f"{x:g}" for x in cell["grid"])
        added = ", ".join(f"{x:g}" for x in cell["grid_added"])
        chosen = "/".join(f"{x:g}" for x in sorted(set(s["chosen_lrs"])))
        lines.append(
            f"- {cell['label']}: {points}"
            + (f" ({added} added past the declared edge)" if added else "")
            + f"; chosen {chosen}, "
            + ("interior" if cell["grid_closed"] else "still on the edge (extension cap reached)")
        )
    if lines:
        lines = ["Learning-rate grids (final, after extension):", "", *lines, ""]
    return lines


def _fmt_steps(x: float | None) -> str:
    return "-" if x is None else f"{x:,.0f}"


def _reached(s: dict[str, Any]) -> str:
    reached = _fmt_steps(s["steps_to_target"])
    if s["steps_to_target"] is not None and s["reached"] < s["n"]:
        reached += f" ({s['reached']}/{s['n']} seeds)"
    elif s["steps_to_target"] is None:
        reached = "not reached"
    return reached


def _loss_table(w: dict[str, Any], seeds: int | None = None) -> list[str]:
    """A language model's table: losses (lower is better) instead of accuracies."""
    summ = w["summary"]
    first = {}  # Mean loss after the first epoch: early-training speed.
    for cell in w["cells"]:
        values = [r["curve"][0].get("test_loss") for r in cell["final_runs"] if r["curve"]]
        first[cell["label"]] = sum(values) / len(values) if values else float("nan")
    lines = [
        f"## {w['title']}",
        "",
        f"{w['epochs']} epochs of {w['steps_per_epoch']} steps (batch {w['train_bs']}). Losses in "
        "nats per byte on the corpus's validation split (the last 10% of the bytes); the grid "
        "runs train on the first 80% of the training bytes and are scored on the last 20% of "
        f"them. Best mean final loss {summ['best_mean_loss']:.4f}; the target "
        f"{summ['target_loss']:.4f} is that divided by {TARGET_TEXT}. The tuned AdamW's learning "
        "rate warms up linearly over half an epoch, then decays to zero along a cosine (the usual "
        "LM recipe); AGD and the learning-rate-free optimizers run at their defaults, unscheduled. "
        "'Loss after epoch 1' shows early-training speed.",
        "",
        "| optimizer | learning rate | validation loss | loss after epoch 1 | steps to target "
        "| grid runs | total steps (incl. grid) | total wall s (incl. grid) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for cell, s in zip(w["cells"], summ["cells"]):
        lines.append(
            f"| {cell['label']} | {_lr_text(cell, s)} | {_spread(s, seeds)} "
            f"| {first[cell['label']]:.4f} | {_reached(s)} | {s['grid_runs']} "
            f"| {s['total_steps']:,} | {s['total_wall_s']:.0f} |"
        )
    lines.append("")
    return lines + _grids(w)


def markdown(suite: str, result: dict[str, Any]) -> str:
    meta = result["meta"]
    lines = [
        f"# Evidence suite: {suite}",
        "",
        f"Command: `{meta['command']}`",
        "",
        *[
            f"Rows {', '.join(a['rows'])} added later on the same machine, same protocol: "
            f"`{a['command']}`\n"
            for a in meta.get("added", [])
        ],
        *[f"Merged into this file by: `{m}`\n" for m in meta.get("merged", [])],
        f"Hardware: {meta['hardware']}; JAX {meta['jax']}, optax {meta['optax']}. "
        f"{meta['seeds']} seed(s) per final cell; learning-rate grids of "
        f"{meta['grid_description']}, each point trained once on 80% of the training set and "
        "scored on the held-out 20% (the final validation accuracy, or for a language model the "
        "final validation loss, picks the learning rate; the test set is never used to choose). "
        "No weight decay and constant learning rates, except where a row's description or a table "
        "says otherwise (the AlgoPerf rows keep their published weight decay and schedule).",
        "",
    ]
    if any(w.get("metric", "accuracy") == "accuracy" for w in result["workloads"]):
        lines += [
            "Columns: final test accuracy (mean ± sample std over seeds); steps to 95% of the "
            "best final accuracy in the table (first epoch whose test accuracy reaches it, times "
            "steps per epoch; mean over the seeds that reach it); total compute = every training "
            "step and wall second spent on the cell, the whole learning-rate grid included (wall "
            "seconds include compilation and evaluation, on a shared machine: indicative only).",
            "",
        ]
    else:
        lines += [
            "Columns: final validation loss in nats per byte (mean ± sample std over seeds); "
            "the loss after the first epoch; steps until the validation loss first reaches the "
            "target (the best mean final loss divided by 0.95); total compute = every training "
            "step and wall second spent on the cell, the learning-rate grid included (wall "
            "seconds include compilation and evaluation: indicative only).",
            "",
        ]
    for w in result["workloads"]:
        summ = w["summary"]
        if w.get("metric", "accuracy") == "loss":
            lines += _loss_table(w, meta.get("seeds"))
            continue
        lines += [
            f"## {w['title']}",
            "",
            f"{w['epochs']} epochs of {w['steps_per_epoch']} steps (batch {w['train_bs']}). "
            f"Best mean final test accuracy {summ['best_mean_accuracy']:.4f}; "
            f"95% of it: {summ['target_accuracy']:.4f}.",
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
                f"| {cell['label']} | {_lr_text(cell, s)} | {_spread(s, meta.get('seeds'))} "
                f"| {reached} | {s['grid_runs']} | {s['total_steps']:,} | {s['total_wall_s']:.0f} |"
            )
        lines.append("")
        lines += _grids(w)
    extra = meta.get("extra_seeds")
    if extra:
        rows = "; ".join(f"{w}: {', '.join(r) or 'none'}" for w, r in extra["rows"].items())
        lines += [f"Rows given {extra['seeds']} seeds (`--extra-seeds-for {extra['rule']}`, their "
                  f"first runs reused): {rows}.", ""]  # fmt: skip
    return "\n".join(lines)


def write_outputs(result: dict[str, Any], out: str, write_json: bool = True) -> dict[str, str]:
    """The table, the JSON and the three plots of a suite's result, under ``out``."""
    suite = result["suite"]
    os.makedirs(out, exist_ok=True)
    paths = {
        "markdown": os.path.join(out, f"{suite}.md"),
        "json": os.path.join(out, f"{suite}.json"),
        "curves": os.path.join(out, f"{suite}_curves.png"),
        "compute": os.path.join(out, f"{suite}_compute.png"),
        "step_sizes": os.path.join(out, f"{suite}_step_sizes.png"),
    }
    text = markdown(suite, result)
    with open(paths["markdown"], "w") as f:
        f.write(text + "\n")
    if write_json:
        with open(paths["json"], "w") as f:
            json.dump(json_safe(result), f, separators=(",", ":"))
            f.write("\n")
    plot_curves(result, paths["curves"])
    plot_compute(result, paths["compute"])
    plot_step_sizes(result, paths["step_sizes"])
    print(text, flush=True)
    if not write_json:
        del paths["json"]
    print("wrote " + ", ".join(paths.values()), flush=True)
    return paths
