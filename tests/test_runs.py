"""The run folder contract and verified checkpoints: the parts that need no training."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import optimizers, run_folder
from benchmarks.checkpointing import (
    SUMS_FILE,
    CheckpointError,
    Checkpoints,
    check_writable,
)
from benchmarks.config import Config
from benchmarks.run_folder import RunFolderError, RunLock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# --------------------------------------------------------------------------------------------------
# Files.


def test_write_atomic_replaces_or_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    run_folder.write_atomic(str(path), "old\n")
    run_folder.write_atomic(str(path), "new\n")
    assert path.read_text() == "new\n"

    def fail(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="No space left"):
        run_folder.write_atomic(str(path), "cut")
    assert path.read_text() == "new\n"
    assert os.listdir(tmp_path) == ["metrics.jsonl"]  # No temporary file left behind.


def test_metrics_round_trip_and_a_bad_line_names_the_file(tmp_path):
    rows = [{"epoch": 1, "train_loss": 0.5}, {"epoch": 2, "train_loss": 0.25}]
    run_folder.write_metrics(str(tmp_path), rows)
    assert run_folder.read_metrics(str(tmp_path)) == rows
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1}\n{"epoch": 2, "tr')
    with pytest.raises(RunFolderError, match=r"metrics.jsonl, line 2, is not JSON"):
        run_folder.read_metrics(str(tmp_path))


# --------------------------------------------------------------------------------------------------
# One run per folder.


def test_a_second_lock_on_a_folder_is_refused_and_names_the_holder(tmp_path):
    with RunLock(str(tmp_path)):
        with pytest.raises(RunFolderError, match=rf"in use by another run \(pid {os.getpid()}"):
            RunLock(str(tmp_path))
    RunLock(str(tmp_path)).release()  # Released: free again.


def test_a_killed_run_leaves_no_stuck_lock(tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from benchmarks.run_folder import RunLock; "
            f"RunLock({str(tmp_path)!r}); print('locked', flush=True); time.sleep(600)",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunFolderError, match=f"pid {holder.pid}"):
            RunLock(str(tmp_path))
    finally:
        holder.kill()  # SIGKILL: no clean-up runs.
        holder.wait(timeout=60)
    RunLock(str(tmp_path)).release()


# --------------------------------------------------------------------------------------------------
# The contract.


def _check(workdir, config: Config) -> None:
    run_folder.check_run_folder(
        workdir, config, optimizers.get(config.optimizer).epochs_matter(config)
    )


def _saved_run(tmp_path, **values) -> str:
    workdir = str(tmp_path / "run")
    os.makedirs(os.path.join(workdir, "checkpoints", "1"))
    run_folder.save_config(workdir, Config(workdir=workdir, **values))
    run_folder.write_metrics(workdir, [{"epoch": 1}])
    return workdir


def test_a_new_run_refuses_a_folder_holding_another_run(tmp_path):
    workdir = _saved_run(tmp_path)
    with pytest.raises(
        RunFolderError, match=r"holds another run \(config.json, metrics.jsonl, checkpoints/\)"
    ) as e:
        _check(workdir, Config(workdir=workdir))
    assert "--resume" in str(e.value) and "--overwrite" in str(e.value)
    _check(workdir, Config(workdir=workdir, overwrite=True))
    (tmp_path / "run" / "notes.txt").write_text("mine")
    run_folder.clear_run(workdir)
    assert sorted(os.listdir(workdir)) == ["notes.txt"]  # Only the run's files go.
    _check(workdir, Config(workdir=workdir))  # Now free for a new run.


def test_resume_refuses_changed_flags_in_one_message(tmp_path):
    workdir = _saved_run(tmp_path, optimizer="sgd", lr=0.1, seed=0, loss="xent", augment=True)
    new = Config(
        workdir=workdir,
        resume=True,
        optimizer="sgd",
        lr=0.2,
        seed=3,
        loss="mse",
        augment=False,
        num_workers=1,  # Does not change the computation: allowed.
        epochs=80,  # A constant learning rate: more epochs continue the same run.
    )
    with pytest.raises(RunFolderError) as e:
        _check(workdir, new)
    message = str(e.value)
    assert message.startswith(f"cannot resume the run in {workdir}")
    for line in (
        "--lr          0.1 -> 0.2",
        '--loss        "xent" -> "mse"',
        "--seed        0 -> 3",
    ):
        assert line in message, message
    assert "--no-augment  true -> false" in message
    assert "num-workers" not in message and "epochs" not in message
    assert "another --workdir" in message and "--overwrite instead of --resume" in message


def test_resume_refuses_more_epochs_when_a_schedule_spans_them(tmp_path):
    workdir = _saved_run(tmp_path, optimizer="sgd", schedule="cosine", epochs=10)
    new = Config(workdir=workdir, resume=True, optimizer="sgd", schedule="cosine", epochs=20)
    with pytest.raises(RunFolderError, match="--epochs  10 -> 20"):
        _check(workdir, new)
    same = Config(workdir=workdir, resume=True, optimizer="sgd", schedule="cosine", epochs=10)
    _check(workdir, same)


def test_resume_without_a_config_beside_checkpoints_is_refused(tmp_path):
    workdir = _saved_run(tmp_path)
    os.remove(os.path.join(workdir, "config.json"))
    with pytest.raises(RunFolderError, match="no config.json"):
        _check(workdir, Config(workdir=workdir, resume=True))


# --------------------------------------------------------------------------------------------------
# Checkpoints.


def _state(value: float) -> dict:
    w = value + jax.random.normal(jax.random.key(0), (64, 32))
    return {"w": w, "step": jnp.array(int(value), jnp.int32)}


def _data_file(path: str) -> str:
    """The largest file of a checkpoint (the arrays' bytes)."""
    files = [
        os.path.join(r, n)
        for r, _, names in os.walk(path)
        for n in names
        if n not in (SUMS_FILE, "epoch.json")
    ]
    return max(files, key=os.path.getsize)


def _damage(path: str, how: str) -> None:
    if how == "no_sums":
        os.remove(os.path.join(path, SUMS_FILE))
        return
    target = _data_file(path)
    data = bytearray(open(target, "rb").read())
    if how == "flip":
        data[len(data) // 2] ^= 0xFF
    elif how == "truncate":
        data = data[: len(data) // 3]
    elif how == "empty":
        data = bytearray()
    open(target, "wb").write(bytes(data))


def test_checkpoints_are_verified_and_rotated_after_the_newer_one(tmp_path):
    ckpt = Checkpoints(str(tmp_path / "checkpoints"), keep=2)
    for epoch in (1, 2, 3):
        ckpt.save(epoch, _state(epoch), {"train_loss": 1.0 / epoch})
    assert ckpt.steps() == [2, 3]
    assert all(ckpt.damage(s) is None for s in ckpt.steps())
    sums = (tmp_path / "checkpoints" / "3" / SUMS_FILE).read_text()
    assert "epoch.json" in sums and len(sums.splitlines()) > 3
    epoch, state, record = ckpt.restore(_state(0.0))
    assert epoch == 3 and record == {"epoch": 3, "settings": None, "train_loss": 1.0 / 3}
    np.testing.assert_array_equal(state["w"], _state(3.0)["w"])
    ckpt.close()


@pytest.mark.parametrize("how", ["flip", "truncate", "empty", "no_sums"])
def test_a_damaged_newest_checkpoint_is_reported_and_the_one_before_used(tmp_path, capsys, how):
    ckpt = Checkpoints(str(tmp_path / "checkpoints"), keep=2)
    ckpt.save(1, _state(1.0))
    ckpt.save(2, _state(2.0))
    _damage(ckpt.path(2), how)
    assert ckpt.damage(2) is not None
    epoch, state, _ = ckpt.restore(_state(0.0))
    assert epoch == 1
    np.testing.assert_array_equal(state["w"], _state(1.0)["w"])
    err = capsys.readouterr().err
    assert f"checkpoint {ckpt.path(2)} is damaged or unfinished" in err
    assert ckpt.steps() == [1]  # The damaged one goes: its epoch is trained again.
    ckpt.close()


def test_no_intact_checkpoint_reports_each_and_starts_over(tmp_path, capsys):
    ckpt = Checkpoints(str(tmp_path / "checkpoints"), keep=2)
    ckpt.save(1, _state(1.0))
    ckpt.save(2, _state(2.0))
    _damage(ckpt.path(1), "flip")
    _damage(ckpt.path(2), "empty")
    assert ckpt.restore(_state(0.0)) is None  # The run starts at epoch 1, as a new one would.
    err = capsys.readouterr().err
    assert f"{ckpt.path(2)} is damaged" in err and f"{ckpt.path(1)} is damaged" in err
    assert ckpt.steps() == []
    ckpt.save(1, _state(1.0))  # And saves again.
    assert ckpt.damage(1) is None
    ckpt.close()


def test_an_unwritable_checkpoint_folder_fails_at_once_with_the_path(tmp_path):
    (tmp_path / "checkpoints").write_text("a file where the folder should be")
    with pytest.raises(CheckpointError, match=str(tmp_path / "checkpoints")):
        check_writable(str(tmp_path / "checkpoints"))
    ckpt = Checkpoints(str(tmp_path / "checkpoints"))
    with pytest.raises(
        CheckpointError, match="cannot write checkpoints in .*checkpoints: .*File exists"
    ):
        ckpt.save(1, _state(1.0))  # Refused before orbax starts (whose threads would wait).
    ckpt.close()


def test_checkpoints_compare_bits_so_nan_survives(tmp_path):
    ckpt = Checkpoints(str(tmp_path / "checkpoints"))
    state = {"w": jnp.array([jnp.nan, 1.0, -0.0]), "key": jax.random.key(0)}
    ckpt.save(1, state)
    _, restored, _ = ckpt.restore(state)
    assert np.isnan(restored["w"][0]) and np.signbit(restored["w"][2])
    ckpt.close()
    record = json.loads((tmp_path / "checkpoints" / "1" / "epoch.json").read_text())
    assert record == {"epoch": 1, "settings": None}


# --------------------------------------------------------------------------------------------------
# Flags.


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--lr", "-0.1"], "--lr must be a finite number > 0, got -0.1"),
        (["--lr", "nan"], "--lr must be a finite number > 0, got nan"),
        (["--lr", "inf"], "--lr must be a finite number > 0, got inf"),
        (["--gain", "inf"], "--gain must be a finite number > 0, got inf"),
        (["--momentum", "-0.5"], "--momentum must be a finite number >= 0 and < 1, got -0.5"),
        (["--momentum", "1"], "--momentum must be a finite number >= 0 and < 1, got 1.0"),
        (["--weight-decay=-1e-4"], "--weight-decay must be a finite number >= 0, got -0.0001"),
        (["--weight-decay", "nan"], "--weight-decay must be a finite number >= 0, got nan"),
        (["--warmup-epochs", "-1"], "--warmup-epochs must be a finite number >= 0 and <= 40"),
        (["--warmup-epochs", "inf"], "--warmup-epochs must be a finite number >= 0"),
        (["--max-steps-per-epoch", "-3"], "--max-steps-per-epoch must be an integer >= 0"),
        (["--seed", "-1"], "--seed must be an integer >= 0 and <= 4294967295, got -1"),
        (["--seed", str(2**40)], "--seed must be an integer >= 0 and <= 4294967295"),
        (["--epochs", "0"], "--epochs must be an integer >= 1, got 0"),
        (["--train-bs", "0"], "--train-bs must be an integer >= 1, got 0"),
        (["--width", "0"], "--width must be an integer >= 1, got 0"),
        (["--validation-split", "1"], "--validation-split must be a finite number >= 0 and < 1"),
        (["--skip-nonfinite", "-1"], "--skip-nonfinite must be an integer >= 0, got -1"),
        (["--num-workers", "-2"], "--num-workers must be an integer >= 0, got -2"),
        (
            ["--arch", "resnet18", "--depth", "34"],
            "--depth: arch 'resnet18' has a fixed depth (18)",
        ),
        (["--workdir", "w", "--resume", "--overwrite"], "--resume and --overwrite exclude"),
        (["--workdir", "w", "--resume", "--no-checkpoint"], "--resume needs checkpoints"),
    ],
)
def test_flags_are_checked_when_parsed(flags, message, capsys):
    from benchmarks import train

    with pytest.raises(SystemExit) as e:
        train.parse_args(flags)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_depth_of_a_fixed_depth_arch_is_none_or_its_own():
    from benchmarks import train

    assert train.parse_args(["--arch", "resnet18"]).depth is None
    assert train.parse_args(["--arch", "resnet18", "--depth", "18"]).depth == 18
    assert train.parse_args(["--arch", "fcn", "--depth", "5"]).depth == 5
    with pytest.raises(ValueError, match="--depth: arch 'resnet50' has a fixed depth"):
        Config(arch="resnet50", depth=3).validate()


# --------------------------------------------------------------------------------------------------
# No spoofing: what a checkpoint is, and what it was made with.


def test_a_symlink_in_place_of_an_epoch_folder_is_never_a_checkpoint(tmp_path, capsys):
    ckpt = Checkpoints(str(tmp_path / "checkpoints"), keep=2)
    ckpt.save(2, _state(2.0))
    os.symlink("2", ckpt.path(3))  # checkpoints/3 -> 2: epoch 2's weights posing as epoch 3.
    assert ckpt.steps() == [2] and ckpt.damage(3) is not None
    epoch, state, _ = ckpt.restore(_state(0.0))
    assert epoch == 2
    np.testing.assert_array_equal(state["w"], _state(2.0)["w"])
    assert "checkpoints/3 is a symbolic link" in capsys.readouterr().err
    assert not os.path.lexists(ckpt.path(3)) and ckpt.damage(2) is None  # Only the link went.
    ckpt.save(3, _state(3.0))
    ckpt.save(4, _state(4.0))  # Rotation deletes real folders only.
    assert ckpt.steps() == [3, 4] and not os.path.islink(ckpt.path(3))
    ckpt.close()


@pytest.mark.parametrize("how", ["unlisted", "stray", "link", "unlisted_link"])
def test_sums_must_list_exactly_the_files_of_the_checkpoint(tmp_path, capsys, how):
    ckpt = Checkpoints(str(tmp_path / "checkpoints"), keep=2)
    ckpt.save(1, _state(1.0))
    ckpt.save(2, _state(2.0))
    path = ckpt.path(2)
    sums = os.path.join(path, SUMS_FILE)
    data = os.path.relpath(_data_file(path), path)
    if how == "unlisted":  # Damaged, and taken out of SHA256SUMS to hide it.
        _damage(path, "flip")
        lines = open(sums).read().splitlines(keepends=True)
        open(sums, "w").writelines(line for line in lines if not line.endswith(f"  {data}\n"))
    elif how == "stray":
        open(os.path.join(path, "extra.bin"), "wb").write(b"\0" * 16)
    elif how == "link":  # A listed file replaced by a link to a file with the same bytes.
        os.replace(os.path.join(path, data), tmp_path / "elsewhere")
        os.symlink(tmp_path / "elsewhere", os.path.join(path, data))
    else:
        os.symlink(ckpt.path(1), os.path.join(path, "more"))
    problem = ckpt.damage(2)
    assert problem is not None and ("not listed" in problem or "symbolic link" in problem)
    epoch, state, _ = ckpt.restore(_state(0.0))
    assert epoch == 1  # The newest intact one.
    np.testing.assert_array_equal(state["w"], _state(1.0)["w"])
    assert f"checkpoint {path} is damaged" in capsys.readouterr().err
    ckpt.close()


def test_a_checkpoint_made_with_other_settings_is_refused(tmp_path):
    made = Config(seed=0).settings_digest()
    ckpt = Checkpoints(str(tmp_path / "checkpoints"), settings=made)
    ckpt.save(1, _state(1.0))
    ckpt.close()
    assert Config(seed=0, workdir="elsewhere", test_bs=7).settings_digest() == made  # Inert.
    assert Config(epochs=3).settings_digest(False) == Config(epochs=9).settings_digest(False)
    assert Config(epochs=3).settings_digest(True) != Config(epochs=9).settings_digest(True)
    edited = Checkpoints(str(tmp_path / "checkpoints"), settings=Config(seed=1).settings_digest())
    with pytest.raises(CheckpointError, match=r"checkpoints/1 was made with other settings"):
        edited.restore(_state(0.0))
    edited.close()
    same = Checkpoints(str(tmp_path / "checkpoints"), settings=made)
    assert same.restore(_state(0.0))[0] == 1
    same.close()


def test_the_lock_is_never_written_through_a_symlink(tmp_path):
    target = tmp_path / "precious.txt"
    target.write_text("keep me\n")
    os.symlink(target, tmp_path / ".lock")
    with pytest.raises(RunFolderError, match=r"\.lock is a symbolic link .*refuses"):
        RunLock(str(tmp_path))
    assert target.read_text() == "keep me\n"


def test_a_symlinked_checkpoints_folder_is_followed_and_kept(tmp_path):
    disk = tmp_path / "bigger_disk"
    disk.mkdir()
    workdir = tmp_path / "run"
    workdir.mkdir()
    os.symlink(disk, workdir / "checkpoints")
    ckpt = Checkpoints(str(workdir / "checkpoints"))
    ckpt.save(1, _state(1.0))
    assert ckpt.restore(_state(0.0))[0] == 1 and os.listdir(disk) == ["1"]
    ckpt.close()
    run_folder.save_config(str(workdir), Config(workdir=str(workdir)))
    run_folder.clear_run(str(workdir))  # A new run (--overwrite) clears the folder, keeps the link.
    assert os.path.islink(workdir / "checkpoints") and os.listdir(disk) == []
    assert os.listdir(workdir) == ["checkpoints"]


def test_resume_refuses_fewer_epochs_than_it_has_trained(tmp_path):
    workdir = _saved_run(tmp_path, epochs=4)
    os.makedirs(os.path.join(workdir, "checkpoints", "4"))
    open(os.path.join(workdir, "checkpoints", "4", SUMS_FILE), "w").close()
    with pytest.raises(
        RunFolderError, match=r"with --epochs 2: it has trained 4 epochs already .*--epochs 4"
    ):
        _check(workdir, Config(workdir=workdir, resume=True, epochs=2))
    _check(workdir, Config(workdir=workdir, resume=True, epochs=4))
    _check(workdir, Config(workdir=workdir, resume=True, epochs=6))  # AGD: a run can be extended.


@pytest.mark.parametrize("name", ["metrics.jsonl", "summary.json", "config.json"])
def test_a_failed_write_of_a_run_file_names_the_file(tmp_path, monkeypatch, name):
    def too_large(*args, **kwargs):
        raise OSError(27, "File too large")

    monkeypatch.setattr(os, "fsync", too_large)
    write = {
        "metrics.jsonl": lambda: run_folder.write_metrics(str(tmp_path), [{"epoch": 1}]),
        "summary.json": lambda: run_folder.write_summary(str(tmp_path), {"test_loss": 1.0}),
        "config.json": lambda: run_folder.save_config(str(tmp_path), Config()),
    }[name]
    with pytest.raises(RunFolderError, match=rf"could not write {tmp_path / name}: .*too large"):
        write()
    assert os.listdir(tmp_path) == []
