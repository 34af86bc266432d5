"""The program's cache folder: generated datasets and JAX's persistent compilation cache.

``$AGD_OPTAX_CACHE`` when set, else ``$XDG_CACHE_HOME/agd_optax``, else ``~/.cache/agd_optax``.
Everything in it can be deleted at any time: it is made again when needed.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

ENV = "AGD_OPTAX_CACHE"


def cache_dir(*parts: str) -> Path:
    """The cache folder (or a folder inside it), created if missing."""
    root = os.environ.get(ENV)
    if not root:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(base, "agd_optax")
    path = Path(root, *parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def enable_compilation_cache() -> str:
    """Turns on JAX's persistent compilation cache in ``<cache>/jax`` for every compilation,
    however short (a program's fixed cost is many short ones). Takes effect when set before the
    process's first compilation. Returns the folder."""
    import jax

    path = str(cache_dir("jax"))
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cached_arrays(
    path: Path, make: Callable[[], dict[str, np.ndarray]], check: Callable[[dict], None]
) -> dict[str, np.ndarray]:
    """The arrays stored in ``path`` (an ``.npz`` with its SHA-256 beside it, ``<path>.sha256``),
    made by ``make`` and stored when missing, damaged (checksum or ``check`` fails) or
    unreadable. Writes are atomic, so concurrent processes each see a whole file."""
    sums = path.with_name(path.name + ".sha256")
    if path.exists() and sums.exists():
        try:
            if _sha256(path) == sums.read_text().strip():
                with np.load(path) as f:
                    arrays = {k: f[k] for k in f.files}
                check(arrays)
                return arrays
        except (OSError, ValueError):
            pass  # Damaged: made again below.
    arrays = make()
    check(arrays)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(path, lambda f: np.savez(f, **arrays))
    _write_atomic(sums, lambda f: f.write((_sha256(path) + "\n").encode()))
    return arrays


def _write_atomic(path: Path, write: Callable) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
