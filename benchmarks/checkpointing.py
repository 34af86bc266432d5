"""Verified checkpoints of a run's state (parameters, optimizer state, BatchNorm statistics).

``<workdir>/checkpoints/<epoch>/`` holds orbax's files for one epoch, ``epoch.json`` (that
epoch's training metrics and a digest of the settings that made it) and ``SHA256SUMS``
(``sha256sum -c`` reads it): a checksum of every other file, written last, once the checkpoint has
been read back and found bit-identical to the state in memory. A checkpoint without it never
finished saving. A checkpoint is intact only when it is a folder of its own (not a symbolic link)
and its ``SHA256SUMS`` lists exactly the files it holds, each with its checksum: a missing,
unlisted, changed or linked file makes it damaged. ``checkpoints/`` itself may be a symbolic link
(to a bigger disk, say): it is followed.

- ``save`` writes, verifies and only then rotates away older checkpoints (``keep`` are kept), so
  a damaged or unfinished save never costs the last good one. Any failure (a read-only folder, a
  full disk) raises ``CheckpointError`` with the path and the operating system's error.
- ``restore`` takes the newest checkpoint whose checksums hold and that orbax can read, and
  reports each newer one it had to pass over (and deletes it: its epoch is trained again). With
  no intact checkpoint at all it says so and the run starts at epoch 1: a kill at any moment of
  a save leaves a folder that ``--resume`` continues. A checkpoint made with other settings than
  the run's (``settings``) is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from typing import Any

import jax
import jax.numpy as jnp

from benchmarks.run_folder import write_atomic

SUMS_FILE = "SHA256SUMS"
RECORD_FILE = "epoch.json"


class CheckpointError(RuntimeError):
    """A checkpoint could not be written, or no intact checkpoint could be read."""


def check_writable(directory: str) -> None:
    """Fails now, not after an epoch of training, when ``directory`` cannot take checkpoints."""
    probe = os.path.join(directory, f".write-test-{os.getpid()}")
    try:
        os.makedirs(directory, exist_ok=True)
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise CheckpointError(
            f"cannot write checkpoints in {os.path.abspath(directory)}: {e}"
        ) from e


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(directory: str) -> tuple[list[str], list[str]]:
    """Every file under ``directory`` but SHA256SUMS, as sorted relative paths; and the symbolic
    links among them (folders included, which are not followed)."""
    found, links = [], []
    for root, folders, names in os.walk(directory):
        for name in folders + names:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, directory)
            if os.path.islink(path):
                links.append(rel)
            elif name in names and rel != SUMS_FILE:
                found.append(rel)
    return sorted(found), sorted(links)


def _bits(x: jax.Array) -> jax.Array:
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if jnp.issubdtype(x.dtype, jnp.floating):
        x = jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * x.dtype.itemsize}"))
    return x


@jax.jit
def _bitwise_equal(a: dict[str, jax.Array], b: dict[str, jax.Array]) -> jax.Array:
    """Whether two trees hold the same bits (NaNs included)."""
    same = [jnp.array_equal(_bits(a[k]), _bits(b[k])) for k in a]
    return jnp.all(jnp.stack(same)) if same else jnp.array(True)


def _as_leaves(state: Any) -> dict[str, Any]:
    return {str(i): leaf for i, leaf in enumerate(jax.tree.leaves(state))}


def _abstract(state: Any) -> dict[str, jax.ShapeDtypeStruct]:
    return {
        k: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        for k, x in _as_leaves(state).items()
    }


class Checkpoints:
    """The checkpoints folder of one run. Every process calls ``save`` and ``restore``; only
    ``is_main`` (process 0) writes checksums, reports and deletes."""

    def __init__(
        self, directory: str, is_main: bool = True, keep: int = 2, settings: str | None = None
    ):
        import orbax.checkpoint as ocp

        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.directory = os.path.abspath(directory)
        self.is_main = is_main
        self.keep = keep
        self.settings = settings  # A digest of the run's settings, recorded in every checkpoint.
        self._checkpointer = ocp.StandardCheckpointer()

    def close(self) -> None:
        self._checkpointer.close()

    def path(self, epoch: int) -> str:
        return os.path.join(self.directory, str(epoch))

    def steps(self) -> list[int]:
        """The epochs with a checkpoint folder, intact or not, in increasing order. Only real
        folders count: a symbolic link in place of one is never a checkpoint (``links``)."""
        if not os.path.isdir(self.directory):
            return []
        return sorted(
            int(name)
            for name in os.listdir(self.directory)
            if name.isdigit() and _real_folder(os.path.join(self.directory, name))
        )

    def links(self) -> list[str]:
        """Epoch names in ``checkpoints/`` that are symbolic links, not folders of their own."""
        if not os.path.isdir(self.directory):
            return []
        return sorted(
            name
            for name in os.listdir(self.directory)
            if name.isdigit() and os.path.islink(os.path.join(self.directory, name))
        )

    # ----------------------------------------------------------------------------------------
    # Verification.

    def write_sums(self, epoch: int) -> None:
        path = self.path(epoch)
        files, links = _files(path)
        if links:
            raise CheckpointError(f"{path} holds symbolic links: {', '.join(links)}")
        lines = [f"{_sha256(os.path.join(path, rel))}  {rel}\n" for rel in files]
        write_atomic(os.path.join(path, SUMS_FILE), "".join(lines))

    def _has_sums(self, epoch: int) -> bool:
        return os.path.exists(os.path.join(self.path(epoch), SUMS_FILE))

    def damage(self, epoch: int) -> str | None:
        """None when the checkpoint of ``epoch`` is intact, else what is wrong with it."""
        path = self.path(epoch)
        if not _real_folder(path):
            return "not a folder of its own (a symbolic link or a file)"
        sums = os.path.join(path, SUMS_FILE)
        if not os.path.exists(sums):
            return f"no {SUMS_FILE}: its save never finished"
        try:
            if os.path.islink(sums):
                return f"{SUMS_FILE} is a symbolic link"
            with open(sums) as f:
                entries = [line.rstrip("\n").split("  ", 1) for line in f if line.strip()]
            if not entries or any(len(e) != 2 for e in entries):
                return f"{SUMS_FILE} is malformed"
            listed = {rel: digest for digest, rel in entries}
            files, links = _files(path)
            if links:
                return f"it holds symbolic links ({', '.join(links)})"
            unlisted = sorted(set(files) - set(listed))
            if unlisted:
                return f"{', '.join(unlisted)} not listed in {SUMS_FILE}"
            for rel, digest in listed.items():
                if rel not in files:
                    return f"{rel} is missing"
                if _sha256(os.path.join(path, rel)) != digest:
                    return f"{rel} does not match its checksum"
        except (OSError, ValueError) as e:
            return f"unreadable: {e}"
        return None

    # ----------------------------------------------------------------------------------------
    # Save and restore.

    def save(self, epoch: int, state: Any, record: dict[str, Any] | None = None) -> None:
        """Writes the checkpoint of ``epoch``, reads it back, checks it bit for bit, writes its
        checksums, then deletes all but the newest ``keep`` intact checkpoints."""
        path = self.path(epoch)
        leaves = _as_leaves(state)
        if self.is_main:  # A folder orbax cannot write to would leave its threads waiting.
            check_writable(self.directory)
        try:
            if self.is_main:
                _remove(path)  # An unfinished save of this epoch by an earlier process.
            self._write(path, leaves)
            self._read_back(path, leaves, state)
            if self.is_main:
                record = {"epoch": epoch, "settings": self.settings} | (record or {})
                write_atomic(os.path.join(path, RECORD_FILE), json.dumps(record) + "\n")
                self.write_sums(epoch)
        except Exception as e:
            raise CheckpointError(
                f"could not save the checkpoint of epoch {epoch} in {path}: {e}"
            ) from e
        if self.is_main:
            self._rotate(epoch)

    # The phases of a save, one method each (a kill can fall in any of them).

    def _write(self, path: str, leaves: dict[str, Any]) -> None:
        self._checkpointer.save(path, leaves)
        self._checkpointer.wait_until_finished()

    def _read_back(self, path: str, leaves: dict[str, Any], state: Any) -> None:
        restored = self._checkpointer.restore(path, _abstract(state))
        same = bool(_bitwise_equal(leaves, restored))
        del restored
        if not same:
            raise CheckpointError("it reads back other values than those saved")

    def _rotate(self, newest: int) -> None:
        # Intact: verified when saved (checked again, in full, when restored).
        intact = [s for s in self.steps() if s <= newest and self._has_sums(s)]
        kept = set(intact[-self.keep :])
        for step in self.steps():
            if step < newest and step not in kept:
                _remove(self.path(step))
        for name in os.listdir(self.directory):  # Orbax's temporary folders of killed saves.
            if ".orbax-checkpoint-tmp" in name:
                shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)

    def restore(self, state: Any) -> tuple[int, Any, dict[str, Any]] | None:
        """``(epoch, state, record)`` of the newest intact checkpoint, with ``state``'s
        shardings; None when there is no intact checkpoint (each one passed over is reported
        and deleted). Raises ``CheckpointError`` when the newest intact checkpoint was made with
        other settings than ``self.settings``."""
        for name in self.links():
            link = os.path.join(self.directory, name)
            if self.is_main:
                print(
                    f"warning: {link} is a symbolic link, not a checkpoint folder of its own: "
                    "ignored and removed (the folder it points to stays)",
                    file=sys.stderr,
                    flush=True,
                )
                os.remove(link)
        steps = self.steps()
        for epoch in reversed(steps):
            problem = self.damage(epoch)
            if problem is None:
                try:
                    with open(os.path.join(self.path(epoch), RECORD_FILE)) as f:
                        record = json.load(f)
                    self._check_settings(epoch, record)
                    restored = self._checkpointer.restore(self.path(epoch), _abstract(state))
                except CheckpointError:
                    raise
                except Exception as e:
                    problem = f"it cannot be read: {e}"
            if problem is not None:
                if self.is_main:
                    print(
                        f"warning: checkpoint {self.path(epoch)} is damaged or unfinished "
                        f"({problem}); trying the one before it",
                        file=sys.stderr,
                        flush=True,
                    )
                continue
            if self.is_main:
                for other in steps:  # Later ones, and earlier ones a kill left half-deleted.
                    if other > epoch or not self._has_sums(other):
                        _remove(self.path(other))
            leaves, treedef = jax.tree.flatten(state)
            values = [restored[str(i)] for i in range(len(leaves))]
            return epoch, jax.tree.unflatten(treedef, values), record
        if steps and self.is_main:
            for epoch in steps:  # None is intact: the run starts over, from epoch 1.
                _remove(self.path(epoch))
        return None

    def _check_settings(self, epoch: int, record: dict[str, Any]) -> None:
        if self.settings is None or record.get("settings") == self.settings:
            return
        raise CheckpointError(
            f"the checkpoint {self.path(epoch)} was made with other settings than this run's "
            f"(settings digest {record.get('settings')} in its {RECORD_FILE}, {self.settings} "
            "now): config.json or the flags were changed after it was saved. Resume with the "
            "flags that made it, or start over with --overwrite."
        )


def _real_folder(path: str) -> bool:
    return os.path.isdir(path) and not os.path.islink(path)


def _remove(path: str) -> None:
    """Deletes a checkpoint folder (a link or a file in its place: only that). Its SHA256SUMS
    goes first, so a kill half-way leaves a checkpoint that reads as unfinished."""
    if os.path.islink(path) or os.path.isfile(path):
        os.remove(path)
    elif os.path.isdir(path):
        sums = os.path.join(path, SUMS_FILE)
        if os.path.lexists(sums):
            os.remove(sums)
        shutil.rmtree(path, ignore_errors=True)
