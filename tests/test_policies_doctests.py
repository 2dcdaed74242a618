"""The examples in the policies' docstrings run, with their exact output."""

import doctest
import importlib
import pkgutil

import pytest

import policies

MODULES = sorted(m.name for m in pkgutil.iter_modules(policies.__path__, "policies."))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
