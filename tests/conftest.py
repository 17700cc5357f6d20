"""Shared fixtures: stores of every backend, and real servers on real database files."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers import Server


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    """A real ``opscore serve`` on a fresh SQLite file, stopped after the test."""
    srv = Server(database_url=f"sqlite:///{tmp_path / 'opscore.db'}", log_path=tmp_path / "server.log")
    srv.start()
    yield srv
    srv.stop()
