"""One entity's chain read through ``audit_chain`` alone (SQLite schema 3, PostgreSQL 4), and the clock rule it needs.

Neither store keeps an ``audit_entity`` or ``audit_moment`` index (SQLite from schema 3 on,
PostgreSQL from 4): a page of one
chain goes by ``seq`` with its ``id`` cursor turned into a ``seq`` bound, and ``?at=`` finds
its moment by a binary search over ``seq``. Both are exact only because ``id`` and
``recordedAt`` never decrease along a chain; these tests hold the pages to what filtering every
record by ``id`` gives, for any cursor a client can send, and the seek to the replay when the
wall clock steps back.
"""

from __future__ import annotations

import asyncio
import sqlite3
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from opscore import history
from opscore.models import AuditQuery, Change, Entity
from opscore.storage import Store, open_store
from opscore.storage import sqlite as sqlite_store
from opscore.storage.base import next_entity
from opscore.storage.sqlite import path_from_url
from tests.conftest import PG_URL
from tests.storage.conftest import Backend
from tests.storage.test_contract import draft, moments_of, step


def test_one_chain_pages_alike_for_every_cursor(backend: Backend) -> None:
    """Each entity's pages, both ways and at every cursor (its own ids, others', none), as filtering by id gives."""

    async def scenario(store: Store) -> None:
        for i in range(14):
            await step(store, f"c{i % 3}")
            if i % 4 == 0:
                refused = draft(f"c{i % 3}", "idle", "error", outcome="rejected")
                await store.apply(Change("agent", f"c{i % 3}", record=refused))
        everything = await store.list_audit(AuditQuery(limit=1000))
        top = max(r["id"] for r in everything)
        for entity_id in ("c0", "c1", "nobody"):
            for outcome in (None, "applied"):
                mine = [r["id"] for r in everything if r["entityId"] == entity_id and outcome in (None, r["outcome"])]
                for cursor in (None, *range(0, top + 3), 2**63 - 1):  # the largest cursor the API lets through
                    for descending in (False, True):
                        for limit in (1, 3, 100):
                            page = await store.list_audit(
                                AuditQuery(
                                    entity_type="agent",
                                    entity_id=entity_id,
                                    outcome=outcome,
                                    descending=descending,
                                    after_id=cursor,
                                    limit=limit,
                                )
                            )
                            if descending:
                                want = [i for i in mine[::-1] if cursor is None or i < cursor][:limit]
                            else:
                                want = [i for i in mine if cursor is None or i > cursor][:limit]
                            assert [r["id"] for r in page] == want, (entity_id, outcome, cursor, descending, limit)

    backend.run(scenario)


def test_a_record_is_never_stamped_before_its_entitys_last_change() -> None:
    """A clock behind the entity's last change (stepped back, or another replica's) stamps that change's time."""
    later = "2026-06-01T12:00:00.000000+00:00"
    earlier = "2026-06-01T11:59:00.000000+00:00"
    current = Entity("agent", "a", "idle", 1, 1, "h" * 64, {}, "2026-06-01T10:00:00.000000+00:00", later)
    change = Change("agent", "a", state="active", record=draft("a", "idle", "active"))
    new, record, _ = next_entity(current, change, now=earlier, record_id=7)
    assert record is not None and record["recordedAt"] == later and new.updated_at == later
    ahead = "2026-06-01T12:00:01.000000+00:00"
    new, record, _ = next_entity(current, change, now=ahead, record_id=7)
    assert record is not None and record["recordedAt"] == ahead and new.updated_at == ahead
    created, record, _ = next_entity(
        None, replace(change, create=Entity("agent", "a", "registered")), now=earlier, record_id=1
    )
    assert created.created_at == earlier and record is not None and record["recordedAt"] == earlier


def test_the_seek_agrees_with_the_replay_when_the_clock_steps_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite's clock steps back an hour mid-chain: recordedAt still never decreases, and ``?at=`` = replay."""
    clock = iter(
        f"2026-06-01T{hour:02d}:00:{second:02d}.000000+00:00"
        for hour, second in [(10, 0), (10, 1), (10, 2), (9, 0), (9, 1), (10, 3), (11, 0), (11, 1), (11, 2)]
    )
    monkeypatch.setattr(sqlite_store, "utc_now", lambda: next(clock))
    store = open_store(f"sqlite:///{tmp_path / 'o.db'}")

    async def scenario() -> None:
        await store.open()
        try:
            for _ in range(8):
                await step(store, "back")
            records = await store.list_audit(AuditQuery(entity_type="agent", entity_id="back"))
            stamps = [r["recordedAt"] for r in records]
            assert (
                stamps == sorted(stamps) and stamps[2] == stamps[3] == stamps[4] == "2026-06-01T10:00:02.000000+00:00"
            )
            entity = await store.get("agent", "back")
            assert entity is not None
            for moment in [m for m in moments_of(entity, records) if m >= entity.created_at]:
                fast = await history.at(store, entity, "registered", moment, 3)
                slow = await history.replay(store, entity, "registered", moment, 3)
                assert fast == slow, moment
        finally:
            await store.close()

    asyncio.run(scenario())


def _indexes(path: str) -> set[str]:
    conn = sqlite3.connect(path)
    try:
        return {
            r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'audit'")
        }
    finally:
        conn.close()


def test_sqlite_schema_3_keeps_only_the_chain_index_per_entity(tmp_path: Path) -> None:
    """A new database and a migrated version-2 one alike: audit_chain, audit_type, audit_recorded."""
    fresh = Backend("sqlite", f"sqlite:///{tmp_path / 'fresh.db'}")
    fresh.run(lambda store: step(store, "a"))
    assert _indexes(path_from_url(fresh.url)) == {"audit_chain", "audit_type", "audit_recorded"}

    old = tmp_path / "v2.db"
    conn = sqlite3.connect(old, isolation_level=None)
    conn.execute("BEGIN")
    conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    for version in (1, 2):
        for migration in sqlite_store.MIGRATIONS[version]:
            if isinstance(migration, str):
                conn.execute(migration)
            else:
                migration(conn)
    conn.execute("INSERT INTO schema_version (version) VALUES (2)")
    conn.execute("COMMIT")
    conn.close()
    assert {"audit_entity", "audit_moment"} <= _indexes(str(old))
    v2 = Backend("sqlite", f"sqlite:///{old}")

    async def write_then_read(store: Store) -> list[Any]:
        for _ in range(3):
            await step(store, "b")
        return [r["seq"] for r in await store.list_audit(AuditQuery(entity_type="agent", entity_id="b", after_id=1))]

    assert v2.run(write_then_read) == [2, 3]
    assert _indexes(str(old)) == {"audit_chain", "audit_type", "audit_recorded"}
    assert v2.run(lambda store: store.list_audit(AuditQuery(entity_type="agent", entity_id="b"))) != []
    conn = sqlite3.connect(old)
    assert conn.execute("SELECT version FROM schema_version").fetchall() == [(3,)]
    conn.close()
    assert sqlite_store.SCHEMA_VERSION == 3


def _pg_indexes(url: str) -> set[str]:
    import psycopg

    with psycopg.connect(url) as conn:
        found = "SELECT indexname FROM pg_indexes WHERE tablename = 'audit' AND schemaname = current_schema()"
        return {str(r[0]) for r in conn.execute(found).fetchall()}


@pytest.mark.skipif(not PG_URL, reason="PostgreSQL half skipped: OPSCORE_TEST_DATABASE_URL is not set")
def test_postgresql_schema_4_keeps_only_the_chain_index_per_entity(monkeypatch: pytest.MonkeyPatch) -> None:
    """A new schema and a migrated version-3 one alike; a chain's pages still answer across the migration."""
    import psycopg

    from opscore.storage import postgres as pg_store
    from tests.pg import fresh_schema

    kept = {"audit_pkey", "audit_chain", "audit_type", "audit_recorded", "audit_commit"}
    with fresh_schema(PG_URL) as url:
        Backend("postgres", url).run(lambda store: step(store, "a"))
        assert _pg_indexes(url) == kept
    with fresh_schema(PG_URL) as url:
        backend = Backend("postgres", url)
        with monkeypatch.context() as patched:
            patched.setattr(pg_store, "SCHEMA_VERSION", 3)
            backend.run(lambda store: step(store, "b"))
        assert {"audit_entity", "audit_moment"} <= _pg_indexes(url)

        async def write_then_read(store: Store) -> list[Any]:
            for _ in range(2):
                await step(store, "b")
            page = await store.list_audit(AuditQuery(entity_type="agent", entity_id="b", after_id=1))
            return [r["seq"] for r in page]

        assert backend.run(write_then_read) == [2, 3]
        assert _pg_indexes(url) == kept
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT version FROM schema_version").fetchall() == [(4,)]
    assert pg_store.SCHEMA_VERSION == 4
