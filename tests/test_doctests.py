"""Every `>>>` example in loki's docstrings runs, and prints what it says (the docstrings are the API docs)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import loki

MODULES = sorted(m.name for m in pkgutil.walk_packages(loki.__path__, "loki."))  # subpackages' modules too


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(
        module,
        optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
        verbose=False,
        report=True,
        extraglobs={"loki": loki},
    )
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} failed (output above)"
