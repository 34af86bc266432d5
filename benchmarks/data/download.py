"""Checksum-verified file downloads (used only with ``download=True``)."""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import urllib.request
from pathlib import Path


def _fetch_url(url: str, dest: Path) -> None:
    """Stream ``url`` into the file ``dest`` (tests replace this function)."""
    with urllib.request.urlopen(url, timeout=60) as response, open(dest, "wb") as f:
        shutil.copyfileobj(response, f, length=1 << 20)


def file_digest(path: Path, algorithm: str) -> str:
    """Hex digest of a file's contents."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download_file(
    url: str,
    dest: str | os.PathLike,
    *,
    md5: str | None = None,
    sha256: str | None = None,
) -> Path:
    """Download ``url`` to ``dest`` and verify its checksum.

    The data goes to ``dest + '.part'`` first and is renamed only once the checksum
    matches; on any failure (including a mismatch, which raises ValueError) no file is
    left behind.
    """
    if md5 is None and sha256 is None:
        raise ValueError("download_file needs an md5 or sha256 checksum")
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    print(f"downloading {url} -> {dest}", file=sys.stderr)
    try:
        _fetch_url(url, tmp)
        for algorithm, expected in (("md5", md5), ("sha256", sha256)):
            if expected is None:
                continue
            actual = file_digest(tmp, algorithm)
            if actual != expected.lower():
                raise ValueError(
                    f"{algorithm} checksum mismatch for {url}: expected {expected}, got {actual}; "
                    f"the download was discarded ({dest} not written)"
                )
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest
