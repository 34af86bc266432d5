"""train_and_evaluate: the training program's loop, from a ``Config`` to a run folder.

The pieces: ``input_pipeline`` (data and batches), ``trainer`` (model, optimizer, jitted steps),
``checkpointing`` (orbax), ``workdir`` (the run folder's files), ``reporting`` (the curves).
"""

from __future__ import annotations

import itertools
import os
import time
from typing import Any

import jax
import jax.numpy as jnp

from benchmarks import lm, parallel
from benchmarks import workdir as run_folder
from benchmarks.checkpointing import checkpoint_manager, restore_checkpoint, save_checkpoint
from benchmarks.config import Config
from benchmarks.data.text import TextData
from benchmarks.input_pipeline import load_data, num_train_examples, train_batches
from benchmarks.reporting import plot_curves
from benchmarks.trainer import Trainer, build_model, make_tx

# --------------------------------------------------------------------------------------------------
# The program.


def _progress(total: int, epoch: int, config: Config, is_main: bool):
    if not (config.progress and is_main):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"epoch {epoch}/{config.epochs}", leave=False, dynamic_ncols=True)


def train_and_evaluate(config: Config, workdir: str | None = None, mesh=None) -> dict[str, Any]:
    """Trains ``config``'s model and returns the final metrics (also written to ``workdir``).

    Writes ``config.json``, ``metrics.jsonl`` (one line per epoch), ``curves.png`` and orbax
    checkpoints (one per epoch) in ``workdir``. With ``config.resume``, continues from the latest
    checkpoint: a run stopped after epoch k and resumed ends with exactly the weights of an
    uninterrupted run.
    """
    config.validate()
    workdir = workdir or config.workdir or run_folder.default_workdir(config)
    is_main = jax.process_index() == 0
    run_folder.prepare(workdir, config, is_main)

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
    trainer = Trainer(config, model, make_tx(config, model, total_steps, steps_per_epoch), mesh)

    manager = checkpoint_manager(workdir) if config.checkpoint else None
    start_epoch, rows = 1, []
    if config.resume and manager is not None:
        restored = restore_checkpoint(manager, trainer.state)
        if restored is not None:
            last, trainer.state = restored
            start_epoch = last + 1
            rows = [r for r in run_folder.read_metrics(workdir) if r["epoch"] <= last]
    elif is_main:
        run_folder.write_metrics(workdir, [])

    train_time, train_images, t_run = 0.0, 0, time.perf_counter()
    for epoch in range(start_epoch, config.epochs + 1):
        bar = _progress(steps_per_epoch, epoch, config, is_main)
        sums: dict[str, jax.Array] = {}
        t0 = time.perf_counter()
        timed_from, timed_steps, done = None, 0, 0
        batches = itertools.islice(train_batches(data, config, epoch), steps_per_epoch)
        for step, (x, y) in enumerate(parallel.prefetch_to_device(mesh, batches)):
            done += 1
            metrics = trainer.train_step(x, y)
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
        jax.block_until_ready(trainer.state)
        if timed_from is not None and timed_steps:
            train_time += time.perf_counter() - timed_from
            train_images += timed_steps * config.train_bs
        if bar is not None:
            bar.close()
        train = {k: float(v) / max(done, 1) for k, v in sums.items()}
        test = trainer.evaluate(data, config)
        row = {
            "epoch": epoch,
            "train_loss": train.get("loss"),
            "train_accuracy": train.get("accuracy"),
            "test_loss": test["loss"],
            "test_accuracy": test["accuracy"],
            "epoch_time_s": time.perf_counter() - t0,
        }
        row.update({name: train[name] for name in trainer.spec.logged})  # Epoch means.
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
        if manager is not None:
            save_checkpoint(manager, epoch, trainer.state)

    wall = time.perf_counter() - t_run
    final = dict(rows[-1]) if rows else {}
    final.update(
        images_per_second=train_images / train_time if train_time else None,
        wall_time_s=wall,
        num_devices=n_data,
        steps_per_epoch=steps_per_epoch,
    )
    if isinstance(data, TextData):
        final.update(lm.lm_summary(data, config, final))
        if is_main and config.samples and jax.process_count() == 1:
            lm.write_samples(lm.samples_path(workdir), trainer.model(), data, config)
    if is_main and rows:
        title = f"{config.optimizer} {config.arch} {config.dataset}"
        plot_curves(os.path.join(workdir, run_folder.PLOT_FILE), rows, title)
        run_folder.write_summary(workdir, final)
    trainer_params = trainer.params()
    final["params"] = trainer_params
    return final


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
