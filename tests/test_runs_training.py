"""A training run never mixes, loses or corrupts work: the run folder under real training runs,
kills, a second process, failing writes, failing evaluations and non-finite steps."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from benchmarks import train
from benchmarks.config import Config
from benchmarks.run import NonFiniteError, train_and_evaluate
from benchmarks.run_folder import RunFolderError
from benchmarks.task import Task
from benchmarks.trainer import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Every epoch checkpointed: the guarantees below are tested at each epoch's save.
TINY = dict(width=32, train_bs=128, test_bs=512, progress=False, checkpoint_every=1)
CLI_TINY = ["--width", "32", "--no-progress", "--checkpoint-every", "1"]


def _config(workdir, **overrides) -> Config:
    return Config(workdir=str(workdir), **(TINY | dict(epochs=3) | overrides))


def _rows(workdir) -> list[dict]:
    return [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]


def _same_params(a, b) -> None:
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 3-epoch run: its folder and its final metrics."""
    workdir = tmp_path_factory.mktemp("reference") / "run"
    return workdir, train_and_evaluate(_config(workdir))


def _cli(args, prelude: str = "") -> subprocess.Popen:
    """``python -m benchmarks.train`` with ``args``, after running ``prelude`` in the process."""
    code = f"{prelude}\nimport runpy\nrunpy.run_module('benchmarks.train', run_name='__main__')"
    return subprocess.Popen(
        [sys.executable, "-c", code, *CLI_TINY, *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait_for(path, process, timeout=300) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert process.poll() is None, process.communicate()[0]
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout} s"
        time.sleep(0.02)


# --------------------------------------------------------------------------------------------------


def test_second_process_refused_then_kill_9_and_resume_is_exact(tmp_path, reference):
    """A run is killed (SIGKILL) after its first checkpoint; meanwhile a second process in the
    same folder is refused. The killed run leaves no stuck lock, and resuming it ends with the
    weights of the uninterrupted run."""
    workdir = tmp_path / "run"
    first = _cli(["--epochs", "200", "--workdir", str(workdir)])
    try:
        _wait_for(workdir / "checkpoints" / "1" / "SHA256SUMS", first)
        first.send_signal(signal.SIGSTOP)  # Frozen in epoch 2 (or 3), still holding the folder.
        second = _cli(["--epochs", "200", "--workdir", str(workdir), "--resume"])
        out = second.communicate(timeout=300)[0]
        assert second.returncode == 1, out
        assert f"in use by another run (pid {first.pid}" in out
        assert first.poll() is None  # Still running when killed.
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=60)
    resumed = train_and_evaluate(_config(workdir, resume=True))  # AGD: epochs may change.
    ref_dir, ref = reference
    _same_params(ref["params"], resumed["params"])
    assert [r["epoch"] for r in _rows(workdir)] == [1, 2, 3]
    assert _rows(workdir)[-1]["test_loss"] == _rows(ref_dir)[-1]["test_loss"]


# A kill (SIGKILL) inside each phase of a save of epoch EPOCH, set up before ``benchmarks.train``
# runs in the process; the saves of the other epochs run as usual.
KILL = "os.kill(os.getpid(), signal.SIGKILL)"
KILL_IN = {
    # Orbax has started writing the epoch and is still at it.
    "write": f"""
write = C._write
def _write(self, path, leaves):
    if path.endswith(os.sep + str(EPOCH)):
        self._checkpointer.save(path, leaves)
        {KILL}
    write(self, path, leaves)
C._write = _write
""",
    # The epoch's folder is whole; its read-back has not finished, it has no SHA256SUMS.
    "read-back": f"""
read_back = C._read_back
def _read_back(self, path, leaves, state):
    if path.endswith(os.sep + str(EPOCH)):
        {KILL}
    read_back(self, path, leaves, state)
C._read_back = _read_back
""",
    # SHA256SUMS listing half the files: worse than the kill can leave (it is renamed in whole).
    "checksum": f"""
write_sums = C.write_sums
def _write_sums(self, epoch):
    if epoch == EPOCH:
        folder = self.path(epoch)
        files, _ = checkpointing._files(folder)
        with open(os.path.join(folder, checkpointing.SUMS_FILE), "w") as f:
            for rel in files[: len(files) // 2]:
                f.write(checkpointing._sha256(os.path.join(folder, rel)) + "  " + rel + chr(10))
        {KILL}
    write_sums(self, epoch)
C.write_sums = _write_sums
""",
    # Rotating away the oldest checkpoint: it is half-deleted (its SHA256SUMS and a file gone).
    "rotation": f"""
def _remove(path):
    if os.path.isdir(path):
        os.remove(os.path.join(path, checkpointing.SUMS_FILE))
        os.remove(os.path.join(path, checkpointing.RECORD_FILE))
        {KILL}
checkpointing._remove = _remove
""",
}


def test_a_kill_in_any_phase_of_a_save_resumes_to_the_same_run(tmp_path, reference):
    """Killed while saving epoch 1 (writing, reading back: no intact checkpoint at all), epoch 2
    (writing its checksums) or epoch 3 (rotating epoch 1 away), each run resumes and ends with
    the weights and metrics of the uninterrupted run."""
    cases = {"write": 1, "read-back": 1, "checksum": 2, "rotation": 3}
    runs = {}
    for phase, epoch in cases.items():
        prelude = (
            "import os, signal\nfrom benchmarks import checkpointing\n"
            f"C = checkpointing.Checkpoints\nEPOCH = {epoch}\n{KILL_IN[phase]}"
        )
        runs[phase] = _cli(["--epochs", "3", "--workdir", str(tmp_path / phase)], prelude)
    for phase, run in runs.items():  # All four at once: their start-up overlaps.
        out = run.communicate(timeout=300)[0]
        assert run.returncode == -signal.SIGKILL, (phase, out)
    ref_dir, ref = reference
    for phase, epoch in cases.items():
        workdir = tmp_path / phase
        assert [r["epoch"] for r in _rows(workdir)] == list(range(1, epoch)), phase
        resumed = train_and_evaluate(_config(workdir, resume=True))
        _same_params(ref["params"], resumed["params"])
        for key in ("epoch", "train_loss", "test_loss", "eta"):
            assert [r[key] for r in _rows(workdir)] == [r[key] for r in _rows(ref_dir)], phase
        assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "3"], phase


def test_config_json_is_written_only_for_an_accepted_run(tmp_path, reference):
    ref_dir, _ = reference
    saved = (ref_dir / "config.json").read_bytes()
    with pytest.raises(RunFolderError, match=r"--seed +0 -> 1"):
        train_and_evaluate(_config(ref_dir, resume=True, seed=1))
    with pytest.raises(RunFolderError, match="holds another run"):
        train_and_evaluate(_config(ref_dir))
    assert (ref_dir / "config.json").read_bytes() == saved
    with pytest.raises(FileNotFoundError):
        train_and_evaluate(_config(tmp_path / "new", dataset="mnist", data_dir=str(tmp_path)))
    assert sorted(os.listdir(tmp_path / "new")) == [".lock", "checkpoints"]  # No run files.


def test_overwrite_replaces_the_run(tmp_path, reference):
    workdir = tmp_path / "run"
    shutil.copytree(reference[0], workdir)
    train_and_evaluate(_config(workdir, overwrite=True, epochs=1, seed=1))
    assert json.loads((workdir / "config.json").read_text())["seed"] == 1
    assert [r["epoch"] for r in _rows(workdir)] == [1]
    assert sorted(os.listdir(workdir / "checkpoints")) == ["1"]


def test_an_epoch_is_checkpointed_before_its_evaluation(tmp_path, reference, monkeypatch):
    workdir = tmp_path / "run"
    evaluate = Trainer.evaluate
    calls = []

    def failing(self, task):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("cannot read a validation image")
        return evaluate(self, task)

    monkeypatch.setattr(Trainer, "evaluate", failing)
    with pytest.raises(OSError, match="validation image"):
        train_and_evaluate(_config(workdir))
    assert [r["epoch"] for r in _rows(workdir)] == [1]
    assert (workdir / "checkpoints" / "2" / "SHA256SUMS").exists()
    monkeypatch.setattr(Trainer, "evaluate", evaluate)
    resumed = train_and_evaluate(_config(workdir, resume=True))
    ref_dir, ref = reference
    _same_params(ref["params"], resumed["params"])
    rows, ref_rows = _rows(workdir), _rows(ref_dir)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    for key in ("train_loss", "test_loss", "eta"):  # Epoch 2's row rebuilt exactly.
        assert [r[key] for r in rows] == [r[key] for r in ref_rows]


def _nan_batches(monkeypatch, epoch, step):
    batches = Task.train_batches

    def with_nan(self, e):
        for i, (x, y) in enumerate(batches(self, e)):
            if (e, i) == (epoch, step):
                x = np.full_like(x, np.nan)
            yield x, y

    monkeypatch.setattr(Task, "train_batches", with_nan)


def test_a_nan_loss_stops_the_run_and_keeps_the_last_finite_checkpoint(tmp_path, monkeypatch):
    workdir = tmp_path / "run"
    _nan_batches(monkeypatch, epoch=2, step=3)
    with pytest.raises(
        NonFiniteError, match=r"at epoch 2, step 4 of 11; .* up to epoch 1 are kept"
    ) as stopped:
        train_and_evaluate(_config(workdir))
    assert (stopped.value.steps, stopped.value.steps_per_epoch) == (11 + 4, 11)
    assert sorted(os.listdir(workdir / "checkpoints")) == ["1"]
    assert [r["epoch"] for r in _rows(workdir)] == [1]


def test_skip_nonfinite_skips_the_step(tmp_path, monkeypatch):
    workdir = tmp_path / "run"
    _nan_batches(monkeypatch, epoch=2, step=3)
    final = train_and_evaluate(_config(workdir, skip_nonfinite=3))
    rows = _rows(workdir)
    assert [r["skipped_steps"] for r in rows] == [0, 1, 1]
    assert all(np.isfinite(r["train_loss"]) for r in rows) and np.isfinite(final["test_loss"])


# Files over 8 kB cannot be written; a write past the limit fails with EFBIG, not SIGXFSZ. Each
# 64 x 64 weight takes about 15 kB in a checkpoint's data files (16 kB raw, compressed), so the
# first checkpoint always fails (with a 16 kB limit it passed when orbax put one weight per file).
LIMIT_FILE_SIZE = (
    "import resource, signal; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
    "resource.setrlimit(resource.RLIMIT_FSIZE, (8_000, 8_000))"
)


def test_a_failed_checkpoint_write_exits_with_the_path_and_the_error(tmp_path):
    """Files over 8 kB cannot be written (as on a full disk): the first checkpoint fails, and
    the process exits non-zero instead of waiting on orbax's threads."""
    workdir = tmp_path / "run"
    run = _cli(["--epochs", "3", "--width", "64", "--workdir", str(workdir)], LIMIT_FILE_SIZE)
    out = run.communicate(timeout=240)[0]
    assert run.returncode == 1, out
    assert (
        f"error: could not save the checkpoint of epoch 1 in {workdir / 'checkpoints' / '1'}" in out
    )
    assert "File too large" in out


def test_an_unwritable_checkpoint_folder_fails_before_training(tmp_path, capsys):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "checkpoints").write_text("not a folder")
    assert train.main([*CLI_TINY, "--epochs", "3", "--workdir", str(workdir), "--overwrite"]) == 1
    out = capsys.readouterr()
    assert f"error: cannot write checkpoints in {workdir / 'checkpoints'}" in out.err
    assert "epoch   1" not in out.out


def test_resuming_a_finished_run_keeps_it_as_it_was(tmp_path, reference, capsys):
    workdir = tmp_path / "run"
    shutil.copytree(reference[0], workdir)
    summary = (workdir / "summary.json").read_bytes()
    args = [*CLI_TINY, "--workdir", str(workdir), "--resume"]
    assert train.main([*args, "--epochs", "2"]) == 1  # Fewer epochs than it has trained.
    err = capsys.readouterr().err
    assert err.startswith("error: cannot resume the run") and "has trained 3 epochs" in err
    assert json.loads((workdir / "config.json").read_text())["epochs"] == 3
    assert train.main([*args, "--epochs", "3"]) == 0  # Nothing to train: nothing rewritten.
    out = capsys.readouterr()
    assert "nothing to train; summary.json is kept as it was" in out.err
    assert "test accuracy" in out.out
    assert (workdir / "summary.json").read_bytes() == summary
    _same_params(
        reference[1]["params"], train_and_evaluate(_config(workdir, resume=True))["params"]
    )


def test_a_failed_metrics_write_is_a_one_line_error_naming_the_file(tmp_path, monkeypatch, capsys):
    from benchmarks import run_folder

    write = run_folder.write_atomic

    def limited(path, text):
        if path.endswith("metrics.jsonl") and text:
            raise OSError(27, "File too large")
        write(path, text)

    monkeypatch.setattr(run_folder, "write_atomic", limited)
    workdir = tmp_path / "run"
    assert train.main([*CLI_TINY, "--epochs", "1", "--workdir", str(workdir)]) == 1
    err = capsys.readouterr().err
    assert f"error: could not write {workdir / 'metrics.jsonl'}: [Errno 27] File too large" in err
    assert "Traceback" not in err


def test_a_hand_edited_config_cannot_continue_weights_made_under_other_settings(
    tmp_path, reference
):
    from benchmarks.checkpointing import CheckpointError

    workdir = tmp_path / "run"
    shutil.copytree(reference[0], workdir)
    saved = json.loads((workdir / "config.json").read_text())
    (workdir / "config.json").write_text(json.dumps(saved | {"seed": 1}))
    with pytest.raises(CheckpointError, match=r"checkpoints/3 was made with other settings"):
        train_and_evaluate(_config(workdir, resume=True, seed=1))
