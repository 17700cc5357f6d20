"""A PostgreSQL write whose connection breaks answers the truth about whether it committed.

A real TCP proxy sits between the store and PostgreSQL and cuts the connection at the worst
moments: right after forwarding COMMIT (the server commits, the client never hears it), and
before COMMIT (nothing can commit). A store that answered 503 for the first would make a
retry apply the change twice; one that answered 200 for the second would lie.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest

from opscore.errors import Unavailable
from opscore.models import Change
from opscore.storage.postgres import PostgresStore
from tests.conftest import PG_URL
from tests.storage.changes import agent_change

pytestmark = pytest.mark.skipif(not PG_URL, reason="PostgreSQL half skipped: OPSCORE_TEST_DATABASE_URL is not set")


class CuttingProxy:
    """Forwards bytes to PostgreSQL; on request, cuts a connection when a chosen message passes.

    ``cut_after = b"COMMIT"``: forward the message, swallow every answer, then close the client
    side (the server committed; the client never learns it). ``cut_before = b"UPDATE entities"``:
    close both sides without forwarding it.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.cut_after: bytes | None = None
        self.cut_before: bytes | None = None
        self.cuts = 0
        self.server: asyncio.Server | None = None
        self.port = 0
        self.writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        for writer in list(self.writers):
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()
        if self.server is not None:
            await self.server.wait_closed()

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection(*self.target)
        self.writers.update((client_w, server_w))
        mute = asyncio.Event()

        async def upstream() -> None:
            while data := await client_r.read(65536):
                if self.cut_before is not None and self.cut_before in data:
                    self.cut_before = None
                    self.cuts += 1
                    server_w.close()
                    client_w.close()
                    return
                server_w.write(data)
                await server_w.drain()
                if self.cut_after is not None and self.cut_after in data:
                    self.cut_after = None
                    self.cuts += 1
                    mute.set()
                    await asyncio.sleep(0.3)  # long enough for the server to commit
                    client_w.close()
                    server_w.close()
                    return

        async def downstream() -> None:
            while data := await server_r.read(65536):
                if mute.is_set():
                    continue
                client_w.write(data)
                with contextlib.suppress(ConnectionError):
                    await client_w.drain()

        with contextlib.suppress(ConnectionError, OSError):
            await asyncio.gather(upstream(), downstream())
        for writer in (client_w, server_w):
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()
            self.writers.discard(writer)


def through(url: str, port: int, *, plain: bool = False) -> str:
    """``url`` by way of the proxy on ``port``; ``plain``: no TLS, so the proxy can read the messages."""
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)
    host = f"127.0.0.1:{port}"
    parts = parts._replace(netloc=f"{netloc[0]}@{host}" if len(netloc) == 2 else host)
    if plain:  # a cluster with ssl = on would otherwise encrypt the messages the proxy looks for
        parts = parts._replace(query=f"{parts.query}&sslmode=disable" if parts.query else "sslmode=disable")
    return urlunsplit(parts)


@pytest.fixture
def pg_url() -> Iterator[str]:
    from tests.pg import fresh_schema

    with fresh_schema(PG_URL) as url:
        yield url


@contextlib.asynccontextmanager
async def proxied_store(url: str) -> AsyncIterator[tuple[PostgresStore, CuttingProxy]]:
    parts = urlsplit(url)
    proxy = CuttingProxy(parts.hostname or "127.0.0.1", parts.port or 5432)
    await proxy.start()
    store = PostgresStore(through(url, proxy.port, plain=True), min_size=1, max_size=2, timeout=5)
    await store.open()
    try:
        yield store, proxy
    finally:
        await store.close()
        await proxy.stop()


def report(entity_id: str, state: str, revision: int) -> Change:
    return agent_change(entity_id, state, revision)


def stored_revision(url: str, entity_id: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT revision FROM entities WHERE entity_id = %s", (entity_id,)).fetchone()
        return -1 if row is None else int(row[0])


def test_a_commit_whose_answer_is_lost_is_reported_as_committed(pg_url: str) -> None:
    async def scenario() -> None:
        async with proxied_store(pg_url) as (store, proxy):
            await store.apply(report("a1", "idle", 0))
            proxy.cut_after = b"COMMIT"
            committed = await store.apply(report("a1", "active", 1))  # must not raise: it committed
            assert proxy.cuts == 1
            assert committed.entity.revision == 2 and committed.record is not None
            assert stored_revision(pg_url, "a1") == 2
            again = await store.apply(report("a1", "idle", 2))  # the pool recovered
            assert again.entity.revision == 3

    asyncio.run(scenario())


def test_a_write_cut_before_commit_is_reported_as_not_committed(pg_url: str) -> None:
    async def scenario() -> None:
        async with proxied_store(pg_url) as (store, proxy):
            await store.apply(report("a2", "idle", 0))
            proxy.cut_before = b"UPDATE entities"
            with pytest.raises(Unavailable):
                await store.apply(report("a2", "active", 1))
            assert proxy.cuts == 1
            await asyncio.sleep(0.2)
            assert stored_revision(pg_url, "a2") == 1  # nothing of it committed
            verified = await store.verify()
            assert verified.ok, verified.problems

    asyncio.run(scenario())
