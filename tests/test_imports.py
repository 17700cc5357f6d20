"""Imports point one way: api -> engine -> {machines, audit, storage.base, models, errors}.

Walks every module of ``opscore/`` with ``ast`` (nothing is imported), so a new module is
checked the day it is added.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "opscore"


@dataclass(frozen=True)
class Import:
    module: str  # the importing module, dotted
    target: str  # the imported module, dotted
    lazy: bool  # inside a function (imported when called, not when loaded)
    line: int


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> list[Import]:
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: list[Import] = []

    def visit(node: ast.AST, lazy: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend(Import(name, alias.name, lazy, child.lineno) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[: len(base) - (child.level - 1)]
                    target = ".".join([*base, *([child.module] if child.module else [])])
                else:
                    target = child.module or ""
                found.append(Import(name, target, lazy, child.lineno))
                found.extend(Import(name, f"{target}.{a.name}", lazy, child.lineno) for a in child.names)
            visit(child, inner)

    visit(tree, False)
    return found


MODULES = sorted(PACKAGE.rglob("*.py"))
ALL = [imp for path in MODULES for imp in imports_of(path)]


def under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def offenders(imports: list[Import]) -> list[str]:
    return [f"{i.module}:{i.line} imports {i.target}{' (lazily)' if i.lazy else ''}" for i in imports]


def test_the_walk_sees_the_package() -> None:
    names = {module_name(p) for p in MODULES}
    assert {"opscore.engine", "opscore.storage.sqlite", "opscore.api.app", "opscore.cli"} <= names
    assert any(i.module == "opscore.fsm" and i.target == "transitions" for i in ALL)
    assert any(under(i.module, "opscore.cli") and i.lazy for i in ALL)


def test_only_the_machine_wrapper_and_the_diagrams_import_transitions() -> None:
    """``transitions`` decides in :mod:`opscore.fsm` and draws in :mod:`opscore.diagrams`; nowhere else."""
    bad = [i for i in ALL if under(i.target, "transitions") and i.module not in ("opscore.fsm", "opscore.diagrams")]
    assert not bad, offenders(bad)


@pytest.mark.parametrize("forbidden", ["transitions", "opscore.engine", "opscore.api"])
def test_storage_never_imports_the_engine_the_api_or_transitions(forbidden: str) -> None:
    bad = [i for i in ALL if under(i.module, "opscore.storage") and under(i.target, forbidden)]
    assert not bad, offenders(bad)


TRANSPORT = ("opscore.api", "opscore.console")
"""HTTP: the API, and the operator console's pages (which read through the API's views and sessions)."""


def transport(module: str) -> bool:
    return any(under(module, layer) for layer in TRANSPORT)


def test_nothing_outside_the_api_imports_the_api() -> None:
    """``cli`` may import it inside a function (``serve`` needs the app); the console is transport too."""
    bad = [
        i
        for i in ALL
        if (under(i.target, "opscore.api") or under(i.target, "opscore.console"))
        and not transport(i.module)
        and not (under(i.module, "opscore.cli") and i.lazy)
    ]
    assert not bad, offenders(bad)


# The stand-in AgentKit is a program of its own (an HTTP server playing AgentKit and its
# agents for tests and demos), not part of Ops-Core's domain, so it may be a web app.
OTHER_PROGRAMS = ("opscore.simulator",)


@pytest.mark.parametrize("framework", ["fastapi", "starlette", "uvicorn"])
def test_the_domain_does_not_import_the_web_framework(framework: str) -> None:
    bad = [
        i
        for i in ALL
        if under(i.target, framework)
        and not transport(i.module)
        and i.module not in OTHER_PROGRAMS
        and not (under(i.module, "opscore.cli") and i.lazy)
    ]
    assert not bad, offenders(bad)


@pytest.mark.parametrize("driver", ["sqlite3", "psycopg", "psycopg_pool"])
def test_the_api_and_the_engine_do_not_talk_to_databases(driver: str) -> None:
    bad = [i for i in ALL if under(i.target, driver) and (transport(i.module) or i.module == "opscore.engine")]
    assert not bad, offenders(bad)


def test_the_engine_does_not_import_a_backend() -> None:
    bad = [
        i
        for i in ALL
        if i.module == "opscore.engine"
        and under(i.target, "opscore.storage")
        and i.target != "opscore.storage.base"
        and not i.target.startswith("opscore.storage.base.")
    ]
    assert not bad, offenders(bad)


def test_no_route_imports_another_route() -> None:
    """Shared views and paging live in opscore.api.views and opscore.api.paging, not in a route."""
    bad = [
        i
        for i in ALL
        if under(i.module, "opscore.api.routes")
        and under(i.target, "opscore.api.routes")
        and i.target.split(".")[:4] != i.module.split(".")[:4]
    ]
    assert not bad, offenders(bad)
