"""Sphinx configuration of the agd_optax documentation.

Build with ``uv run --group docs sphinx-build -W -b html docs docs/_build/html``. The build needs no
network: there is no intersphinx, and the notebooks are rendered from their stored outputs, never
executed.
"""

import os
import pathlib
import re
import shutil
import subprocess
import sys

DOCS = pathlib.Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))

import agd_optax  # noqa: E402

# Pages kept beside the code they describe are rendered from there, never copied by hand: the
# build writes them into docs/ (git-ignored) with their links mapped to the pages they point at.
# Every page, these and the ones written in docs/, links to a repository path (``../notebooks/
# roles.ipynb``, so that the link also works on a code host); LINKED maps a path outside docs/ to
# the page that renders it.
GENERATED = {"notebooks": ROOT / "notebooks", "benchmarks": ROOT / "benchmarks"}
PLOTS = ("{}.png", "{}_curves.png", "{}_compute.png", "{}_step_sizes.png")
LINKED = {
    ROOT / "benchmarks" / "README.md": DOCS / "benchmarks" / "index.md",
    ROOT / "benchmarks" / "results": DOCS / "benchmarks" / "results",
    ROOT / "notebooks": DOCS / "notebooks",
}
_LINK = re.compile(r"(\]\()([^)\s#]+)([^)]*\))")


def _linked(path: pathlib.Path) -> pathlib.Path:
    for source, page in LINKED.items():
        if path == source or source in path.parents:
            return page / path.relative_to(source) if path != source else page
    return path


def map_links(text: str, source: pathlib.Path, page: pathlib.Path) -> str:
    """Rewrites the relative links of ``source``'s text for its rendering at ``page``."""

    def replace(match: re.Match) -> str:
        target = match.group(2)
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, project:
            return match.group(0)
        path = pathlib.Path(os.path.normpath(source.parent / target))
        if not path.exists():  # Not a link to a file (or a broken one, which the build reports).
            return match.group(0)
        resolved = _linked(path)
        return match.group(1) + os.path.relpath(resolved, page.parent) + match.group(3)

    return _LINK.sub(replace, text)


def generate_pages() -> None:
    for name in GENERATED:
        shutil.rmtree(DOCS / name, ignore_errors=True)
    notebooks = DOCS / "notebooks"
    notebooks.mkdir()
    for notebook in sorted((ROOT / "notebooks").glob("*.ipynb")):
        page = notebooks / notebook.name
        page.write_text(map_links(notebook.read_text(), notebook, page))
    readme = ROOT / "benchmarks" / "README.md"
    (DOCS / "benchmarks" / "results").mkdir(parents=True)
    index = DOCS / "benchmarks" / "index.md"
    index.write_text(map_links(readme.read_text(), readme, index))
    for table in sorted((ROOT / "benchmarks" / "results").glob("*.md")):
        page = _linked(table)
        text = map_links(table.read_text(), table, page)
        plots = [table.with_name(p.format(table.stem)) for p in PLOTS]
        plots = [p for p in plots if p.exists()]
        if plots:
            text += "\n## Plots\n\n"
            for plot in plots:
                shutil.copy(plot, page.parent / plot.name)
                text += f"![{plot.stem}]({plot.name})\n\n"
        page.write_text(text)


def generate_help() -> None:
    """The training program's ``--help``, for the training guide's list of flags."""
    out = DOCS / "_generated"
    out.mkdir(exist_ok=True)
    env = {**os.environ, "COLUMNS": "100", "JAX_PLATFORMS": "cpu"}
    help_text = subprocess.run(
        [sys.executable, "-m", "benchmarks.train", "--help"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    (out / "train_help.txt").write_text(help_text)


def _map_page_links(app, docname: str, source: list[str]) -> None:
    page = pathlib.Path(app.env.doc2path(docname))
    if page.suffix == ".md" and not any(page.is_relative_to(DOCS / n) for n in GENERATED):
        source[0] = map_links(source[0], page, page)


def setup(app):
    generate_pages()
    generate_help()
    app.connect("source-read", _map_page_links)


project = "agd_optax"
author = "agd_optax developers"
copyright = "agd_optax developers"
release = agd_optax.__version__

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
]

exclude_patterns = ["_build", "_generated", "notebooks/execute.py", "**.ipynb_checkpoints"]
templates_path: list[str] = []

# Every reference to a name of agd_optax must resolve; names of other libraries are not linked
# (no intersphinx: the build makes no network request).
nitpicky = True
nitpick_ignore_regex = [
    (
        r"py:.*",
        r"(jax|jaxlib|optax|flax|numpy|np|chex|torch|typing|collections|dataclasses)(\..*)?",
    ),
    (r"py:.*", r"(Any|Callable|Sequence|Mapping|Iterable|NamedTuple|Array|ArrayLike|PyTree)"),
    (r"py:class", r"(int|float|str|bool|tuple|list|dict|None|object|type|Ellipsis)"),
]

# API reference: Google-style docstrings (Args, Returns, Raises, Example).
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
autodoc_type_aliases = {"optax.ScalarOrSchedule": "optax.ScalarOrSchedule"}
autosummary_generate = False
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

# Markdown pages and notebooks.
myst_enable_extensions = ["dollarmath", "colon_fence", "deflist"]
myst_heading_anchors = 3
nb_execution_mode = "off"  # Render the outputs stored in each notebook; never run them here.
nb_merge_streams = True

html_theme = "sphinx_book_theme"
html_title = "agd_optax"
html_theme_options = {
    "show_toc_level": 2,
    "navigation_with_keys": False,
}
html_static_path: list[str] = []
