"""HTTP behaviour is tested in process (STYLE 20): ``server`` here is the real app, started under
its lifespan in this process, on each of the three stores; ``process_server`` is a real
``opscore serve`` for what is about the process (its log on stdout)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import PG_URL
from tests.inproc import InProcess
from tests.servers import Server


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "memory":
        yield "memory://"
    elif request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'opscore.db'}"
    else:
        if not PG_URL:
            pytest.skip("PostgreSQL half skipped: OPSCORE_TEST_DATABASE_URL is not set")
        from tests.pg import fresh_schema

        with fresh_schema(PG_URL) as url:
            yield url


@pytest.fixture
def server(store_url: str) -> Iterator[InProcess]:
    app = InProcess(store_url).start()
    yield app
    app.stop()


@pytest.fixture
def process_server(database_url: str, tmp_path: Path) -> Iterator[Server]:
    srv = Server(database_url=database_url, log_path=tmp_path / "server.log")
    srv.start()
    yield srv
    srv.stop()
