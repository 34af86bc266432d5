"""``train_and_evaluate``: one run of the training program, from a ``Config`` to a run folder.

Read it top to bottom: the task and its data, the optimizer (looked up once), the model and
optimizer state (``trainer``), the run folder and checkpoints, the epochs, the summary. The
pieces it calls: ``task`` (what differs between classification and language modelling),
``optimizers`` (the registry), ``trainer`` (state and compiled steps), ``run_folder`` (the
folder's files, lock and contract), ``checkpointing`` (verified checkpoints), ``reporting``.
"""

from __future__ import annotations

import functools
import itertools
import os
import sys
import time
from typing import Any

import jax
import numpy as np
from flax import nnx

from benchmarks import optimizers, parallel
from benchmarks import run_folder as folder
from benchmarks.cache import enable_compilation_cache
from benchmarks.checkpointing import CheckpointError, Checkpoints, check_writable
from benchmarks.config import Config
from benchmarks.reporting import plot_curves
from benchmarks.run_folder import RunFolderError
from benchmarks.task import Task, make_task, task_type
from benchmarks.trainer import Trainer, agd_initialization, describe_roles, model_builder

# How often (in steps) the loop looks at whether a step went non-finite, besides each epoch's end.
CHECK_FINITE_EVERY = 100
# Automatic checkpoints: a save once the training since the last one took this many times as long
# as the last save did (checkpoints stay under about 1 / (1 + SAVE_RATIO) of the time).
SAVE_RATIO = 10.0
_TRANSFORMATIONS: dict[str, Any] = {}  # Run key (Config.computation_key) -> its optimizer.


class NonFiniteError(RuntimeError):
    """A step's loss or the state it left was NaN or infinite: ``steps`` steps were taken, the
    bad one included, of ``steps_per_epoch`` per epoch."""

    def __init__(self, message: str, steps: int = 0, steps_per_epoch: int = 0):
        super().__init__(message)
        self.steps = steps
        self.steps_per_epoch = steps_per_epoch


def train_and_evaluate(config: Config, workdir: str | None = None, mesh=None) -> dict[str, Any]:
    """Trains ``config``'s model and returns the final metrics (also written to ``workdir``).

    Writes ``config.json``, ``metrics.jsonl`` (one line per epoch), ``summary.json``,
    ``curves.png`` and verified checkpoints in ``workdir`` (see ``run_folder`` for what the
    folder guarantees; ``config.checkpoint_every`` for which epochs are saved, the last always).
    With ``config.resume``, continues from the newest intact checkpoint: a run stopped after
    epoch k and resumed ends with exactly the weights of an uninterrupted run.
    """
    t_start = time.perf_counter()
    config.ensure_valid()
    if config.compilation_cache:
        enable_compilation_cache()
    spec = optimizers.get(config.optimizer)  # The one lookup of the optimizer's entry.
    workdir = workdir or config.workdir or folder.default_workdir(config)
    is_main = jax.process_index() == 0
    lock = _open_run_folder(workdir, config, spec.epochs_matter(config), is_main)
    try:
        task = make_task(config)
        mesh = parallel.make_mesh() if mesh is None else mesh
        steps_per_epoch = _steps_per_epoch(config, task, mesh)

        trainer, roles = _build_trainer(config, spec, task, mesh, steps_per_epoch)

        if is_main:  # The flags, the data and the model are accepted: the run takes the folder.
            folder.start_run(workdir, config)
        checkpoints = None
        if config.checkpoint:
            settings = config.settings_digest(spec.epochs_matter(config))
            directory = os.path.join(workdir, folder.CHECKPOINT_DIR)
            checkpoints = Checkpoints(directory, is_main, settings=settings)
        try:
            first_epoch, rows = _resume_or_start(config, workdir, task, trainer, checkpoints)
            kept = folder.read_summary(workdir) if first_epoch > config.epochs else None
            if kept is not None:  # A finished run resumed: nothing to train, nothing rewritten.
                if is_main:
                    print(
                        f"the run in {workdir} has finished its {config.epochs} epochs: nothing "
                        f"to train; {folder.SUMMARY_FILE} is kept as it was",
                        file=sys.stderr,
                        flush=True,
                    )
                return kept | {"params": trainer.params()}
            clock = _Clock(t_start)
            for epoch in range(first_epoch, config.epochs + 1):
                train = _train_epoch(config, task, trainer, epoch, steps_per_epoch, clock)
                bad_step = train.pop("first_bad_step")
                if bad_step is not None:
                    _stop_nonfinite(config, epoch, bad_step, steps_per_epoch, checkpoints)
                # The epoch is saved before anything that can fail after it (evaluation, plots).
                if checkpoints is not None and clock.save_due(config, epoch):
                    clock.timed_save(lambda e=epoch, t=train: checkpoints.save(e, trainer.state, t))
                t_eval = time.perf_counter()
                test = trainer.evaluate(task) | {"time_s": time.perf_counter() - t_eval}
                rows.append(_row(epoch, train, test))
                if is_main:
                    folder.write_metrics(workdir, rows)
                    print(_epoch_line(rows[-1], task, spec.logged), flush=True)
        finally:
            if checkpoints is not None:
                checkpoints.close()

        final = _summarize(
            config, workdir, task, trainer, rows, clock, roles, mesh, steps_per_epoch
        )
        final["params"] = trainer.params()
        return final
    finally:
        if lock is not None:
            lock.release()


def _build_trainer(config, spec, task, mesh, steps_per_epoch) -> tuple[Trainer, Any]:
    """The run's ``Trainer``, and its roles (a cached callable: read once from the model's
    shapes, only by the optimizers and initialisations that use them). Runs of one process that
    differ only in the seed share the optimizer and compiled programs."""
    build_model = model_builder(config, task, spec.agd_init)
    shapes = nnx.eval_shape(lambda: build_model(0))
    roles = functools.cache(lambda: task.roles(shapes))
    key = f"{config.computation_key('seed')} {steps_per_epoch} {nnx.state(shapes)}"
    if key not in _TRANSFORMATIONS:
        total_steps = steps_per_epoch * config.epochs
        _TRANSFORMATIONS[key] = optimizers.resolve(
            spec, config, total_steps, steps_per_epoch, roles
        )
    initialize = agd_initialization(config, task, spec.agd_init, roles)
    trainer = Trainer(config, spec, _TRANSFORMATIONS[key], build_model, initialize, mesh, key)
    return trainer, roles


def _summarize(config, workdir, task, trainer, rows, clock, roles, mesh, steps_per_epoch):
    """The final metrics, with the seconds spent and what ran; process 0 writes summary.json,
    the task's files (samples) and the curves."""
    is_main = jax.process_index() == 0
    final = dict(rows[-1]) if rows else {}
    final.update(clock.summary(config, trainer), num_devices=parallel.data_size(mesh))
    final.update(steps_per_epoch=steps_per_epoch)
    final["ran"] = {  # What the run was built from: its optimizer state, and the roles used.
        "optimizer_state": trainer.state_types(),
        "roles": describe_roles(roles()) if roles.cache_info().currsize else None,
    }
    final.update(task.summary(final))
    if is_main and rows:
        try:
            task.finish(workdir, trainer.model())
        except OSError as e:
            raise RunFolderError(f"could not write the samples in {workdir}: {e}") from e
        folder.write_summary(workdir, final)
        title = f"{config.optimizer} {config.arch} {config.dataset}"
        plot = os.path.join(workdir, folder.PLOT_FILE)
        try:
            plot_curves(plot, rows, title)
        except OSError as e:
            raise RunFolderError(f"could not write {plot}: {e}") from e
    return final


def summary_line(config: Config, final: dict[str, Any]) -> str:
    """The run's last printed line."""
    return task_type(config)(config, None).line(final)


# --------------------------------------------------------------------------------------------------
# The steps of a run, in the order train_and_evaluate takes them.


def _open_run_folder(workdir, config, epochs_matter, is_main) -> folder.RunLock | None:
    """Process 0 locks and checks the run folder; every process learns whether it may go on."""
    lock, error = None, None
    if is_main:
        try:
            lock = folder.open_run(workdir, config, epochs_matter)
            if config.checkpoint:
                check_writable(os.path.join(workdir, folder.CHECKPOINT_DIR))
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


def _steps_per_epoch(config: Config, task: Task, mesh) -> int:
    n_data = parallel.data_size(mesh)
    if config.train_bs % n_data:
        raise ValueError(
            f"train_bs {config.train_bs} is not divisible by the {n_data} data-parallel devices"
        )
    num_train = task.num_train()
    steps = num_train // config.train_bs
    if steps == 0:
        raise ValueError(
            f"train_bs {config.train_bs} is larger than the {num_train} training examples"
        )
    return min(steps, config.max_steps_per_epoch) if config.max_steps_per_epoch else steps


def _resume_or_start(config, workdir, task, trainer, checkpoints) -> tuple[int, list[dict]]:
    """The first epoch to train and the rows of the epochs before it."""
    is_main = jax.process_index() == 0
    restored = None
    if config.resume and checkpoints is not None:
        restored = checkpoints.restore(trainer.state)
    if restored is None:
        if is_main:
            if config.resume:
                print(
                    f"no intact checkpoint in {os.path.join(workdir, folder.CHECKPOINT_DIR)}: "
                    "starting at epoch 1",
                    file=sys.stderr,
                    flush=True,
                )
            folder.write_metrics(workdir, [])
        return 1, []
    last, trainer.state, record = restored
    record = {k: v for k, v in record.items() if k != "settings"}
    rows = [r for r in folder.read_metrics(workdir) if r["epoch"] <= last]
    if not any(r["epoch"] == last for r in rows):  # Checkpointed, then stopped before its row.
        rows.append(_row(last, record, trainer.evaluate(task)))
    missing = sorted(set(range(1, last + 1)) - {r["epoch"] for r in rows})
    if is_main:
        if missing:
            print(
                f"warning: {folder.METRICS_FILE} in {workdir} has no rows for epochs "
                f"{missing}; they stay missing",
                file=sys.stderr,
                flush=True,
            )
        folder.write_metrics(workdir, rows)
    return last + 1, rows


class _Clock:
    """Where a run's seconds go: steady training (images per second), compilation, checkpoints;
    and when the next automatic checkpoint is due."""

    def __init__(self, start: float):
        self.start = start
        self.train_s, self.examples = 0.0, 0
        self.save_s, self.last_save_s, self.trained_since_save = 0.0, 0.0, 0.0

    def trained(self, seconds: float, examples: int) -> None:
        self.train_s += seconds
        self.examples += examples
        self.trained_since_save += seconds

    def save_due(self, config: Config, epoch: int) -> bool:
        if epoch == config.epochs:
            return True
        if config.checkpoint_every:
            return epoch % config.checkpoint_every == 0
        return self.trained_since_save >= SAVE_RATIO * self.last_save_s

    def timed_save(self, save) -> None:
        t0 = time.perf_counter()
        save()
        self.last_save_s = time.perf_counter() - t0
        self.save_s += self.last_save_s
        self.trained_since_save = 0.0

    def summary(self, config: Config, trainer: Trainer) -> dict[str, Any]:
        steady = self.examples and self.train_s > 0  # None when only warm-up steps ran.
        return {
            "images_per_second": self.examples / self.train_s if steady else None,
            "compile_time_s": trainer.compile_time_s,
            "init_time_s": trainer.init_time_s,
            "train_time_s": self.train_s,
            "checkpoint_time_s": self.save_s,
            "wall_time_s": time.perf_counter() - self.start,
        }


def _train_epoch(config, task, trainer, epoch, steps_per_epoch, clock) -> dict[str, Any]:
    """One epoch of steps. Bookkeeping stays on the host: each step's values (one small vector,
    ``trainer.metric_names``) are fetched in blocks (every ``CHECK_FINITE_EVERY`` steps and at
    the end) and summed in NumPy, so nothing outside the compiled step runs on the devices. Its
    steady time and examples (compilation and the warm-up step after it excluded) go to
    ``clock``."""
    bar = _progress(steps_per_epoch, epoch, config)
    names = trainer.metric_names
    t0 = time.perf_counter()
    fetched: list[np.ndarray] = []
    pending: list[jax.Array] = []
    first_bad = None
    compile_before, warmup_before = trainer.compile_time_s, trainer.warmup_steps
    batches = itertools.islice(task.train_batches(epoch), steps_per_epoch)
    for step, (x, y) in enumerate(parallel.prefetch_to_device(trainer.mesh, batches)):
        pending.append(trainer.train_step(x, y))
        if bar is not None:
            bar.update(1)
            if step % 10 == 0 and len(pending) > 2:  # A step the devices are likely done with.
                shown = zip(names, np.asarray(pending[-3]))
                bar.set_postfix({k: f"{v:.4g}" for k, v in shown if k != "finite"})
        if (step + 1) % CHECK_FINITE_EVERY == 0:
            fetched += jax.device_get(pending)
            pending = []
            first_bad = _first_bad(fetched, names)
            if first_bad is not None:
                break
    fetched += jax.device_get(pending)  # Waits for the last step.
    if bar is not None:
        bar.close()
    done = len(fetched)
    seconds = time.perf_counter() - t0 - (trainer.compile_time_s - compile_before)
    clock.trained(seconds, (done - (trainer.warmup_steps - warmup_before)) * config.train_bs)
    columns = np.ascontiguousarray(np.stack(fetched).T)  # One row per value, one column per step.
    sums = {k: float(np.sum(column)) for k, column in zip(names, columns)}
    counted = max(sums.pop("counted"), 1.0)
    train = {
        "train_loss": sums.pop("loss") / counted,
        "train_accuracy": sums.pop("accuracy") / max(done, 1),
        "train_time_s": time.perf_counter() - t0,
        "first_bad_step": _first_bad(fetched, names),
    }
    sums.pop("finite")
    train.update({k: v / max(done, 1) for k, v in sums.items()})  # Logged values.
    if config.skip_nonfinite:
        train["skipped_steps"] = int(trainer.opt_value("total_notfinite"))
    return train


def _first_bad(fetched: list[np.ndarray], names: tuple[str, ...]) -> int | None:
    finite = names.index("finite")
    bad = [i for i, m in enumerate(fetched) if not m[finite]]
    return bad[0] if bad else None


def _progress(total: int, epoch: int, config: Config):
    if not (config.progress and jax.process_index() == 0):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"epoch {epoch}/{config.epochs}", leave=False, dynamic_ncols=True)


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


def _epoch_line(row: dict[str, Any], task: Task, logged: tuple[str, ...]) -> str:
    return (
        f"epoch {row['epoch']:3d}  train loss {row['train_loss']:.4f}  acc "
        f"{row['train_accuracy']:.4f}  {task.eval_name} loss {row['test_loss']:.4f}  acc "
        f"{row['test_accuracy']:.4f}" + "".join(f"  {name} {row[name]:.4g}" for name in logged)
    )


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
