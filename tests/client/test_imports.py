"""Importing ``opscore.client`` costs httpx and pydantic, never the server or a database driver."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.servers import ROOT
from tests.test_imports import ALL, offenders, under

SERVER_SIDE = [
    "fastapi",
    "starlette",
    "uvicorn",
    "sqlite3",
    "psycopg",
    "psycopg_pool",
    "transitions",
    "yaml",
    "pydantic_settings",
    "opscore.api",
    "opscore.storage",
    "opscore.engine",
    "opscore.workflows",
    "opscore.config",
]


def modules_after(statement: str) -> subprocess.CompletedProcess[str]:
    """Run ``statement`` in a fresh interpreter and print the modules it loaded.

    Without coverage's environment: ``make test`` measures subprocesses, and coverage itself
    imports ``sqlite3`` (its data file), which is not something the client loaded.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COVERAGE", "COV_CORE"))}
    code = f"import json, sys; {statement}; print(json.dumps(sorted(sys.modules)))"
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


def test_importing_the_client_loads_nothing_of_the_server() -> None:
    result = modules_after("import opscore.client")
    assert result.returncode == 0, result.stderr
    loaded = json.loads(result.stdout)
    bad = [m for m in loaded if any(under(m, prefix) for prefix in SERVER_SIDE)]
    assert not bad, f"import opscore.client loaded {bad}"
    assert "httpx" in loaded and "opscore.wire" in loaded


@pytest.mark.parametrize("forbidden", [m for m in SERVER_SIDE if m != "opscore.config"])
def test_the_client_modules_import_nothing_of_the_server(forbidden: str) -> None:
    """Not even lazily. (``opscore.config`` is read by ``settings_of`` when called, and named
    for type checkers: the test above shows importing the client does not load it.)"""
    bad = [
        i
        for i in ALL
        if (under(i.module, "opscore.client") or i.module == "opscore.wire") and under(i.target, forbidden)
    ]
    assert not bad, offenders(bad)


def test_the_cli_help_does_not_read_settings_or_import_the_client() -> None:
    result = modules_after("from opscore import cli")
    assert result.returncode == 0, result.stderr
    loaded = json.loads(result.stdout)
    heavy = [m for m in loaded if any(under(m, p) for p in ("opscore.client", "httpx", "pydantic", "rich", "fastapi"))]
    assert not heavy, f"opscore.cli loads {heavy} before any command runs (opscore --help must stay fast)"
