"""A managed database's URL: ``?sslmode=require`` opens the store over TLS, for real.

The test cluster serves TLS (``ssl = on``; ``.ci/run`` turns it on as the README's
"Production PostgreSQL" section shows). Every connection of the store's pool is found in
``pg_stat_ssl`` by its ``application_name`` and must be encrypted; the same store opened with
``sslmode=disable`` is seen unencrypted there, so the check can tell the two apart.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import psycopg
import pytest

from opscore.errors import Unavailable
from opscore.storage import open_store
from opscore.storage.postgres import PostgresStore
from tests.conftest import PG_URL

pytestmark = pytest.mark.skipif(not PG_URL, reason="PostgreSQL half skipped: OPSCORE_TEST_DATABASE_URL is not set")


@pytest.fixture
def pg_url() -> Iterator[str]:
    from tests.pg import fresh_schema

    with fresh_schema(PG_URL) as url:
        yield url


def encryption_of(name: str) -> list[tuple[bool, str | None]]:
    """(ssl, TLS version) of every backend whose application_name is ``name``, seen from outside."""
    with psycopg.connect(PG_URL) as conn:
        rows = conn.execute(
            "SELECT s.ssl, s.version FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) "
            "WHERE a.application_name = %s",
            (name,),
        ).fetchall()
    return [(bool(ssl), version) for ssl, version in rows]


def open_and_use(url: str) -> list[tuple[bool, str | None]]:
    """Open the store at ``url`` (pool of 3), write and verify, and read its connections' encryption."""
    name = f"opscore-ssl-{uuid.uuid4().hex[:10]}"
    store = open_store(f"{url}&application_name={name}", pool_min=3, pool_max=3)

    async def scenario() -> list[tuple[bool, str | None]]:
        await store.open()
        try:
            await store.probe_write()
            assert (await store.verify()).ok
            await store.ping()
            return await asyncio.to_thread(encryption_of, name)
        finally:
            await store.close()

    return asyncio.run(scenario())


def test_the_cluster_serves_tls() -> None:
    with psycopg.connect(PG_URL) as conn:
        row = conn.execute("SHOW ssl").fetchone()
    assert row == ("on",), "the test cluster has ssl off: run .ci/run, or see README 'Production PostgreSQL'"


def test_sslmode_require_opens_the_store_over_tls(pg_url: str) -> None:
    seen = open_and_use(f"{pg_url}&sslmode=require")
    assert len(seen) == 3, seen  # the whole pool, found by its application_name
    assert all(ssl and version and version.startswith("TLS") for ssl, version in seen), seen


def test_sslmode_disable_is_seen_unencrypted(pg_url: str) -> None:
    seen = open_and_use(f"{pg_url}&sslmode=disable")
    assert len(seen) == 3 and not any(ssl for ssl, _ in seen), seen


def test_sslmode_require_against_a_server_without_tls_is_unavailable(pg_url: str) -> None:
    """A plain-TCP server (a proxy that answers the TLS request with 'N', as ssl = off does) is refused."""

    async def scenario() -> None:
        async def refuse_tls(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readexactly(8)  # SSLRequest
            writer.write(b"N")
            await writer.drain()
            await reader.read(65536)
            writer.close()

        server = await asyncio.start_server(refuse_tls, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        store = PostgresStore(f"postgresql://127.0.0.1:{port}/test?sslmode=require", min_size=1, timeout=2)
        try:
            with pytest.raises(Unavailable):
                await store.open()
        finally:
            server.close()
            await server.wait_closed()

    asyncio.run(scenario())
