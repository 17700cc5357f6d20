"""PostgreSQL with several replicas: one checkpoint stream, every replica's file a full copy.

Each "replica" is a store and a checkpointer of its own (its own connections, its own file)
on one database: one leads (advisory lock), the others copy; when the leader stops another
takes over and continues the same chain; a file the database's relay table no longer holds
stops a replica instead of forking the stream.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from opscore import checkpoints
from opscore.checkpointer import Checkpointer
from opscore.checkpoints import CheckpointFile, make_signing_key
from opscore.engine import Context, Engine
from opscore.models import Entity
from opscore.storage import Store, open_store
from opscore.storage.checkpoint_relay import PostgresRelay
from tests.conftest import PG_URL
from tests.storage.conftest import until


@pytest.fixture
def pg_url() -> Iterator[str]:
    if not PG_URL:
        pytest.skip("PostgreSQL half skipped: OPSCORE_TEST_DATABASE_URL is not set")
    from tests.pg import fresh_schema

    with fresh_schema(PG_URL) as url:
        yield url


class Replica:
    def __init__(self, url: str, file: Path, key: Path) -> None:
        self.url, self.file, self.key = url, file, key
        self.store: Store = open_store(url)
        self.runner: Checkpointer | None = None

    async def start(self) -> None:
        await self.store.open()
        self.runner = Checkpointer(
            self.store,
            CheckpointFile(self.file),
            checkpoints.load_signer(self.key),
            relay=PostgresRelay(self.url),
            records=4,
            seconds=0.2,
            poll=0.02,
        )
        await self.runner.start()

    async def stop(self) -> None:
        assert self.runner is not None
        await self.runner.stop()
        await self.store.close()

    async def report(self, agent: str, state: str) -> None:
        await Engine(self.store).report(
            "agent", agent, state, ctx=Context(actor="key:r"), create=Entity("agent", agent, "registered")
        )


def records_in(path: Path) -> int:
    file = CheckpointFile(path)
    file.open()
    return 0 if file.last is None else int(file.last["records"])


def test_replicas_share_one_stream_and_hand_it_over(pg_url: str, tmp_path: Path) -> None:
    private, public, _ = make_signing_key(tmp_path / "signing.pem")
    a = Replica(pg_url, tmp_path / "a.jsonl", private)
    b = Replica(pg_url, tmp_path / "b.jsonl", private)

    async def scenario() -> None:
        await a.start()
        await b.start()
        for n, state in enumerate(("initializing", "idle", "active")):
            for agent in ("p-1", "p-2", "p-3"):
                await (a if n % 2 else b).report(agent, state)  # both replicas write
        await until(lambda: records_in(a.file) == 9 and records_in(b.file) == 9)
        assert a.runner is not None and b.runner is not None
        assert [a.runner.leading, b.runner.leading].count(True) == 1
        assert a.file.read_bytes() == b.file.read_bytes()  # one stream, two full copies

        leader, follower = (a, b) if a.runner.leading else (b, a)
        await leader.stop()  # its session ends: the lock goes with it
        for agent in ("p-1", "p-2"):
            await follower.report(agent, "idle")
        await until(lambda: records_in(follower.file) == 11)
        assert follower.runner is not None and follower.runner.leading
        await leader.start()  # back as a follower: it copies what it missed
        await until(lambda: records_in(leader.file) == 11)
        assert leader.runner is not None and not leader.runner.leading
        await a.stop()
        await b.stop()

    asyncio.run(scenario())
    assert a.file.read_bytes() == b.file.read_bytes()
    signed = checkpoints.read_checkpoint_file(a.file, [public])
    assert not signed.problems
    assert sum(1 for line in a.file.read_text().splitlines() if '"full":true' in line) == 1

    async def verify() -> bool:
        store = open_store(pg_url)
        await store.open()
        try:
            return (await checkpoints.verify_database(store, signed)).ok
        finally:
            await store.close()

    assert asyncio.run(verify())


def test_a_file_the_relay_no_longer_holds_halts_the_replica(pg_url: str, tmp_path: Path) -> None:
    private, _, _ = make_signing_key(tmp_path / "signing.pem")
    replica = Replica(pg_url, tmp_path / "a.jsonl", private)

    async def first() -> None:
        await replica.start()
        await replica.report("q-1", "idle")
        await until(lambda: records_in(replica.file) == 1)
        await replica.stop()

    asyncio.run(first())

    async def again() -> str | None:
        import psycopg

        async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as conn:
            await conn.execute("DELETE FROM checkpoint_lines")  # someone with database access
        await replica.start()
        await replica.report("q-1", "active")
        assert replica.runner is not None
        await until(lambda: replica.runner is not None and replica.runner.halted is not None)
        await replica.stop()
        return replica.runner.halted

    halted = asyncio.run(again())
    assert halted is not None and "checkpoint_lines table does not" in halted
    assert records_in(replica.file) == 1  # nothing signed over it
