"""Every public function and class of agd_optax documents itself with a runnable example, and the
API reference of the documentation site lists each one (the site's build itself runs in .ci/run)."""

import inspect
import pathlib
import re

import pytest

import agd_optax


@pytest.mark.parametrize("name", agd_optax.__all__)
def test_public_name_has_a_docstring_with_an_example(name):
    doc = inspect.getdoc(getattr(agd_optax, name)) or ""
    assert doc.strip(), f"agd_optax.{name} has no docstring"
    assert ">>>" in doc, f"agd_optax.{name}'s docstring has no example (run as a doctest)"


API_PAGES = pathlib.Path(__file__).parents[1] / "docs" / "api"


def test_the_api_reference_documents_every_public_name_once():
    documented = re.findall(
        r"^\.\. auto(?:function|class|exception):: (\w+)",
        "".join(p.read_text() for p in sorted(API_PAGES.glob("*.rst"))),
        re.M,
    )
    missing = sorted(set(agd_optax.__all__) - set(documented))
    assert not missing, f"not in any page of docs/api/: {missing}"
    unknown = sorted(set(documented) - set(agd_optax.__all__))
    assert not unknown, f"docs/api/ documents names outside agd_optax.__all__: {unknown}"
    twice = sorted({n for n in documented if documented.count(n) > 1})
    assert not twice, f"documented twice in docs/api/: {twice}"


def test_the_evidence_page_links_every_results_table():
    root = pathlib.Path(__file__).parents[1]
    text = (root / "docs" / "evidence.md").read_text()
    tables = sorted((root / "benchmarks" / "results").glob("*.md"))
    unlinked = [t.name for t in tables if f"](../benchmarks/results/{t.name})" not in text]
    assert not unlinked, f"docs/evidence.md does not link these results tables: {unlinked}"
