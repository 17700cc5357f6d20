"""Shared fixtures: a database URL per backend, and real servers on real databases.

Tests that take ``database_url`` (or ``server``) run once per backend: SQLite always,
PostgreSQL when ``OPSCORE_TEST_DATABASE_URL`` is set (CI sets it; ``make test`` says when it
skipped that half). Each test gets its own SQLite file or PostgreSQL schema.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers import Server

PG_URL = os.environ.get("OPSCORE_TEST_DATABASE_URL", "")


def pytest_report_header(config: pytest.Config) -> str:
    if PG_URL:
        return f"PostgreSQL half: ON ({PG_URL})"
    return "PostgreSQL half: SKIPPED (set OPSCORE_TEST_DATABASE_URL=postgresql://127.0.0.1:5432/test to run it)"


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database of each backend, removed after the test."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'opscore.db'}"
        return
    if not PG_URL:
        pytest.skip("PostgreSQL half skipped: OPSCORE_TEST_DATABASE_URL is not set")
    from tests.pg import fresh_schema

    with fresh_schema(PG_URL) as url:
        yield url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A fresh SQLite file, for tests about SQLite itself (durability, the lock file)."""
    return f"sqlite:///{tmp_path / 'opscore.db'}"


@pytest.fixture
def server(database_url: str, tmp_path: Path) -> Iterator[Server]:
    """A real ``opscore serve`` on a fresh database of each backend, stopped after the test."""
    srv = Server(database_url=database_url, log_path=tmp_path / "server.log")
    srv.start()
    yield srv
    srv.stop()
