"""The suite itself: it names no adapter, and it calls every method of the store's protocols,
so a method added to a protocol without a behaviour test here fails."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

from tests.hub.store.conftest import Store

SUITE = Path(__file__).parent
TESTS = sorted(SUITE.glob("test_*.py"))


def test_it_names_no_adapter() -> None:
    for path in TESTS:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert "sqlite" not in (node.module or ""), f"{path.name} imports {node.module}"


def test_it_calls_every_method_of_the_store() -> None:
    methods = {name for name, _ in inspect.getmembers(Store, inspect.isfunction)
               if not name.startswith("_")} - {"close"}  # close: the adapter fixture's
    called = {node.attr for path in TESTS for node in ast.walk(ast.parse(path.read_text()))
              if isinstance(node, ast.Attribute)}
    called |= {node.attr for node in ast.walk(ast.parse((SUITE / "conftest.py").read_text()))
               if isinstance(node, ast.Attribute)}
    assert sorted(methods - called) == []
