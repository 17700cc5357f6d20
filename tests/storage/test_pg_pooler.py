"""The PostgreSQL store behind a real PgBouncer in transaction mode (``OPSCORE_PG_POOLER``).

In transaction mode each transaction may run on another server connection. psycopg prepares
a query on the server from its fifth run by default; the next run on a server connection
that lacks (or already has) that prepared statement fails. ``OPSCORE_PG_POOLER=transaction``
turns server-side preparation off: the same workload then runs without an error.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from opscore.config import Settings
from opscore.errors import OpsCoreError, Unavailable
from opscore.models import Change
from opscore.storage import open_store
from opscore.storage.postgres import PostgresStore
from tests.conftest import PG_URL
from tests.pgbouncer import PgBouncer, pgbouncer
from tests.storage.changes import agent_change
from tests.storage.test_pg_commit_outcome import CuttingProxy, through

pytestmark = pytest.mark.skipif(not PG_URL, reason="PostgreSQL half skipped: OPSCORE_TEST_DATABASE_URL is not set")


def report(entity_id: str, source: str, state: str, revision: int) -> Change:
    """The change a state report from ``source`` to ``state`` makes (as the engine decides it)."""
    return agent_change(entity_id, state, revision, source=source, event="report")


@pytest.fixture
def bouncer(tmp_path: Path) -> Iterator[tuple[PgBouncer, str]]:
    with pgbouncer(PG_URL, tmp_path, pool_size=2) as pair:
        yield pair


async def workload(store: PostgresStore, agents: int = 6, rounds: int = 8) -> list[BaseException]:
    """Reports and reads from several tasks at once, each query text run far more than five times."""
    failures: list[BaseException] = []
    states = ["registered", "idle", "active"]

    async def agent(n: int) -> None:
        entity_id = f"pooled-{n}"
        for revision in range(rounds):
            try:
                source = states[0] if revision == 0 else states[1 + (revision + 1) % 2]
                await store.apply(report(entity_id, source, states[1 + revision % 2], revision))
                await store.get("agent", entity_id)
            except OpsCoreError as exc:
                failures.append(exc)
                return

    await asyncio.gather(*(agent(n) for n in range(agents)))
    return failures


def test_without_the_setting_prepared_statements_break_behind_a_transaction_pooler(
    bouncer: tuple[PgBouncer, str],
) -> None:
    pgb, role = bouncer

    async def scenario() -> list[BaseException]:
        store = PostgresStore(pgb.url(role), min_size=4, max_size=4, timeout=5)
        await store.open()
        try:
            # group commit and coalesced reads run each query text once per batch, not once per
            # change: enough rounds for psycopg to prepare them (after 5 runs on one connection)
            return await workload(store, rounds=60)
        finally:
            await store.close()

    failures = asyncio.run(scenario())
    assert failures, "psycopg's prepared statements survived PgBouncer's transaction mode"
    assert any("prepared statement" in str(exc) for exc in failures), failures


def test_with_the_setting_the_store_works_behind_a_transaction_pooler(bouncer: tuple[PgBouncer, str]) -> None:
    pgb, role = bouncer
    settings = Settings(database_url=pgb.url(role), pg_pooler="transaction", pg_pool_min=4, pg_pool_max=4)
    store = open_store(settings.database_url, pool_min=4, pool_max=4, pooler=settings.pg_pooler)
    assert isinstance(store, PostgresStore)

    async def scenario() -> tuple[list[BaseException], bool, int]:
        await store.open()
        try:
            failures = await workload(store)
            verified = await store.verify()
            return failures, verified.ok, verified.records
        finally:
            await store.close()

    failures, ok, records = asyncio.run(scenario())
    assert failures == []
    assert ok and records == 6 * 8
    # the tables are in the role's schema (its search_path), not in public
    with psycopg.connect(pgb.url(role), prepare_threshold=None) as conn:
        row = conn.execute(
            "SELECT table_schema, count(*) FROM information_schema.tables "
            "WHERE table_name = 'audit' GROUP BY table_schema"
        ).fetchall()
    assert row == [(role, 1)]


def test_the_pooler_setting_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPSCORE_PG_POOLER", "Transaction")
    assert Settings().pg_pooler == "transaction"
    monkeypatch.setenv("OPSCORE_PG_POOLER", "session")
    assert Settings().pg_pooler == "none"
    monkeypatch.setenv("OPSCORE_PG_POOLER", "statement")
    with pytest.raises(ValueError, match="OPSCORE_PG_POOLER"):
        Settings()
    assert PostgresStore("postgresql://x/y", pooler="transaction").connect_kwargs()["prepare_threshold"] is None
    assert "prepare_threshold" not in PostgresStore("postgresql://x/y").connect_kwargs()


def test_a_commit_cut_between_ops_core_and_the_pooler_answers_the_truth(bouncer: tuple[PgBouncer, str]) -> None:
    """The pid psycopg sees is PgBouncer's, so the outcome is found by ``pg_xact_status`` alone."""
    pgb, role = bouncer

    async def scenario() -> None:
        proxy = CuttingProxy("127.0.0.1", pgb.port)
        await proxy.start()
        store = PostgresStore(
            through(pgb.url(role), proxy.port, plain=True), min_size=1, max_size=2, timeout=5, pooler="transaction"
        )
        await store.open()
        try:
            await store.apply(report("cut", "registered", "idle", 0))
            proxy.cut_after = b"COMMIT"
            committed = await store.apply(report("cut", "idle", "active", 1))  # committed: answered so
            assert proxy.cuts == 1 and committed.entity.revision == 2
            proxy.cut_before = b"UPDATE entities"
            with pytest.raises(Unavailable):
                await store.apply(report("cut", "active", "idle", 2))
            assert proxy.cuts == 2
            again = await store.apply(report("cut", "active", "idle", 2))  # nothing of the cut one committed
            assert again.entity.revision == 3
            assert (await store.verify()).ok
        finally:
            await store.close()
            await proxy.stop()

    asyncio.run(scenario())
