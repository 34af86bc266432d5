"""Hypergradient towers' sensitivity to the initial step size: ``python -m benchmarks.compare.sensitivity``.

Trains one workload with SGD whose step size is learned by towers of heights 0 (plain SGD, fixed
step) to 3, from initial step sizes spread over four orders of magnitude, and writes the final
test accuracy and learned step size of every run as a table, a JSON file and a plot.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import io
import json
import os
import shlex
import sys
import time
from collections.abc import Sequence
from typing import Any

from benchmarks.compare.workloads import SUITES
from benchmarks.config import Config
from benchmarks.reporting import hardware_description, json_safe

WORKLOADS = {w.name: w for suite in SUITES.values() for w in suite}


def _tower_default(name: str) -> float:
    """A default step of ``agd_optax.hypergradient_tower`` (chosen by the rule in docs/hypergradient.md)."""
    import agd_optax

    return inspect.signature(agd_optax.hypergradient_tower).parameters[name].default


HYPER_LR = _tower_default("hyper_learning_rate")
META_LR = _tower_default("meta_learning_rate")


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(",") if v.strip())


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.compare.sensitivity", description=__doc__.splitlines()[0]
    )
    p.add_argument("--workload", choices=tuple(WORKLOADS), default="digits_fcn")
    p.add_argument(
        "--optimizer",
        choices=("hypergradient-sgd", "hypergradient-adam"),
        default="hypergradient-sgd",
    )
    p.add_argument(
        "--lrs",
        type=_floats,
        default=(1e-4, 1e-3, 1e-2, 1e-1),
        help="initial step sizes, comma-separated",
    )
    p.add_argument("--heights", default="0,1,2,3", help="tower heights, comma-separated")
    p.add_argument(
        "--hyper-lrs",
        type=_floats,
        default=(HYPER_LR,),
        help="first hyper level's step sizes, comma-separated (one row per height each); "
        "default: hypergradient_tower's",
    )
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--epochs", type=int, default=None, help="override the workload's epochs")
    p.add_argument("--out", default=os.path.join("benchmarks", "results"))
    p.add_argument("--runs-dir", default="runs")
    p.add_argument(
        "--from-json",
        default=None,
        help="train nothing: merge saved results (comma-separated JSON files of the same "
        "workload, optimizer, seeds and machine, e.g. rows run in parallel) into --out",
    )
    args = p.parse_args(argv)
    if args.from_json:
        return args
    args.heights = tuple(int(h) for h in args.heights.split(",") if h.strip())
    if not args.lrs or not args.heights or args.seeds < 1:
        p.error("--lrs, --heights and --seeds must be non-empty")
    if any(h < 0 for h in args.heights) or any(v <= 0 for v in args.lrs + args.hyper_lrs):
        p.error("heights must be >= 0 and step sizes > 0")
    return args


def _rows(args: argparse.Namespace) -> list[tuple[int, float | None]]:
    """(height, hyper_lr) per table row: height 0 learns nothing, so it needs no hyper_lr."""
    rows = [(0, None)] if 0 in args.heights else []
    return rows + [(h, k) for k in args.hyper_lrs for h in args.heights if h > 0]


def run(args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks.run import train_and_evaluate

    workload = WORKLOADS[args.workload]
    records = []
    for height, hyper_lr in _rows(args):
        for lr in args.lrs:
            for seed in range(args.seeds):
                values = dict(workload.config)
                if args.epochs:
                    values["epochs"] = args.epochs
                config = Config(
                    **values,
                    optimizer=args.optimizer,
                    lr=lr,
                    optimizer_options=dict(hyper_height=height, hyper_lr=hyper_lr or HYPER_LR),
                    seed=seed,
                    progress=False,
                    checkpoint=False,
                ).validate()
                tag = f"h{height}_k{hyper_lr or 0:g}_lr{lr:g}_seed{seed}"
                workdir = os.path.join(args.runs_dir, "sensitivity", workload.name, tag)
                t0 = time.perf_counter()
                with contextlib.redirect_stdout(io.StringIO()):
                    final = train_and_evaluate(config, workdir)
                records.append(
                    {
                        "height": height,
                        "hyper_lr": hyper_lr,
                        "lr": lr,
                        "seed": seed,
                        "test_accuracy": final["test_accuracy"],
                        "test_loss": final["test_loss"],
                        "learned_lr": final.get("learning_rate", lr),
                        "wall_s": time.perf_counter() - t0,
                    }
                )
                r = records[-1]
                print(
                    f"height {height} hyper_lr {hyper_lr} lr {lr:g} seed {seed}: test accuracy "
                    f"{r['test_accuracy']:.4f}, last epoch's step size {r['learned_lr']:.4g}",
                    flush=True,
                )
    return {"workload": workload.name, "title": workload.title, "records": records}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _cells(result: dict[str, Any]) -> dict[tuple[int, Any], dict[float, dict[str, float]]]:
    cells: dict[tuple[int, Any], dict[float, dict[str, list[float]]]] = {}
    for r in result["records"]:
        key = (r["height"], r["hyper_lr"])
        cells.setdefault(key, {}).setdefault(r["lr"], {"acc": [], "lr": []})
        cells[key][r["lr"]]["acc"].append(r["test_accuracy"])
        cells[key][r["lr"]]["lr"].append(r["learned_lr"])
    return {
        key: {lr: {"acc": _mean(v["acc"]), "lr": _mean(v["lr"])} for lr, v in by_lr.items()}
        for key, by_lr in cells.items()
    }


def _row_name(height: int, hyper_lr: float | None) -> str:
    return "0 (plain SGD, fixed step)" if height == 0 else f"{height} (hyper-step {hyper_lr:g})"


def markdown(result: dict[str, Any]) -> str:
    meta, cells = result["meta"], _cells(result)
    lrs = sorted({r["lr"] for r in result["records"]})
    lines = [
        f"# Hypergradient towers: sensitivity to the initial step size ({result['workload']})",
        "",
        f"Command: `{meta['command']}`"
        + (f", merged by `{meta['merged_by']}`" if "merged_by" in meta else ""),
        "",
        f"Hardware: {meta['hardware']}; {meta['seeds']} seed(s) per cell; {result['title']}; "
        f"optimizer {meta['optimizer']}. Height 0 is SGD at the fixed initial step; height h "
        "learns it with a tower of h SGD levels (the first with the hyper-step shown, the ones "
        f"above on the log scale with step {meta.get('meta_lr', 1.0):g}). Each cell: final test "
        "accuracy, and in brackets the "
        "step size of the last epoch (epoch mean). Spread: best minus worst accuracy of the row.",
        "",
        "| tower height | " + " | ".join(f"initial {lr:g}" for lr in lrs) + " | spread |",
        "| --- | " + " | ".join("---" for _ in lrs) + " | --- |",
    ]
    for (height, hyper_lr), by_lr in cells.items():
        accs = [by_lr[lr]["acc"] for lr in lrs]
        texts = [f"{by_lr[lr]['acc']:.4f} ({by_lr[lr]['lr']:.3g})" for lr in lrs]
        lines.append(
            f"| {_row_name(height, hyper_lr)} | "
            + " | ".join(texts)
            + f" | {max(accs) - min(accs):.4f} |"
        )
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = _cells(result)
    fig, (ax_acc, ax_lr) = plt.subplots(1, 2, figsize=(11, 4.2))
    hyper_lrs = sorted({k for _, k in cells if k is not None})
    for (height, hyper_lr), by_lr in cells.items():
        lrs = sorted(by_lr)
        # Colour: the hyper-step; line and marker: the height (black dashes: plain SGD).
        style = dict(color="black", ls="--", marker="o")
        if height:
            color = f"C{hyper_lrs.index(hyper_lr)}"
            style = dict(
                color=color, ls=("-", "--", ":")[(height - 1) % 3], marker="os^D"[height % 4]
            )
        label = _row_name(height, hyper_lr)
        ax_acc.plot(lrs, [by_lr[lr]["acc"] for lr in lrs], label=label, **style)
        ax_lr.plot(lrs, [by_lr[lr]["lr"] for lr in lrs], label=label, **style)
    ax_acc.set(xscale="log", xlabel="initial step size", ylabel="final test accuracy")
    ax_lr.set(
        xscale="log", yscale="log", xlabel="initial step size", ylabel="step size in the last epoch"
    )
    for ax in (ax_acc, ax_lr):
        ax.grid(alpha=0.3, which="both")
    ax_acc.legend(fontsize=7)
    fig.suptitle(f"hypergradient towers on {result['workload']}: sensitivity to the initial step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def merge(paths: Sequence[str], command: str) -> dict[str, Any]:
    """Saved results of the same study merged into one; every command is kept."""
    parts = []
    for path in paths:
        with open(path) as f:
            parts.append(json.load(f))
    first = parts[0]
    for part, path in zip(parts[1:], paths[1:]):
        for key in ("seeds", "hardware", "optimizer"):
            if part["meta"][key] != first["meta"][key]:
                raise ValueError(f"{path}: its {key} differs from {paths[0]}'s; not one study")
        if part["workload"] != first["workload"]:
            raise ValueError(f"{path}: workload {part['workload']!r}, not {first['workload']!r}")
    commands = [c for part in parts for c in part["meta"]["command"].split("` and `")]
    return {
        **first,
        "records": [r for part in parts for r in part["records"]],
        "meta": {**first["meta"], "command": "` and `".join(commands), "merged_by": command},
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    command = "uv run python -m benchmarks.compare.sensitivity " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)
    )
    if args.from_json:
        result = merge([p for p in args.from_json.split(",") if p], command.strip())
    else:
        result = run(args)
        result["meta"] = {
            "command": command.strip(),
            "hardware": hardware_description(),
            "seeds": args.seeds,
            "optimizer": args.optimizer,
            "meta_lr": META_LR,
        }
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"hypergradient_sensitivity_{result['workload']}")
    with open(stem + ".json", "w") as f:
        json.dump(json_safe(result), f, indent=1)
        f.write("\n")
    text = markdown(result)
    with open(stem + ".md", "w") as f:
        f.write(text)
    plot(result, stem + ".png")
    print(text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
