"""Schema version 2 on both SQL stores: the migration of a version-1 database, and what it adds.

A version-1 database is made the way version 1 made it: its statements (``MIGRATIONS[1]``,
unchanged since) run by hand, then rows written as version 1 wrote them (audit rows without a
``revision``, no labels), including a run whose ``data`` holds ``NaN``, which SQL JSON functions
refuse. Opening it with today's store must migrate it, label its runs, and keep answering ``?at=``
for records written before (by replaying them) exactly as a replay does.
"""

from __future__ import annotations

import asyncio
import json
import math
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from opscore import audit, history
from opscore.errors import StorageError
from opscore.models import Change, Entity, EntityQuery, Position
from opscore.storage import Store, open_store
from opscore.storage import postgres as pg_store
from opscore.storage import sqlite as sqlite_store
from opscore.storage.rows import entity_values
from opscore.storage.sqlite import path_from_url
from tests.conftest import PG_URL
from tests.storage.conftest import Backend
from tests.storage.test_contract import build_history, chain, draft, moments_of, step


def latest(backend: Backend) -> int:
    """The schema version a store of ``backend`` migrates to (PostgreSQL's 3 adds stream positions)."""
    return sqlite_store.SCHEMA_VERSION if backend.name == "sqlite" else pg_store.SCHEMA_VERSION


@pytest.fixture(params=["sqlite", "postgres"])
def sql(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """A fresh, empty database of each SQL backend (no store opened on it yet)."""
    if request.param == "sqlite":
        yield Backend("sqlite", f"sqlite:///{tmp_path / 'opscore.db'}")
        return
    if not PG_URL:
        pytest.skip("PostgreSQL half skipped: OPSCORE_TEST_DATABASE_URL is not set")
    from tests.pg import fresh_schema

    with fresh_schema(PG_URL) as url:
        yield Backend("postgres", url)


def run(backend: Backend, scenario: Any) -> Any:
    return backend.run(scenario)


# -- a version-1 database, made by hand ---------------------------------------------------------

T0 = "2026-01-01T00:00:0{}.000000+00:00"


def v1_rows() -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """Entity rows and audit rows (v1 columns) of an agent with four records and three runs."""
    entities, records = [], []
    seq, head = 0, audit.GENESIS
    steps = [("ready", "registered", "idle", "applied"), ("begin_task", "idle", "registered", "rejected"),
             ("begin_task", "idle", "active", "applied"), ("finish_task", "active", "idle", "applied")]  # fmt: skip
    for n, (event, source, dest, outcome) in enumerate(steps, start=1):
        draft_ = audit.draft(entity_type="agent", entity_id="old", event=event, source=source, dest=dest,
                             outcome=outcome, reason=None if outcome == "applied" else "illegal_transition",
                             actor="key:v1", request_id=None, details={"n": n}, reported_at=None)  # fmt: skip
        record = audit.seal(draft_, record_id=n, seq=seq + 1, prev_hash=head, recorded_at=T0.format(n))
        seq, head = record["seq"], record["hash"]
        row = (n, "agent", "old", seq, outcome, record["recordedAt"], audit.text_of(record))
        records.append(row)
    agent = Entity("agent", "old", "idle", 3, seq, head, {"capabilities": ["x"]}, T0.format(0), T0.format(4))
    entities.append(entity_values(agent))
    runs = [
        ("run-a", "running", {"workflowId": "wf-a", "agentId": "old", "score": float("nan")}, T0.format(5)),
        ("run-b", "completed", {"workflowId": "wf-b", "agentId": "old"}, T0.format(6)),
        ("run-c", "running", {"workflowId": "wf-a", "agentId": "other"}, T0.format(7)),
    ]
    for eid, state, data, created in runs:
        # revision 0: no record moved them (verify compares the revision with the chain's transitions)
        row = list(entity_values(Entity("workflow", eid, state, 0, 0, audit.GENESIS, {}, created, created)))
        row[6] = json.dumps(data)  # as version 1 wrote it: NaN as the bare word NaN
        entities.append(tuple(row))
    return entities, records


def make_v1(backend: Backend) -> None:
    """Run version 1's statements by hand, then write version-1 rows."""
    entities, records = v1_rows()
    cols = "entity_type, entity_id, state, revision, seq, head_hash, data, created_at, updated_at, last_seen_at, "
    cols += "last_report_at, last_details"
    audit_cols = "id, entity_type, entity_id, seq, outcome, recorded_at, body"
    if backend.name == "sqlite":
        conn = sqlite3.connect(path_from_url(backend.url), isolation_level=None)
        try:
            conn.execute("BEGIN")
            conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
            for statement in sqlite_store.MIGRATIONS[1]:
                assert isinstance(statement, str)
                conn.execute(statement)
            conn.execute("INSERT INTO schema_version (version) VALUES (1)")
            conn.executemany(f"INSERT INTO entities ({cols}) VALUES ({','.join('?' * 12)})", entities)
            conn.executemany(f"INSERT INTO audit ({audit_cols}) VALUES ({','.join('?' * 7)})", records)
            conn.execute("COMMIT")
            # what made SQL JSON unusable for the filters: SQLite refuses the NaN row
            with pytest.raises(sqlite3.OperationalError, match="malformed JSON"):
                conn.execute("SELECT json_extract(data, '$.workflowId') FROM entities").fetchall()
        finally:
            conn.close()
        return
    with psycopg.connect(backend.url) as conn:
        conn.execute("CREATE TABLE schema_version (version integer NOT NULL)")
        for statement in pg_store.MIGRATIONS[1]:
            assert isinstance(statement, str)
            conn.execute(statement)
        conn.execute("INSERT INTO schema_version (version) VALUES (1)")
        with conn.cursor() as cur:
            cur.executemany(f"INSERT INTO entities ({cols}) VALUES ({','.join(['%s'] * 12)})", entities)
            cur.executemany(f"INSERT INTO audit ({audit_cols}) VALUES ({','.join(['%s'] * 7)})", records)
        conn.execute("SELECT setval('audit_ids', 4)")


def test_a_version_1_database_migrates_at_start_up(sql: Backend) -> None:
    make_v1(sql)

    async def scenario(store: Store) -> None:
        assert await sql.query("SELECT version FROM schema_version") == [(latest(sql),)]

        async def runs(**kw: Any) -> list[str]:
            return [e.entity_id for e in await store.list_entities(EntityQuery("workflow", by_created=True, **kw))]

        # existing runs were labelled, the NaN one included
        assert await runs(labels=(("workflowId", "wf-a"),), descending=True) == ["run-c", "run-a"]
        assert await runs(labels=(("agentId", "old"),)) == ["run-a", "run-b"]
        assert await runs(state="running") == ["run-a", "run-c"]
        [nan_run] = await store.list_entities(EntityQuery("workflow", labels=(("agentId", "old"),), state="running"))
        assert nan_run.entity_id == "run-a" and math.isnan(nan_run.data["score"])

        # ?at= over records written before version 2: no revision to seek by, so the replay answers
        agent = await store.get("agent", "old")
        assert agent is not None
        records = await chain(store, "old")
        assert all(row == (None,) for row in await sql.query("SELECT revision FROM audit"))
        for moment in moments_of(agent, records):
            assert await store.position_at("agent", "old", moment) in (None, Position(None, 0, None))
            assert await history.at(store, agent, "registered", moment, 3) == await history.replay(
                store, agent, "registered", moment, 3
            )

        # new records carry the revision: the seek answers from them, falling back only where it must
        await step(store, "old")  # idle -> active, revision 4
        refused = draft("old", "active", "registered", outcome="rejected")
        await store.apply(Change("agent", "old", record=refused))
        agent = await store.get("agent", "old")
        assert agent is not None and agent.revision == 4
        records = await chain(store, "old")
        assert await sql.query("SELECT seq, revision FROM audit WHERE revision IS NOT NULL ORDER BY seq") == [
            (5, 4),
            (6, 4),
        ]
        now = "2999-01-01T00:00:00.000000+00:00"
        position = await store.position_at("agent", "old", now)
        assert position is not None and position.revision == 4 and position.transition == records[4]
        for moment in moments_of(agent, records):
            fast = await history.at(store, agent, "registered", moment, 3)
            assert fast == await history.replay(store, agent, "registered", moment, 3)
        assert (await store.verify()).ok

        # a new run is labelled as it is created
        seed = Entity("workflow", "run-d", "pending", data={"workflowId": "wf-a", "agentId": "old"})
        await store.apply(Change("workflow", "run-d", create=seed))
        assert await runs(labels=(("workflowId", "wf-a"),), descending=True) == ["run-d", "run-c", "run-a"]

    run(sql, scenario)

    async def reopened(store: Store) -> None:  # opening a version-2 database again changes nothing
        assert await sql.query("SELECT version FROM schema_version") == [(latest(sql),)]
        assert await sql.query("SELECT count(*) FROM labels") == [(12,)]

    run(sql, reopened)


@pytest.mark.skipif(not PG_URL, reason="PostgreSQL half skipped: OPSCORE_TEST_DATABASE_URL is not set")
def test_postgresql_replicas_migrating_one_version_1_database_together_label_it_once() -> None:
    """Several replicas start on one version-1 schema: one migrates under the advisory lock, the rest wait."""
    from tests.pg import fresh_schema

    with fresh_schema(PG_URL) as url:
        _replicas_migrate(Backend("postgres", url))


def _replicas_migrate(sql: Backend) -> None:
    make_v1(sql)

    async def scenario() -> None:
        stores = [open_store(sql.url) for _ in range(4)]
        await asyncio.gather(*(s.open() for s in stores))
        for s in stores:
            await s.close()

    asyncio.run(scenario())

    async def check(store: Store) -> None:
        assert await sql.query("SELECT version FROM schema_version") == [(latest(sql),)]
        assert await sql.query("SELECT count(*) FROM labels") == [(9,)]

    sql.run(check)


def test_rows_without_a_revision_fall_back_to_the_replay(sql: Backend) -> None:
    """Records from before version 2 come first in a chain: wherever the answer needs one, replay."""

    async def scenario(store: Store) -> None:
        records = await build_history(store, "h")
        # the first 8 records as version 1 wrote them: the revision-2 transition (seq 6) among them
        await sql.execute("UPDATE audit SET revision = NULL WHERE seq <= 8")
        entity = await store.get("agent", "h")
        assert entity is not None
        sought = 0
        for moment in moments_of(entity, records):
            position = await store.position_at("agent", "h", moment)
            fast = await history.at(store, entity, "registered", moment, 3)
            assert fast == await history.replay(store, entity, "registered", moment, 3), moment
            last = max((r for r in records if r["recordedAt"] <= moment), key=lambda r: r["seq"], default=None)
            if last is not None and last["seq"] <= 8:
                assert position is None  # its own revision is unknown
            elif last is not None:
                sought += position is not None
        # seq 9 (a transition) and 11 (one) seek; seq 10 (metadata) needs the transition at seq 9: seeks too
        assert sought == 6

        await sql.execute("UPDATE audit SET revision = NULL WHERE seq = 9")
        position = await store.position_at("agent", "h", records[9]["recordedAt"])  # metadata after a v1 transition
        assert position is None
        assert await history.at(store, entity, "registered", records[9]["recordedAt"], 2) == await history.replay(
            store, entity, "registered", records[9]["recordedAt"], 2
        )

    run(sql, scenario)


def test_a_reader_opens_an_older_schema_and_refuses_an_unknown_one(sql: Backend) -> None:
    """``opscore audit verify``/``export`` open read-only and never migrate: version 1 is read as it is."""
    make_v1(sql)

    async def read() -> tuple[bool, int]:
        store = open_store(sql.url, readonly=True)
        await store.open()
        try:
            result = await store.verify()
            position = await store.position_at("agent", "old", "2999-01-01T00:00:00.000000+00:00")
            assert position is None
            return result.ok, result.records
        finally:
            await store.close()

    assert asyncio.run(read()) == (True, 4)

    async def served(store: Store) -> None:  # the reader left it at version 1; a server migrates it
        pass

    assert asyncio.run(_version(sql)) == 1
    sql.run(served)
    assert asyncio.run(_version(sql)) == latest(sql)
    asyncio.run(_set_version(sql, latest(sql) + 1))
    with pytest.raises(StorageError) as refused:
        asyncio.run(read())
    assert refused.value.code == "schema_mismatch"


async def _version(backend: Backend) -> int:
    return int((await backend.query("SELECT version FROM schema_version"))[0][0])


async def _set_version(backend: Backend, version: int) -> None:
    await backend.execute("UPDATE schema_version SET version = %s", (version,))


# -- the hot path writes what it wrote before ------------------------------------------------------


def _heads(statements: list[str]) -> list[str]:
    """Each statement's head (up to its column list or VALUES), once per run of repeats.

    SQLite traces a trigger's statements under the text of the statement that fired it.
    """
    heads = [s.split(" (")[0].split(" VALUES")[0] for s in statements]
    return [h for n, h in enumerate(heads) if n == 0 or heads[n - 1] != h]


def test_changes_without_labels_add_no_statement_on_sqlite(tmp_path: Path) -> None:
    """SQLite: plain agent changes are still deferred rows; only labelled changes touch ``labels``.

    A small batch is ONE autocommit statement (its own transaction); a large one is BEGIN,
    one multi-row INSERT of records per 64, one multi-row UPSERT of entities per 64, COMMIT.
    """
    statements: list[str] = []

    async def scenario() -> tuple[list[str], list[str], list[str]]:
        store = sqlite_store.SQLiteStore(str(tmp_path / "hot.db"))
        await store.open()
        try:
            assert store._wconn is not None
            for agent in ("a", "b0", "b1", "b2"):
                await step(store, agent)
            store._wconn.set_trace_callback(statements.append)
            changes = [Change("agent", "a", state=s, record=draft("a", "x", s)) for s in ("active", "idle") * 20]
            assert not any(isinstance(r, Exception) for r in await store.apply_many(changes))
            small = list(statements)  # 41 rows: 40 records, 1 entity
            statements.clear()
            changes = [
                Change("agent", f"b{n % 3}", state=s, record=draft(f"b{n % 3}", "x", s))
                for n, s in enumerate(("active",) * 3 + ("idle", "idle", "idle", "active", "active", "active") * 11)
            ]
            assert not any(isinstance(r, Exception) for r in await store.apply_many(changes))
            large = list(statements)  # 72 rows: 69 records, 3 entities
            statements.clear()
            seed = Entity("workflow", "w", "pending", data={"workflowId": "wf", "agentId": "a"})
            await store.apply(Change("workflow", "w", create=seed))
            labelled = list(statements)
        finally:
            await store.close()
        return small, large, labelled

    small, large, labelled = asyncio.run(scenario())
    assert _heads(small) == ["INSERT INTO batch_rows"]
    assert _heads(large) == ["BEGIN IMMEDIATE", "INSERT INTO audit", "INSERT INTO entities", "COMMIT"]
    assert not any("labels" in s or "('l'," in s for s in small + large)
    writes = [s for s in labelled if not s.startswith("SELECT")]  # the workflow was read first: not cached
    assert _heads(writes) == ["INSERT INTO batch_rows"]
    assert writes[0].count("('l',") == 3  # state, workflowId, agentId


def test_changes_without_labels_are_one_statement_on_postgresql() -> None:
    """PostgreSQL: the one write statement gains a labels CTE only when labels moved."""
    agent = Entity("agent", "a", "idle", 1, 1)
    record = {"id": 1, "entityType": "agent", "entityId": "a", "seq": 1, "outcome": "applied", "recordedAt": "t"}
    sql, params = pg_store._write(agent, record, None)
    assert "labels" not in sql and sql.count("INSERT") == 1 and sql.startswith("WITH a AS (INSERT INTO audit")
    assert params[7] == 1  # the record's revision column
    run_ = Entity("workflow", "w", "running", 2, 2, created_at="c")
    labels = [("workflow", "w", "state", "running", "c")]
    sql, params = pg_store._write(run_, record, None, labels=labels)
    assert "l AS (INSERT INTO labels" in sql and sql.count("INSERT") == 2
