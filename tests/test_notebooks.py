"""Every committed notebook runs end to end and its outputs came from its current code."""

import importlib.util
import os
import pathlib

import nbformat
import pytest

NOTEBOOKS = pathlib.Path(__file__).parents[1] / "notebooks"
_spec = importlib.util.spec_from_file_location("notebook_execute", NOTEBOOKS / "execute.py")
execute = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(execute)

PATHS = sorted(NOTEBOOKS.glob("*.ipynb"))
MAX_OUTPUT_BYTES = 400_000


def _output_kinds(nb):
    """Per code cell, the kinds of output it shows (text, image, error)."""
    kinds = []
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        shown = set()
        for out in cell.get("outputs", []):
            if out.output_type == "error":
                shown.add("error")
            elif out.output_type == "stream":
                shown.add(f"stream:{out.name}" if out.name == "stdout" else "stderr")
            else:
                data = out.get("data", {})
                shown.add("image" if "image/png" in data else "text")
        shown.discard("stderr")  # Warnings may come and go with library versions.
        kinds.append(sorted(shown))
    return kinds


def test_there_are_notebooks():
    assert PATHS, f"no notebooks in {NOTEBOOKS}"


@pytest.mark.parametrize("path", PATHS, ids=[p.stem for p in PATHS])
def test_committed_outputs_are_current(path):
    nb = nbformat.read(path, as_version=4)
    stamp = nb.metadata.get("agd_optax", {}).get("code_sha256")
    assert stamp == execute.code_hash(nb), (
        f"{path.name}: its code changed since its outputs were made; "
        f"re-run `uv run python notebooks/execute.py {path.stem}` and commit it"
    )
    counts = [c.execution_count for c in nb.cells if c.cell_type == "code"]
    assert counts == list(range(1, len(counts) + 1)), (
        f"{path.name}: not executed top to bottom in one kernel"
    )
    assert all("error" not in k for k in _output_kinds(nb)), f"{path.name}: a cell shows an error"
    assert os.path.getsize(path) < MAX_OUTPUT_BYTES, f"{path.name}: outputs too large"


@pytest.mark.parametrize("path", PATHS, ids=[p.stem for p in PATHS])
def test_runs_end_to_end_and_shows_the_same_kinds_of_output(path, monkeypatch):
    # The kernel sees one CPU device, as a reader's would, not the suite's eight fake ones; it
    # keeps the suite's other XLA flags.
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
    monkeypatch.setenv("XLA_FLAGS", " ".join(flags))
    committed = nbformat.read(path, as_version=4)
    fresh = execute.execute(nbformat.read(path, as_version=4))
    assert _output_kinds(fresh) == _output_kinds(committed), (
        f"{path.name}: running it now shows different outputs (plots or printed results) "
        "from the committed ones"
    )
