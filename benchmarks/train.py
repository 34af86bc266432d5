"""Train a network with AGD (or an optax baseline): ``python -m benchmarks.train [flags]``.

With no flags: AGD, a bias-free 3-layer FCN, scikit-learn's digits (no download).
``--arch transformer``: a byte-level language model, by default on the Python standard library's
source (no download either), with the defaults of ``config.ARCH_DEFAULTS``.
The architectures, datasets and optimizers on offer, and each optimizer's own flags, come from the
registries (``models.ARCHITECTURES``, ``data.DATASETS``, ``optimizers.OPTIMIZERS``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import traceback

import jax

from benchmarks.config import ARCH_DEFAULTS, ARCHS, LOSSES, Config
from benchmarks.data import DATASETS
from benchmarks.data.text import VOCABS
from benchmarks.models import ALIASES, ARCHITECTURES
from benchmarks.optimizers import OPTIMIZERS, SCHEDULES, all_options
from benchmarks.rules import AGD_RULES


def _table(title: str, rows: dict[str, str]) -> str:
    width = max(len(name) for name in rows)
    return f"{title}:\n" + "\n".join(f"  {n:<{width}}  {text}" for n, text in rows.items())


def _epilog() -> str:
    tables = [
        ("architectures (--arch)", {n: a.description for n, a in ARCHITECTURES.items()}),
        ("datasets (--dataset)", {n: d.description for n, d in DATASETS.items()}),
        ("optimizers (--optimizer)", {n: o.description for n, o in OPTIMIZERS.items()}),
    ]
    return "\n\n".join(_table(title, rows) for title, rows in tables)


def parse_args(argv: list[str] | None = None) -> Config:
    d = Config()
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.train",
        description=__doc__.splitlines()[0],
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # Flags whose default depends on the arch (ARCH_DEFAULTS) are left out when not given.
    auto = argparse.SUPPRESS
    p.add_argument("--arch", choices=ARCHS, default=d.arch)
    p.add_argument(
        "--depth",
        type=int,
        default=auto,
        help=f"fcn: Linear layers; cnn1d: convs + 1; transformer: blocks (default {d.depth})",
    )
    p.add_argument(
        "--width",
        type=int,
        default=auto,
        help=f"fcn: hidden width; convnets: base channels; transformer: model width ({d.width})",
    )
    p.add_argument("--heads", type=int, default=d.heads, help="transformer: attention heads")
    p.add_argument("--context", type=int, default=d.context, help="transformer: tokens of context")
    p.add_argument(
        "--scan-layers", action="store_true", help="transformer: stack the blocks (nnx.scan)"
    )
    p.add_argument(
        "--tied", action="store_true", help="transformer: output head = token embedding^T"
    )
    p.add_argument(
        "--bias", action="store_true", help="biases and affine BatchNorm (AGD's 1-D rules)"
    )
    p.add_argument("--dataset", choices=tuple(DATASETS), default=auto, help=f"default {d.dataset}")
    p.add_argument(
        "--data-dir",
        default=d.data_dir,
        help="folder holding the dataset files; for 'text', a text file or a folder of them",
    )
    p.add_argument("--vocab", choices=VOCABS, default=d.vocab, help="text: token ids")
    p.add_argument(
        "--eval-windows", type=int, default=d.eval_windows, help="text: validation windows"
    )
    p.add_argument("--samples", type=int, default=d.samples, help="text: generated samples")
    p.add_argument(
        "--download", action="store_true", help="download MNIST/CIFAR (checksum-verified)"
    )
    p.add_argument("--train-bs", type=int, default=auto, help=f"default {d.train_bs}")
    p.add_argument("--test-bs", type=int, default=auto, help=f"default {d.test_bs}")
    p.add_argument("--epochs", type=int, default=auto, help=f"default {d.epochs}")
    p.add_argument(
        "--loss", choices=LOSSES, default=d.loss, help="mse: one-hot * sqrt(classes) targets"
    )
    p.add_argument("--optimizer", choices=tuple(OPTIMIZERS), default=d.optimizer)
    p.add_argument(
        "--gain", type=float, default=d.gain, help="AGD's gain (1.0: the published algorithm)"
    )
    p.add_argument(
        "--agd-rule",
        choices=AGD_RULES,
        default=d.agd_rule,
        help="AGD's rule for 1-D parameters and embeddings (benchmarks.rules); the default "
        "hands biases and norm parameters to Prodigy, 'library' is agd() alone",
    )
    p.add_argument("--lr", type=float, default=d.lr, help="baselines' peak learning rate")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--momentum", type=float, default=d.momentum, help="sgd's momentum")
    p.add_argument(
        "--schedule", choices=SCHEDULES, default=d.schedule, help="baselines' lr schedule"
    )
    p.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs)
    p.add_argument(
        "--no-augment", dest="augment", action="store_false", help="no CIFAR augmentation"
    )
    p.add_argument(
        "--official-normalization",
        action="store_true",
        help="CIFAR: the official AGD code's mean/std (default: the training set's own)",
    )
    p.add_argument(
        "--seed", type=int, default=d.seed, help="initialisation, batch order and augmentation"
    )
    p.add_argument(
        "--data-seed",
        type=int,
        default=d.data_seed,
        help="digits: its train/test split; mnist1d: the generator's seed (default: the standard "
        "split); refused for datasets with a fixed split",
    )
    p.add_argument(
        "--workdir", default=d.workdir, help="where config, metrics, plot and checkpoints go"
    )
    p.add_argument(
        "--resume", action="store_true", help="continue from the workdir's last checkpoint"
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace the run already in the workdir"
    )
    p.add_argument("--no-checkpoint", dest="checkpoint", action="store_false")
    p.add_argument(
        "--skip-nonfinite",
        type=int,
        default=d.skip_nonfinite,
        metavar="N",
        help="skip up to N steps in a row whose gradients are NaN or infinite (0: stop the run)",
    )
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument(
        "--num-workers", type=int, default=d.num_workers, help="ImageNet decoding processes"
    )
    p.add_argument("--image-size", type=int, default=d.image_size, help="ImageNet crop size")
    p.add_argument(
        "--max-steps-per-epoch", type=int, default=auto, help="cut epochs short (0: no cap)"
    )
    p.add_argument("--validation-split", type=float, default=d.validation_split)
    p.add_argument(
        "--shard-params", action="store_true", help="FSDP: split params and state over devices"
    )
    p.add_argument(
        "--compute-dtype",
        choices=("float32", "bfloat16", "float16"),
        default=d.compute_dtype,
        help="default: bfloat16 on GPU/TPU, float32 on CPU (parameters stay float32)",
    )
    p.add_argument(
        "--distributed", action="store_true", help="multi-process: jax.distributed.initialize()"
    )
    p.add_argument(
        "--coordinator-address", default=d.coordinator_address, help="host:port of process 0"
    )
    p.add_argument("--num-processes", type=int, default=d.num_processes)
    p.add_argument("--process-id", type=int, default=d.process_id)
    group = p.add_argument_group("optimizer options (each for the optimizers named)")
    for name, (option, takers) in all_options().items():
        group.add_argument(
            "--" + name.replace("_", "-"),
            dest=f"opt_{name}",
            type=option.type,
            default=None,
            help=f"{option.help} (default {option.default}; {', '.join(takers)})",
        )
    args = p.parse_args(argv)
    defaults = ARCH_DEFAULTS.get(args.arch, {})
    names = [f.name for f in dataclasses.fields(Config) if f.name != "optimizer_options"]
    values = {name: getattr(args, name, defaults.get(name, getattr(d, name))) for name in names}
    if ARCHITECTURES[ALIASES.get(args.arch, args.arch)].fixed_depth and "depth" not in args:
        values["depth"] = None  # Fixed by the architecture; a --depth given is checked.
    values["optimizer_options"] = {
        name: getattr(args, f"opt_{name}")
        for name in all_options()
        if getattr(args, f"opt_{name}") is not None
    }
    try:
        return Config(**values).validate()
    except ValueError as e:
        p.error(str(e))


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    if config.distributed:
        from benchmarks.parallel import initialize_distributed

        initialize_distributed(config.coordinator_address, config.num_processes, config.process_id)
    from benchmarks.checkpointing import CheckpointError
    from benchmarks.training import NonFiniteError, summary_line, train_and_evaluate
    from benchmarks.workdir import RunFolderError

    try:
        final = train_and_evaluate(config)
    except (RunFolderError, CheckpointError, NonFiniteError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    if jax.process_index() == 0:
        print(summary_line(config, final), flush=True)
    return 0


def _main_and_exit() -> None:
    """Runs ``main`` as a program. A failure exits at once (``os._exit``): a checkpoint write
    that failed can leave orbax's background threads waiting minutes for it."""
    try:
        code = main()
    except SystemExit:
        raise  # The command line was refused (argparse): nothing has started.
    except KeyboardInterrupt:
        traceback.print_exc()
        code = 130
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    if code:
        os._exit(code)
    sys.exit(0)


if __name__ == "__main__":
    _main_and_exit()
