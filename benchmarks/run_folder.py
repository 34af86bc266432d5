"""A run's folder: what it holds, what it guarantees, and reading and writing its files.

``<workdir>/config.json`` (the ``Config``), ``metrics.jsonl`` (one JSON line per epoch),
``summary.json`` (the final metrics), ``curves.png`` (``reporting.plot_curves``),
``samples.txt`` (language models), ``checkpoints/`` (``checkpointing``) and ``.lock``. Only
process 0 writes files.

The contract (``open_run``): one run per folder at a time (an OS lock on ``.lock``, released
when the process ends, however it ends); a new run refuses a folder that holds another run's
files unless told to overwrite them; ``--resume`` refuses flags that change the computation
from the saved config.json, and ``--epochs`` below the epochs it has trained. Every file a user
reads is replaced atomically (written to a temporary file, then renamed), so a kill never leaves
a cut or empty file; a file that cannot be written is a ``RunFolderError`` naming it. The lock is
never taken through a symbolic link; a ``checkpoints/`` that is one is followed, and a new run
clears the folder it points to rather than deleting the link.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import shutil
import socket
import stat
from typing import Any

from benchmarks.config import INERT_FIELDS, Config, flag_name

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
PLOT_FILE = "curves.png"
CHECKPOINT_DIR = "checkpoints"
SAMPLES_FILE = "samples.txt"  # Language models: text generated after training.
LOCK_FILE = ".lock"
RUN_FILES = (CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, PLOT_FILE, SAMPLES_FILE, CHECKPOINT_DIR)

# Settings that do not change what is computed may differ when a run is resumed
# (``config.INERT_FIELDS``); every other field of Config must match the saved config.json.
MAY_CHANGE_ON_RESUME = INERT_FIELDS


class RunFolderError(RuntimeError):
    """The run folder cannot be used as asked: in use, holding another run, or a mismatch."""


def default_workdir(config: Config) -> str:
    return os.path.join(
        "runs", f"{config.dataset}_{config.arch}_{config.optimizer}_seed{config.seed}"
    )


# --------------------------------------------------------------------------------------------------
# Atomic files.


def write_atomic(path: str, text: str) -> None:
    """Replaces ``path`` with ``text`` in one step: readers see the old file or the new one."""
    directory, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(directory, f".{name}.tmp{os.getpid()}")
    if os.path.islink(tmp):
        os.remove(tmp)  # Never written through: a link there is a left-over or a trap.
    try:
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
        with open(os.open(tmp, flags, 0o644), "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.remove(tmp)
        raise


def write_run_file(path: str, text: str) -> None:
    """``write_atomic`` for a run's own files: a failure (a full disk, a file-size limit) is a
    ``RunFolderError`` naming the file."""
    try:
        write_atomic(path, text)
    except OSError as e:
        raise RunFolderError(f"could not write {os.path.abspath(path)}: {e}") from e


def save_config(workdir: str, config: Config) -> None:
    write_run_file(os.path.join(workdir, CONFIG_FILE), config.to_json() + "\n")


def read_config(workdir: str) -> dict[str, Any] | None:
    """The saved config.json as a dict, None when there is none."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            values = json.load(f)
    except (OSError, ValueError) as e:
        raise RunFolderError(f"cannot read {path}: {e}") from e
    if not isinstance(values, dict):
        raise RunFolderError(f"{path} does not hold a config (a JSON object)")
    return values


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except ValueError as e:
                raise RunFolderError(f"{path}, line {number}, is not JSON: {e}") from e
    return rows


def write_metrics(workdir: str, rows: list[dict[str, Any]]) -> None:
    text = "".join(json.dumps(row) + "\n" for row in rows)
    write_run_file(os.path.join(workdir, METRICS_FILE), text)


def write_summary(workdir: str, summary: dict[str, Any]) -> None:
    write_run_file(os.path.join(workdir, SUMMARY_FILE), json.dumps(summary, indent=2) + "\n")


def read_summary(workdir: str) -> dict[str, Any] | None:
    path = os.path.join(workdir, SUMMARY_FILE)
    try:
        with open(path) as f:
            summary = json.load(f)
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) else None


def finished_epochs(workdir: str) -> int:
    """The newest epoch with a finished checkpoint (0 when none): what --resume starts after."""
    directory = os.path.join(workdir, CHECKPOINT_DIR)
    if not os.path.isdir(directory):
        return 0
    return max(
        (
            int(name)
            for name in os.listdir(directory)
            if name.isdigit()
            and not os.path.islink(os.path.join(directory, name))
            and os.path.isfile(os.path.join(directory, name, "SHA256SUMS"))
        ),
        default=0,
    )


# --------------------------------------------------------------------------------------------------
# One run per folder.


class RunLock:
    """An exclusive ``flock`` on ``<workdir>/.lock``, held while the run lives.

    The operating system releases it when the process exits, including on ``kill -9``, so a
    killed run never leaves the folder locked. The file says who holds it.
    """

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, LOCK_FILE)
        try:  # Never through a symbolic link: the pid line would land in the file it names.
            self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            if os.path.islink(self.path):
                raise RunFolderError(
                    f"{self.path} is a symbolic link (to {os.readlink(self.path)}): the run "
                    "refuses to write its lock through it. Remove the link and start again."
                ) from None
            raise RunFolderError(f"cannot open the lock file {self.path}: {e}") from e
        if not stat.S_ISREG(os.fstat(self._fd).st_mode):
            os.close(self._fd)
            self._fd = None
            raise RunFolderError(f"{self.path} is not a regular file: remove it and start again")
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(self._fd, 512, 0).decode(errors="replace").strip()
            os.close(self._fd)
            self._fd = None
            raise RunFolderError(
                f"{workdir} is in use by another run ({holder or 'holder unknown'}): one run per "
                "folder at a time. Wait for it to end, or choose another --workdir."
            ) from None
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        os.ftruncate(self._fd, 0)
        os.pwrite(
            self._fd, f"pid {os.getpid()} on {socket.gethostname()}, since {now}\n".encode(), 0
        )

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # Closing the only descriptor releases the lock.
            self._fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


# --------------------------------------------------------------------------------------------------
# The contract.


def run_files(workdir: str) -> list[str]:
    """The files of a run that ``workdir`` holds (an empty checkpoints folder does not count)."""
    found = []
    for name in RUN_FILES:
        path = os.path.join(workdir, name)
        if os.path.isdir(path):
            if os.listdir(path):
                found.append(name + "/")
        elif os.path.exists(path):
            found.append(name)
    return found


def changed_flags(
    saved: dict[str, Any], config: Config, epochs_matter: bool
) -> list[tuple[str, Any, Any]]:
    """``(flag, saved value, new value)`` for each setting that changes the computation;
    ``epochs_matter``: whether the number of epochs enters it (a schedule over the whole run)."""
    new = json.loads(config.to_json())
    defaults = json.loads(Config().to_json())
    changes = []
    for name in sorted(set(new) | set(saved)):
        if name in MAY_CHANGE_ON_RESUME or (name == "epochs" and not epochs_matter):
            continue
        old_value = saved.get(name, defaults.get(name))
        if name == "optimizer_options" and isinstance(old_value, dict) and name in new:
            for key in sorted(set(old_value) | set(new[name])):  # One flag per option.
                if old_value.get(key) != new[name].get(key):
                    changes.append((flag_name(key), old_value.get(key), new[name].get(key)))
        elif name not in new:
            changes.append((flag_name(name), old_value, "(not a setting any more)"))
        elif old_value != new[name]:
            changes.append((flag_name(name), old_value, new[name]))
    return changes


def check_run_folder(workdir: str, config: Config, epochs_matter: bool) -> None:
    """Raises ``RunFolderError`` unless ``config`` may run in ``workdir`` as asked."""
    found = run_files(workdir)
    if config.resume:
        saved = read_config(workdir)
        if saved is None:
            if found:
                raise RunFolderError(
                    f"cannot resume in {workdir}: it holds {', '.join(found)} but no "
                    f"{CONFIG_FILE}, so the flags of that run cannot be checked. Start a new run "
                    "with --overwrite (deletes them) or in another --workdir."
                )
            return  # Nothing to resume: the run starts at epoch 1.
        changes = changed_flags(saved, config, epochs_matter)
        if changes:
            width = max(len(flag) for flag, _, _ in changes)
            lines = "\n".join(
                f"  {flag:<{width}}  {json.dumps(old)} -> {json.dumps(new)}"
                for flag, old, new in changes
            )
            raise RunFolderError(
                f"cannot resume the run in {workdir}: these settings differ from its "
                f"{CONFIG_FILE} (saved -> now):\n{lines}\n"
                "Resuming would continue its weights under other settings. To run with these "
                "flags as a new run, choose another --workdir, or pass --overwrite instead of "
                "--resume to delete that run and start over."
            )
        done = finished_epochs(workdir)
        if config.epochs < done:
            raise RunFolderError(
                f"cannot resume the run in {workdir} with --epochs {config.epochs}: it has "
                f"trained {done} epochs already ({CHECKPOINT_DIR}/{done}). Give --epochs {done} "
                "or more, or start over with --overwrite."
            )
    elif found and not config.overwrite:
        raise RunFolderError(
            f"{workdir} holds another run ({', '.join(found)}). Pass --resume to continue it, "
            "--overwrite to delete it and start over, or choose another --workdir."
        )


def clear_run(workdir: str) -> None:
    """Deletes the run files of ``workdir`` (``--overwrite``); other files stay. A
    ``checkpoints/`` that is a symbolic link to a folder (on a bigger disk, say) stays a link:
    the contents of the folder it points to are deleted instead."""
    for name in RUN_FILES:
        path = os.path.join(workdir, name)
        if name == CHECKPOINT_DIR and os.path.islink(path) and os.path.isdir(path):
            for entry in os.listdir(path):
                inner = os.path.join(path, entry)
                if os.path.isdir(inner) and not os.path.islink(inner):
                    shutil.rmtree(inner)
                else:
                    os.remove(inner)
        elif os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)


def open_run(workdir: str, config: Config, epochs_matter: bool) -> RunLock:
    """Creates ``workdir``, locks it for this run and checks the contract (process 0 only).

    Returns the lock; the caller releases it when the run ends. Nothing is written yet:
    config.json follows once the data and the model are built (``start_run``).
    """
    os.makedirs(workdir, exist_ok=True)
    lock = RunLock(workdir)
    try:
        check_run_folder(workdir, config, epochs_matter)
    except BaseException:
        lock.release()
        raise
    return lock


def start_run(workdir: str, config: Config) -> None:
    """Writes config.json; a new run first deletes the files of the run it replaces."""
    if not config.resume:
        clear_run(workdir)
    save_config(workdir, config)
