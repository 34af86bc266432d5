"""Every public function and class of agd_optax documents itself with a runnable example."""

import inspect

import pytest

import agd_optax


@pytest.mark.parametrize("name", agd_optax.__all__)
def test_public_name_has_a_docstring_with_an_example(name):
    doc = inspect.getdoc(getattr(agd_optax, name)) or ""
    assert doc.strip(), f"agd_optax.{name} has no docstring"
    assert ">>>" in doc, f"agd_optax.{name}'s docstring has no example (run as a doctest)"
