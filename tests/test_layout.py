"""The tests' own layout: shared helpers in tests/helpers.py, fixtures in tests/conftest.py, and
no test module importing from another (or from conftest)."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def imported_test_modules(source: str) -> list[str]:
    """The modules of tests/ that ``source`` imports and that are not to be imported: test
    modules and conftest (tests/helpers.py is)."""
    found: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                module = node.module or ""
            elif node.level == 0 and (node.module or "").split(".")[0] == "tests":
                module = (node.module or "").partition(".")[2]
            else:
                continue
            # `from . import test_x` names the module in the import list
            found += [module.split(".")[0]] if module else [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            found += [a.name.split(".")[1] for a in node.names if a.name.startswith("tests.")]
    return [name for name in found if name.startswith("test_") or name == "conftest"]


def test_no_test_module_imports_from_another_test_module():
    offenders = {
        path.name: imported
        for path in sorted(TESTS.glob("test_*.py"))
        if (imported := imported_test_modules(path.read_text()))
    }
    assert offenders == {}, "move shared helpers to tests/helpers.py, fixtures to conftest.py"


def test_the_check_finds_each_form_of_import_and_allows_the_helpers():
    source = """
from .test_service import feed
from tests.test_daemon import wait_for
from . import test_live, helpers
from tests import test_http
import tests.test_hostile
import tests.test_wire as wire
from .conftest import start_redis_server
from .helpers import feed
from tests.helpers import wait_for
import tests.helpers
import numpy

def later():
    from .test_cli import main
"""
    assert sorted(imported_test_modules(source)) == [
        "conftest",
        "test_cli",
        "test_daemon",
        "test_hostile",
        "test_http",
        "test_live",
        "test_service",
        "test_wire",
    ]
