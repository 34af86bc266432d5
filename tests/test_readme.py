"""The README's quickstart runs as written and trains."""

import pathlib
import re

import optax

README = pathlib.Path(__file__).parents[1] / "README.md"


def test_quickstart_runs_and_trains(capsys):
    text = README.read_text()
    block = re.search(r"## Quickstart\s+```python\n(.*?)```", text, re.S).group(1)
    assert len(block.strip().splitlines()) <= 12
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    loss_fn, model = namespace["loss_fn"], namespace["model"]
    assert float(loss_fn(model)) < 0.2 * float(namespace["jnp"].mean(namespace["y"] ** 2))
    assert float(optax.tree.get(namespace["optimizer"].opt_state, "eta")) > 0
    assert capsys.readouterr().out.strip()


def test_readme_shows_the_two_commands():
    text = README.read_text()
    assert "uv run pytest" in text
    assert "uv run python -m benchmarks.train" in text


def test_readme_links_point_at_files_of_the_repository():
    text = README.read_text()
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    local = [t for t in targets if not re.match(r"^[a-z][a-z0-9+.-]*:", t)]
    assert any(t.startswith("docs/") for t in local), "the README links to no documentation page"
    broken = [t for t in local if not (README.parent / t).exists()]
    assert not broken, f"README.md links to missing files: {broken}"
