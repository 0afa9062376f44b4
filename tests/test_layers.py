"""The package's layers, read from its source: each name is imported from the module that
defines it, private names stay in their module, and raw-SQL helpers need no model layer."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import tenantdb
from tenantdb import context

PACKAGE = Path(tenantdb.__file__).parent
MODULES = sorted(path.stem for path in PACKAGE.glob("*.py"))


def _tree(module: str) -> ast.Module:
    return ast.parse((PACKAGE / f"{module}.py").read_text())


def _defined(module: str) -> set[str]:
    """Names a module binds itself at top level (or under a top-level ``if``/``try``)."""
    names: set[str] = set()
    statements = list(_tree(module).body)
    while statements:
        node = statements.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, (ast.If, ast.Try)):
            statements.extend([*node.body, *node.orelse])
    return names


def _package_imports(module: str) -> list[tuple[str, str]]:
    """``(source module, name)`` of every ``from .source import name`` in ``module``."""
    found = []
    for node in ast.walk(_tree(module)):
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
            found.extend((node.module, alias.name) for alias in node.names)
    return found


@pytest.mark.parametrize("module", MODULES)
def test_names_are_imported_from_the_module_that_defines_them(module: str) -> None:
    for source, name in _package_imports(module):
        assert name in _defined(source), (
            f"tenantdb/{module}.py imports {name} from .{source}, which only re-exports it")


@pytest.mark.parametrize("module", MODULES)
def test_private_names_are_not_imported_across_modules(module: str) -> None:
    private = [f"{source}.{name}" for source, name in _package_imports(module)
               if name.startswith("_") and not name.startswith("__")]
    assert private == [], f"tenantdb/{module}.py imports private {private}"


@pytest.mark.parametrize("module", MODULES)
def test_context_names_come_from_context_only(module: str) -> None:
    shared = set(context.__all__)
    wrong = [source for source, name in _package_imports(module)
             if name in shared and source != "context"]
    assert wrong == [], f"tenantdb/{module}.py imports context names from {wrong}"


@pytest.mark.parametrize("module", ["idempotency", "scoping"])
def test_raw_sql_modules_do_not_import_the_model_layer(module: str) -> None:
    sources = {source for source, _ in _package_imports(module)}
    assert not sources & {"tenancy", "models", "repository"}, sources


def test_execute_scoped_lives_with_run_scoped_and_is_reexported() -> None:
    from tenantdb import scoping, tenancy

    assert tenantdb.execute_scoped is scoping.execute_scoped is tenancy.execute_scoped
    assert "execute_scoped" in _defined("scoping")
    assert "execute_scoped" not in _defined("tenancy")


@pytest.mark.parametrize("module", MODULES)
def test_every_module_declares_all(module: str) -> None:
    if module == "__main__":
        pytest.skip("the command-line entry exports nothing")
    assert "__all__" in _defined(module)
