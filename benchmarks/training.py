"""train_and_evaluate: the training program's loop, from a ``Config`` to a run folder.

The pieces: ``input_pipeline`` (data and batches), ``trainer`` (model, optimizer, jitted steps),
``checkpointing`` (verified orbax checkpoints), ``workdir`` (the run folder: its files, its lock
and its contract), ``reporting`` (the curves).
"""

from __future__ import annotations

import itertools
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import lm, parallel
from benchmarks import workdir as run_folder
from benchmarks.checkpointing import CheckpointError, Checkpoints, check_writable
from benchmarks.config import Config
from benchmarks.data.text import TextData
from benchmarks.input_pipeline import load_data, num_train_examples, train_batches
from benchmarks.reporting import plot_curves
from benchmarks.trainer import Trainer, build_model, make_tx
from benchmarks.workdir import RunFolderError

# How often (in steps) the loop looks at whether a step went non-finite, besides each epoch's end.
CHECK_FINITE_EVERY = 100


class NonFiniteError(RuntimeError):
    """A step's loss or the state it left was NaN or infinite: ``steps`` steps were taken, the
    bad one included, of ``steps_per_epoch`` per epoch."""

    def __init__(self, message: str, steps: int = 0, steps_per_epoch: int = 0):
        super().__init__(message)
        self.steps = steps
        self.steps_per_epoch = steps_per_epoch


def _progress(total: int, epoch: int, config: Config, is_main: bool):
    if not (config.progress and is_main):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"epoch {epoch}/{config.epochs}", leave=False, dynamic_ncols=True)


def _open_run(workdir: str, config: Config, is_main: bool) -> run_folder.RunLock | None:
    """Process 0 locks and checks the run folder; every process learns whether it may go on."""
    lock, error = None, None
    if is_main:
        try:
            lock = run_folder.open_run(workdir, config)
            if config.checkpoint:
                check_writable(os.path.join(workdir, run_folder.CHECKPOINT_DIR))
        except (RunFolderError, CheckpointError, OSError) as e:
            if lock is not None:
                lock.release()
            lock, error = None, e
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        failed = multihost_utils.broadcast_one_to_all(np.int32(error is not None))
        if failed and error is None:
            raise RunFolderError(f"process 0 refused the run folder {workdir}; its output says why")
    if error is not None:
        raise error
    return lock


def train_and_evaluate(config: Config, workdir: str | None = None, mesh=None) -> dict[str, Any]:
    """Trains ``config``'s model and returns the final metrics (also written to ``workdir``).

    Writes ``config.json``, ``metrics.jsonl`` (one line per epoch), ``summary.json``,
    ``curves.png`` and verified checkpoints (one per epoch) in ``workdir`` (see ``workdir`` for
    what the folder guarantees). With ``config.resume``, continues from the newest intact
    checkpoint: a run stopped after epoch k and resumed ends with exactly the weights of an
    uninterrupted run.
    """
    config.validate()
    workdir = workdir or config.workdir or run_folder.default_workdir(config)
    is_main = jax.process_index() == 0
    lock = _open_run(workdir, config, is_main)
    try:
        return _train(config, workdir, mesh, is_main)
    finally:
        if lock is not None:
            lock.release()


def _train(config: Config, workdir: str, mesh, is_main: bool) -> dict[str, Any]:
    data = load_data(config)
    mesh = parallel.make_mesh() if mesh is None else mesh
    n_data = parallel.data_size(mesh)
    if config.train_bs % n_data:
        raise ValueError(
            f"train_bs {config.train_bs} is not divisible by the {n_data} data-parallel devices"
        )
    num_train = num_train_examples(data, config)
    steps_per_epoch = num_train // config.train_bs
    if steps_per_epoch == 0:
        raise ValueError(
            f"train_bs {config.train_bs} is larger than the {num_train} training examples"
        )
    if config.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, config.max_steps_per_epoch)
    total_steps = steps_per_epoch * config.epochs

    model = build_model(config, data)
    tx = make_tx(config, model, total_steps, steps_per_epoch)
    if config.skip_nonfinite:
        tx = optax.apply_if_finite(tx, config.skip_nonfinite)
    trainer = Trainer(config, model, tx, mesh)

    if is_main:  # The flags, the data and the model are accepted: the run takes the folder.
        run_folder.start_run(workdir, config)
    checkpoints = None
    if config.checkpoint:
        checkpoints = Checkpoints(os.path.join(workdir, run_folder.CHECKPOINT_DIR), is_main)
    try:
        return _loop(config, workdir, data, mesh, trainer, checkpoints, steps_per_epoch, is_main)
    finally:
        if checkpoints is not None:
            checkpoints.close()


def _resume(config, workdir, data, trainer, checkpoints, is_main) -> tuple[int, list[dict]]:
    """The first epoch to train and the rows of the epochs before it."""
    restored = checkpoints.restore(trainer.state) if checkpoints is not None else None
    if restored is None:
        if is_main:
            print(f"no checkpoint in {workdir}: starting at epoch 1", file=sys.stderr, flush=True)
            run_folder.write_metrics(workdir, [])
        return 1, []
    last, trainer.state, record = restored
    rows = [r for r in run_folder.read_metrics(workdir) if r["epoch"] <= last]
    if not any(r["epoch"] == last for r in rows):  # Checkpointed, then stopped before its row.
        rows.append(_row(last, record, trainer.evaluate(data, config)))
    missing = sorted(set(range(1, last + 1)) - {r["epoch"] for r in rows})
    if is_main:
        if missing:
            print(
                f"warning: {run_folder.METRICS_FILE} in {workdir} has no rows for epochs "
                f"{missing}; they stay missing",
                file=sys.stderr,
                flush=True,
            )
        run_folder.write_metrics(workdir, rows)
    return last + 1, rows


def _row(epoch: int, train: dict[str, Any], test: dict[str, float]) -> dict[str, Any]:
    row = {
        "epoch": epoch,
        "train_loss": train.get("train_loss"),
        "train_accuracy": train.get("train_accuracy"),
        "test_loss": test["loss"],
        "test_accuracy": test["accuracy"],
        "epoch_time_s": train.get("train_time_s", 0.0) + test.get("time_s", 0.0),
    }
    skip = ("epoch", "train_loss", "train_accuracy", "train_time_s")
    row.update({k: v for k, v in train.items() if k not in skip})  # Logged values, skipped steps.
    return row


def _loop(config, workdir, data, mesh, trainer, checkpoints, steps_per_epoch, is_main):
    start_epoch, rows = 1, []
    if config.resume:
        start_epoch, rows = _resume(config, workdir, data, trainer, checkpoints, is_main)
    elif is_main:
        run_folder.write_metrics(workdir, [])

    train_time, train_images, t_run = 0.0, 0, time.perf_counter()
    for epoch in range(start_epoch, config.epochs + 1):
        bar = _progress(steps_per_epoch, epoch, config, is_main)
        sums: dict[str, jax.Array] = {}
        t0 = time.perf_counter()
        timed_from, timed_steps, done = None, 0, 0
        first_bad = jnp.array(-1, jnp.int32)
        batches = itertools.islice(train_batches(data, config, epoch), steps_per_epoch)
        for step, (x, y) in enumerate(parallel.prefetch_to_device(mesh, batches)):
            done += 1
            metrics = trainer.train_step(x, y)
            finite = metrics.pop("finite")
            first_bad = jnp.where((first_bad < 0) & ~finite, step, first_bad)
            sums = metrics if not sums else jax.tree.map(jnp.add, sums, metrics)
            if step == 0:  # Time from the end of the first (compiling) step.
                jax.block_until_ready(metrics)
                timed_from = time.perf_counter()
            else:
                timed_steps += 1
            if bar is not None:
                bar.update(1)
                if step % 10 == 0 or step == steps_per_epoch - 1:
                    bar.set_postfix({k: f"{float(v):.4g}" for k, v in metrics.items()})
            if step % CHECK_FINITE_EVERY == CHECK_FINITE_EVERY - 1 and int(first_bad) >= 0:
                break
        jax.block_until_ready(trainer.state)
        if bar is not None:
            bar.close()
        if int(first_bad) >= 0:
            _stop_nonfinite(config, epoch, int(first_bad), steps_per_epoch, checkpoints)
        if timed_from is not None and timed_steps:
            train_time += time.perf_counter() - timed_from
            train_images += timed_steps * config.train_bs
        counted = max(float(sums.pop("counted")), 1.0)
        train = {
            "train_loss": float(sums.pop("loss")) / counted,
            "train_accuracy": float(sums.pop("accuracy")) / max(done, 1),
            "train_time_s": time.perf_counter() - t0,
        }
        train.update({k: float(v) / max(done, 1) for k, v in sums.items()})  # Logged values.
        if config.skip_nonfinite:
            train["skipped_steps"] = int(trainer.opt_value("total_notfinite"))
        # The epoch is saved before anything that can fail after it (evaluation, plots).
        if checkpoints is not None:
            checkpoints.save(epoch, trainer.state, train)
        t_eval = time.perf_counter()
        test = trainer.evaluate(data, config) | {"time_s": time.perf_counter() - t_eval}
        row = _row(epoch, train, test)
        rows.append(row)
        if is_main:
            run_folder.write_metrics(workdir, rows)
            test_name = "valid" if isinstance(data, TextData) else "test"
            print(
                f"epoch {epoch:3d}  train loss {row['train_loss']:.4f}  acc {row['train_accuracy']:.4f}  "
                f"{test_name} loss {row['test_loss']:.4f}  acc {row['test_accuracy']:.4f}"
                + "".join(f"  {name} {row[name]:.4g}" for name in trainer.spec.logged),
                flush=True,
            )

    final = dict(rows[-1]) if rows else {}
    final.update(
        images_per_second=train_images / train_time if train_time else None,
        wall_time_s=time.perf_counter() - t_run,
        num_devices=parallel.data_size(mesh),
        steps_per_epoch=steps_per_epoch,
    )
    if isinstance(data, TextData):
        final.update(lm.lm_summary(data, config, final))
        if is_main and config.samples and jax.process_count() == 1:
            lm.write_samples(lm.samples_path(workdir), trainer.model(), data, config)
    if is_main and rows:
        run_folder.write_summary(workdir, final)
        title = f"{config.optimizer} {config.arch} {config.dataset}"
        plot_curves(os.path.join(workdir, run_folder.PLOT_FILE), rows, title)
    final["params"] = trainer.params()
    return final


def _stop_nonfinite(config, epoch, step, steps_per_epoch, checkpoints) -> None:
    kept = "no checkpoint is kept"
    if checkpoints is not None and checkpoints.steps():
        kept = f"the checkpoints up to epoch {epoch - 1} are kept (--resume starts from them)"
    what = "the state" if config.skip_nonfinite else "the loss or the state"
    raise NonFiniteError(
        f"{what} became NaN or infinite at epoch {epoch}, step {step + 1} of {steps_per_epoch}; "
        f"the run stops and {kept}. "
        + (
            f"(--skip-nonfinite {config.skip_nonfinite} skips steps of non-finite gradients, "
            "up to that many in a row.)"
            if config.skip_nonfinite
            else "--skip-nonfinite N skips up to N non-finite steps in a row instead."
        ),
        steps=(epoch - 1) * steps_per_epoch + step + 1,
        steps_per_epoch=steps_per_epoch,
    )


def summary_line(config: Config, final: dict[str, Any]) -> str:
    if "tokens_per_second" in final:
        tps = final["tokens_per_second"]
        return (
            f"{config.optimizer} {config.arch} {config.dataset}: validation loss "
            f"{final['test_loss']:.4f} nats/byte, {final['epoch']} epochs of "
            f"{final['steps_per_epoch']} steps, {final['wall_time_s']:.1f} s, "
            + (f"{tps:.0f} tokens/s" if tps else "tokens/s n/a")
            + f" on {final['num_devices']} device(s)"
        )
    ips = final.get("images_per_second")
    return (
        f"{config.optimizer} {config.arch} {config.dataset}: test accuracy {final['test_accuracy']:.4f}, "
        f"test loss {final['test_loss']:.4f}, {final['epoch']} epochs, {final['wall_time_s']:.1f} s, "
        + (f"{ips:.0f} images/s" if ips else "images/s n/a")
        + f" on {final['num_devices']} device(s)"
    )
