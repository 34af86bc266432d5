"""Train a network with AGD (or an optax baseline): ``python -m benchmarks.train [flags]``.

With no flags: AGD, a bias-free 3-layer FCN, scikit-learn's digits (no download).
``--arch transformer``: a byte-level language model, by default on the Python standard library's
source (no download either), with the defaults of ``config.ARCH_DEFAULTS``.
The architectures, datasets and optimizers on offer, and each optimizer's own flags, come from the
registries (``models.ARCHITECTURES``, ``data.DATASETS``, ``optimizers.OPTIMIZERS``).
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

import jax

from benchmarks.config import Config, add_flags, from_flags
from benchmarks.data import DATASETS
from benchmarks.models import ARCHITECTURES
from benchmarks.optimizers import OPTIMIZERS


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
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.train",
        description=__doc__.splitlines()[0],
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_flags(parser)
    args = parser.parse_args(argv)
    try:
        return from_flags(args)
    except ValueError as e:
        parser.error(str(e))


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    from benchmarks import parallel
    from benchmarks.checkpointing import CheckpointError
    from benchmarks.run import NonFiniteError, summary_line, train_and_evaluate
    from benchmarks.run_folder import RunFolderError

    try:
        if config.distributed:
            parallel.initialize_distributed(
                config.coordinator_address,
                config.num_processes,
                config.process_id,
                timeout=config.distributed_timeout,
            )
        final = train_and_evaluate(config)
    except (RunFolderError, CheckpointError, NonFiniteError, parallel.DistributedError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        parallel.announce_failure(str(e))  # The other processes stop too, with this cause.
        return 1
    if jax.process_index() == 0:
        print(summary_line(config, final), flush=True)
    return 0


def _main_and_exit() -> None:
    """Runs ``main`` as a program. A failure exits at once (``os._exit``): a checkpoint write
    that failed can leave orbax's background threads waiting minutes for it. In a multi-process
    run, a failure of any process stops the others with its cause (``parallel``)."""
    try:
        code = main()
    except SystemExit:
        raise  # The command line was refused (argparse): nothing has started.
    except KeyboardInterrupt:
        traceback.print_exc()
        code = 130
    except BaseException as e:
        traceback.print_exc()
        code = 1
        from benchmarks import parallel

        parallel.announce_failure(f"{type(e).__name__}: {e}")
    sys.stdout.flush()
    sys.stderr.flush()
    if code:
        os._exit(code)
    sys.exit(0)


if __name__ == "__main__":
    _main_and_exit()
