"""What only the PostgreSQL store has: migrations under an advisory lock, the schema from the
URL, pool settings, and psycopg's failures translated where they enter."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from opscore.errors import Invalid, StorageError, Unavailable
from opscore.models import Change, Entity
from opscore.storage import open_store
from opscore.storage.postgres import SCHEMA_VERSION
from tests.conftest import PG_URL

pytestmark = pytest.mark.skipif(not PG_URL, reason="PostgreSQL half skipped: OPSCORE_TEST_DATABASE_URL is not set")

TABLES = {
    "audit",
    "definitions",
    "entities",
    "idempotency",
    "labels",
    "schema_version",
    "timers",
    "webhook_signatures",
}


@pytest.fixture
def pg_url() -> Iterator[str]:
    from tests.pg import fresh_schema

    with fresh_schema(PG_URL) as url:
        yield url


def schema_of(url: str) -> str:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT current_schema()").fetchone()
        assert row is not None
        return str(row[0])


def test_replicas_starting_together_migrate_once_into_the_urls_schema(pg_url: str) -> None:
    from opscore.storage.postgres import PostgresStore

    async def main() -> list[bool]:
        stores = [PostgresStore(pg_url, min_size=1, max_size=2) for _ in range(4)]
        await asyncio.gather(*(s.open() for s in stores))
        try:
            await stores[0].apply(Change("agent", "a1", create=Entity("agent", "a1", "registered")))
            return [await s.get("agent", "a1") is not None for s in stores]
        finally:
            await asyncio.gather(*(s.close() for s in stores))

    assert asyncio.run(main()) == [True] * 4
    schema = schema_of(pg_url)
    with psycopg.connect(PG_URL) as conn:
        tables = {r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = %s", (schema,))}
        assert tables == TABLES
        assert conn.execute(f'SELECT version FROM "{schema}".schema_version').fetchall() == [(SCHEMA_VERSION,)]


def test_a_newer_schema_refuses_to_start(pg_url: str) -> None:
    async def open_and_close() -> None:
        store = open_store(pg_url)
        await store.open()
        await store.close()

    asyncio.run(open_and_close())
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("UPDATE schema_version SET version = 99")
    with pytest.raises(StorageError) as refused:
        asyncio.run(open_and_close())
    assert refused.value.code == "schema_too_new"


def test_an_unreachable_server_is_unavailable() -> None:
    from opscore.storage.postgres import PostgresStore
    from tests.servers import free_port

    store = PostgresStore(f"postgresql://127.0.0.1:{free_port()}/test?connect_timeout=1", timeout=1)
    with pytest.raises(Unavailable):
        asyncio.run(store.open())


def test_ping_answers_unavailable_when_the_connection_dies(pg_url: str) -> None:
    from opscore.storage.postgres import PostgresStore

    async def main() -> None:
        store = PostgresStore(pg_url, min_size=1, max_size=1, timeout=2)
        await store.open()
        try:
            await store.ping()
            async with store._connection() as conn:
                pid = conn.info.backend_pid
            with psycopg.connect(PG_URL, autocommit=True) as admin:
                admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
            with pytest.raises(Unavailable):
                await store.ping()
            await store.ping()  # the pool replaced the dead connection
        finally:
            await store.close()

    asyncio.run(main())


def test_a_nul_in_a_text_key_is_invalid_input_not_a_crash(pg_url: str) -> None:
    async def main() -> None:
        store = open_store(pg_url)
        await store.open()
        try:
            with pytest.raises(Invalid) as refused:
                await store.apply(Change("agent", "a\x00b", create=Entity("agent", "a\x00b", "registered")))
            assert refused.value.code == "unstorable_value"
            assert await store.get("agent", "ab") is None
        finally:
            await store.close()

    asyncio.run(main())


def test_pool_sizes_come_from_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """OPSCORE_PG_POOL_* are read once, by Settings (environment or .env), and handed to the store."""
    from pydantic import ValidationError

    from opscore.config import Settings
    from opscore.storage.postgres import PostgresStore

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OPSCORE_PG_POOL_MIN", "3")
    monkeypatch.setenv("OPSCORE_PG_POOL_MAX", "7")
    (tmp_path / ".env").write_text("OPSCORE_PG_POOL_TIMEOUT=4.5\n")
    conf = Settings()
    store = open_store(
        PG_URL or "postgresql://x/y",
        pool_min=conf.pg_pool_min,
        pool_max=conf.pg_pool_max,
        pool_timeout=conf.pg_pool_timeout,
    )
    assert isinstance(store, PostgresStore)
    assert (store.min_size, store.max_size, store.timeout) == (3, 7, 4.5)
    monkeypatch.setenv("OPSCORE_PG_POOL_MAX", "lots")
    with pytest.raises(ValidationError, match="OPSCORE_PG_POOL_MAX"):
        Settings()
    monkeypatch.setenv("OPSCORE_PG_POOL_MAX", "-1")
    with pytest.raises(ValidationError):
        Settings()
    monkeypatch.delenv("OPSCORE_PG_POOL_MIN")
    monkeypatch.delenv("OPSCORE_PG_POOL_MAX")
    # the store itself no longer reads the environment: its defaults are fixed
    monkeypatch.setenv("OPSCORE_PG_POOL_MAX", "99")
    assert (PostgresStore("postgresql://x/y").min_size, PostgresStore("postgresql://x/y").max_size) == (2, 10)


def test_a_read_only_open_never_creates_tables(pg_url: str) -> None:
    from opscore.storage.postgres import PostgresStore

    with pytest.raises(StorageError) as refused:
        asyncio.run(PostgresStore(pg_url, readonly=True).open())
    assert refused.value.code == "not_opscore"
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = current_schema()").fetchone() == (0,)


def test_the_cli_verifies_and_exports_a_postgresql_audit(pg_url: str, tmp_path: Path) -> None:
    from tests.servers import ROOT
    from tests.storage.test_contract import step

    async def fill() -> None:
        store = open_store(pg_url)
        await store.open()
        try:
            for i in range(6):
                await step(store, f"a{i % 2}")
        finally:
            await store.close()

    asyncio.run(fill())
    env = {**os.environ, "OPSCORE_DATABASE_URL": pg_url, "PYTHONPATH": str(ROOT)}
    cli = [sys.executable, "-m", "opscore", "audit"]
    verified = subprocess.run(
        [*cli, "verify", "--json"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert verified.returncode == 0, verified.stderr
    assert json.loads(verified.stdout)["records"] == 6
    out = tmp_path / "audit.jsonl"
    exported = subprocess.run(
        [*cli, "export", "--out", str(out)], env=env, cwd=tmp_path, capture_output=True, timeout=60
    )
    assert exported.returncode == 0, exported.stderr
    assert len(out.read_text().splitlines()) == 6 + 2 + 1  # the records, a head line per entity, the end line
    offline = subprocess.run(
        [*cli, "verify", "--file", str(out), "--json"], env=env, capture_output=True, text=True, timeout=60
    )
    assert offline.returncode == 0 and json.loads(offline.stdout)["ok"] is True
