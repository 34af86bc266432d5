"""Executes the notebooks in place and stamps each with the hash of the code it ran.

    uv run python notebooks/execute.py              # every notebook in this folder
    uv run python notebooks/execute.py quickstart   # the ones whose name contains "quickstart"

The test suite (tests/test_notebooks.py) runs every notebook again and fails when a committed
notebook's code differs from the code its outputs came from.
"""

from __future__ import annotations

import hashlib
import pathlib
import sys
import time

import nbformat
from nbclient import NotebookClient

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
TIMEOUT_S = 600


def code_hash(nb: nbformat.NotebookNode) -> str:
    """sha256 of the notebook's code cells, in order: what its outputs depend on."""
    digest = hashlib.sha256()
    for cell in nb.cells:
        if cell.cell_type == "code":
            digest.update(cell.source.encode())
            digest.update(b"\0")
    return digest.hexdigest()


def notebooks(patterns: list[str]) -> list[pathlib.Path]:
    found = sorted(HERE.glob("*.ipynb"))
    if patterns:
        found = [p for p in found if any(pat in p.stem for pat in patterns)]
    return found


def execute(nb: nbformat.NotebookNode, timeout: int = TIMEOUT_S) -> nbformat.NotebookNode:
    """Runs every cell from the top in a fresh kernel started in the repository root."""
    NotebookClient(
        nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
    ).execute()
    return nb


def main(argv: list[str]) -> int:
    paths = notebooks(argv)
    if not paths:
        print(f"no notebook in {HERE} matches {argv}", file=sys.stderr)
        return 2
    for path in paths:
        start = time.perf_counter()
        nb = nbformat.read(path, as_version=4)
        execute(nb)
        nb.metadata["agd_optax"] = {"code_sha256": code_hash(nb)}
        nbformat.write(nb, path)
        print(f"{path.name}: executed in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
