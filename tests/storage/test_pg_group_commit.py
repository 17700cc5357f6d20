"""PostgreSQL's group commit (opscore/storage/pgwrite.py): per-change answers from one shared transaction.

Each test drives real stores on a fresh schema: a change that lost its compare-and-set to
another replica is refused alone while the rest of its batch commits, a change PostgreSQL
refuses is isolated (the others still commit), and when the connection is cut during the
batch's COMMIT every caller hears the truth, found out before any of them is answered.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import psycopg
import pytest

from opscore.engine import Context, Engine
from opscore.errors import RevisionConflict, Unavailable, Unstorable
from opscore.models import Change, Committed, Entity, TransitionResult
from opscore.storage.postgres import PostgresStore
from tests.conftest import PG_URL
from tests.storage.changes import agent_change
from tests.storage.test_pg_commit_outcome import proxied_store

pytestmark = pytest.mark.skipif(not PG_URL, reason="PostgreSQL half skipped: OPSCORE_TEST_DATABASE_URL is not set")


@pytest.fixture
def pg_url() -> Iterator[str]:
    from tests.pg import fresh_schema

    with fresh_schema(PG_URL) as url:
        yield url


def move(entity_id: str, state: str, revision: int, source: str | None = None) -> Change:
    """A change to ``state`` from ``source`` (default: the state the tests' walk was in at ``revision``)."""
    if source is None and revision > 0:
        source = "idle" if state == "active" else "active"
    return agent_change(entity_id, state, revision, source=source)


def chains(url: str) -> dict[str, list[int]]:
    """Each agent's record seqs, read beside the stores."""
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT entity_id, seq FROM audit ORDER BY entity_id, seq").fetchall()
    out: dict[str, list[int]] = {}
    for entity_id, seq in rows:
        out.setdefault(entity_id, []).append(int(seq))
    return out


def test_a_change_that_lost_its_race_to_another_replica_is_refused_alone(pg_url: str) -> None:
    async def scenario() -> None:
        mine, theirs = PostgresStore(pg_url), PostgresStore(pg_url)
        await mine.open()
        await theirs.open()
        try:
            first = await mine.apply_many([move(f"a{n}", "idle", 0) for n in range(5)])
            assert all(isinstance(c, Committed) for c in first)
            await theirs.apply(move("a2", "active", 1))  # the other replica moves a2 to revision 2
            batches = mine.batches
            answers = await mine.apply_many([move(f"a{n}", "active", 1) for n in range(5)])
            assert mine.batches == batches + 1  # the five went in one transaction
            assert isinstance(answers[2], RevisionConflict)
            assert answers[2].extra.get("revision") == 2
            for n in (0, 1, 3, 4):
                answer = answers[n]
                assert isinstance(answer, Committed) and answer.entity.revision == 2
            verified = await mine.verify()
            assert verified.ok, verified.problems
        finally:
            await mine.close()
            await theirs.close()
        assert chains(pg_url) == {"a0": [1, 2], "a1": [1, 2], "a2": [1, 2], "a3": [1, 2], "a4": [1, 2]}

    asyncio.run(scenario())


def test_a_change_decided_on_a_read_another_replica_moved_since_is_refused_alone(pg_url: str) -> None:
    """Decided on the engine's read (``Change.base``, no locked re-read): the UPDATE's compare-and-set
    on the base's revision and seq refuses the change whose entity moved, heartbeat or refusal alike."""

    async def scenario() -> None:
        mine, theirs = PostgresStore(pg_url), PostgresStore(pg_url)
        await mine.open()
        await theirs.open()
        try:
            await mine.apply_many([move(f"b{n}", "idle", 0) for n in range(4)])
            bases = await mine.get_many("agent", [f"b{n}" for n in range(4)])
            await theirs.apply(move("b1", "active", 1))  # moved after our read
            await theirs.apply(Change("agent", "b2", seen_at="2030-01-01T00:00:00.000000+00:00"))  # liveness only
            heartbeat = Change("agent", "b1", seen_at="2029-01-01T00:00:00.000000+00:00")
            changes = [
                replace(move("b0", "active", 1), base=bases[0]),
                replace(heartbeat, base=bases[1]),  # stale: b1 is active now, the heartbeat was for idle
                replace(move("b2", "active", 1), base=bases[2]),  # its revision and seq did not move
                replace(move("b3", "active", 1), base=bases[3]),
            ]
            answers = await mine.apply_many(changes)
            assert [type(a).__name__ for a in answers] == ["Committed", "RevisionConflict", "Committed", "Committed"]
            b1 = await mine.get("agent", "b1")
            b2 = await mine.get("agent", "b2")
            assert b1 is not None and (b1.state, b1.revision, b1.last_seen_at) == ("active", 2, None)
            assert b2 is not None and b2.state == "active"
            assert b2.last_seen_at == "2030-01-01T00:00:00.000000+00:00"  # times only move forward
            verified = await mine.verify()
            assert verified.ok, verified.problems
        finally:
            await mine.close()
            await theirs.close()
        assert chains(pg_url) == {"b0": [1, 2], "b1": [1, 2], "b2": [1, 2], "b3": [1, 2]}

    asyncio.run(scenario())


def test_a_report_decided_on_a_state_another_replica_changed_is_decided_again(pg_url: str) -> None:
    """Replica A reads ``idle``; replica B fails the agent (``error``) before A writes; the agent reports
    ``idle`` to A. Decided on A's read it is a heartbeat; the agent really recovered: A must apply
    ``recover`` from a fresh read, not keep it in ``error``."""
    ctx = Context(actor="key:test")

    async def scenario() -> None:
        mine, theirs = PostgresStore(pg_url), PostgresStore(pg_url)
        await mine.open()
        await theirs.open()
        ours, other = Engine(mine), Engine(theirs)
        try:
            await ours.report("agent", "r", "idle", ctx=ctx, create=Entity("agent", "r", "registered"))
            read = mine.get
            raced = False

            async def read_then_race(entity_type: str, entity_id: str) -> Entity | None:
                nonlocal raced
                found = await read(entity_type, entity_id)
                if not raced:
                    raced = True
                    await other.report("agent", "r", "error", ctx=ctx)
                return found

            mine.get = read_then_race  # type: ignore[method-assign]
            result = await ours.report("agent", "r", "idle", ctx=ctx)
            assert isinstance(result, TransitionResult)
            assert (result.previous_state, result.entity.state, result.changed) == ("error", "idle", True)
            assert result.record is not None and result.record["event"] == "recover"
            verified = await mine.verify()
            assert verified.ok, verified.problems
        finally:
            await mine.close()
            await theirs.close()
        assert chains(pg_url) == {"r": [1, 2, 3]}  # ready, fail, recover

    asyncio.run(scenario())


def test_two_replicas_racing_batches_on_the_same_entities_never_fork_a_chain(pg_url: str) -> None:
    """Both replicas submit batches on the same 20 agents; every change retried from a fresh read wins once."""

    async def scenario() -> None:
        stores = [PostgresStore(pg_url), PostgresStore(pg_url)]
        for store in stores:
            await store.open()
        applied = [0, 0]
        try:

            async def walk(r: int, store: PostgresStore) -> None:
                for step in range(15):
                    pending = {f"r{n}" for n in range(20)}
                    while pending:
                        ids = sorted(pending)
                        currents = await store.get_many("agent", ids)
                        changes = [
                            move(i, ("idle", "active")[step % 2], 0, None)
                            if c is None
                            else move(
                                i,
                                ("idle", "active")[step % 2]
                                if c.state != ("idle", "active")[step % 2]
                                else ("active", "idle")[step % 2],
                                c.revision,
                                c.state,
                            )
                            for i, c in zip(ids, currents, strict=True)
                        ]
                        for i, answer in zip(ids, await store.apply_many(changes), strict=True):
                            if isinstance(answer, Committed):
                                pending.discard(i)
                                applied[r] += 1
                            else:
                                assert isinstance(answer, RevisionConflict), answer

            await asyncio.gather(*(walk(r, s) for r, s in enumerate(stores)))
            verified = await stores[0].verify()
            assert verified.ok, verified.problems
        finally:
            for store in stores:
                await store.close()
        seqs = chains(pg_url)
        assert sum(len(s) for s in seqs.values()) == sum(applied) == 2 * 15 * 20
        assert all(s == list(range(1, len(s) + 1)) for s in seqs.values())  # gap-free, no fork

    asyncio.run(scenario())


def test_a_change_postgresql_refuses_fails_alone_and_the_rest_of_its_batch_commits(pg_url: str) -> None:
    async def scenario() -> None:
        store = PostgresStore(pg_url)
        await store.open()
        try:
            changes = [move("p0", "idle", 0), move("bad\x00id", "idle", 0), move("p2", "idle", 0)]
            answers = await store.apply_many(changes)
            assert isinstance(answers[1], Unstorable), answers[1]
            assert isinstance(answers[0], Committed) and isinstance(answers[2], Committed)
            assert await store.get("agent", "p0") is not None and await store.get("agent", "p2") is not None
            again = await store.apply(move("p0", "active", 1))  # the writer goes on
            assert again.entity.revision == 2
        finally:
            await store.close()
        assert chains(pg_url) == {"p0": [1, 2], "p2": [1]}

    asyncio.run(scenario())


def test_callers_of_a_batch_whose_commit_answer_was_lost_are_told_it_committed(pg_url: str) -> None:
    async def scenario() -> None:
        async with proxied_store(pg_url) as (store, proxy):
            await store.apply_many([move(f"c{n}", "idle", 0) for n in range(4)])
            proxy.cut_after = b"COMMIT"
            answers = await store.apply_many([move(f"c{n}", "active", 1) for n in range(4)])
            assert proxy.cuts == 1
            assert all(isinstance(a, Committed) and a.entity.revision == 2 for a in answers), answers
            verified = await store.verify()
            assert verified.ok, verified.problems
        assert chains(pg_url) == {f"c{n}": [1, 2] for n in range(4)}

    asyncio.run(scenario())


def test_callers_of_a_batch_cut_before_commit_are_told_it_did_not_commit(pg_url: str) -> None:
    async def scenario() -> None:
        async with proxied_store(pg_url) as (store, proxy):
            await store.apply_many([move(f"d{n}", "idle", 0) for n in range(4)])
            proxy.cut_before = b"UPDATE entities"
            answers = await store.apply_many([move(f"d{n}", "active", 1) for n in range(4)])
            assert proxy.cuts == 1
            assert all(isinstance(a, Unavailable) for a in answers), answers
            retried = await store.apply_many([move(f"d{n}", "active", 1) for n in range(4)])  # nothing had committed
            assert all(isinstance(a, Committed) and a.entity.revision == 2 for a in retried), retried
        assert chains(pg_url) == {f"d{n}": [1, 2] for n in range(4)}

    asyncio.run(scenario())


def test_every_answer_is_given_after_its_commit(pg_url: str) -> None:
    """As each caller hears back, another connection already sees its change."""

    async def scenario() -> None:
        store = PostgresStore(pg_url)
        await store.open()
        seen: list[bool] = []
        try:
            with psycopg.connect(pg_url, autocommit=True) as side:

                async def one(n: int) -> None:
                    await store.apply(move(f"v{n}", "idle", 0))
                    row = side.execute("SELECT count(*) FROM audit WHERE entity_id = %s", (f"v{n}",)).fetchone()
                    seen.append(row is not None and row[0] == 1)

                await asyncio.gather(*(one(n) for n in range(50)))
            assert store.batches < 50  # they shared transactions
        finally:
            await store.close()
        assert seen == [True] * 50

    asyncio.run(scenario())


def test_reads_waiting_together_share_one_query_and_see_every_answered_commit(pg_url: str) -> None:
    async def scenario() -> None:
        store = PostgresStore(pg_url)
        await store.open()
        try:
            await store.apply_many([move(f"g{n}", "idle", 0) for n in range(40)])
            queries: list[int] = []
            fetch = store._reads._fetch

            async def counted(keys: list[tuple[str, str]]) -> dict[tuple[str, str], Entity]:
                queries.append(len(keys))
                found: dict[tuple[str, str], Entity] = await fetch(keys)
                return found

            store._reads._fetch = counted
            got = await asyncio.gather(*(store.get("agent", f"g{n}") for n in range(40)), store.get("agent", "nobody"))
            assert [None if g is None else g.entity_id for g in got] == [f"g{n}" for n in range(40)] + [None]
            assert len(queries) < 5 and sum(queries) == 41, queries
            for n in range(5):  # a read that starts after a commit was answered sees it
                committed = await store.apply(move(f"g{n}", "active", 1))
                seen = await store.get("agent", f"g{n}")
                assert seen is not None and seen.revision == committed.entity.revision == 2
        finally:
            await store.close()

    asyncio.run(scenario())


def test_the_stream_never_passes_a_record_whose_transaction_is_still_open(pg_url: str) -> None:
    """A record with a LOWER id that commits LATER is still delivered, once: positions follow commit order."""

    async def scenario() -> None:
        from opscore.models import AuditQuery

        store = PostgresStore(pg_url)
        await store.open()
        try:
            await store.apply(move("s0", "idle", 0))
            head = await store.stream_head()
            late = psycopg.connect(pg_url)  # a transaction of its own, left open
            try:
                late.execute(
                    "INSERT INTO audit (id, entity_type, entity_id, seq, outcome, recorded_at, body) "
                    "VALUES (nextval('audit_ids'), 'agent', 'late', 1, 'applied', '2026-01-01', '{\"late\":1}')"
                )
                await store.apply(move("s1", "idle", 0))  # a higher id, committed first
                page = await store.stream_page(head, AuditQuery(limit=100))
                assert page == []  # served only once everything older has finished
                late.commit()
            finally:
                late.close()
            for _ in range(200):  # another transaction anywhere in the cluster may hold the horizon a moment
                page = await store.stream_page(head, AuditQuery(limit=100))
                if len(page) == 2:
                    break
                await asyncio.sleep(0.05)
            texts = [text for _, text in page]
            assert len(texts) == 2 and texts[0] == '{"late":1}' and '"s1"' in texts[1]
            assert await store.stream_page(page[-1][0], AuditQuery(limit=100)) == []
            assert await store.stream_head() == page[-1][0]
        finally:
            await store.close()

    asyncio.run(scenario())


def test_a_pooled_connection_never_keeps_a_generic_plan(pg_url: str) -> None:
    """The group writer's statements are planned for each run, so a plan made on a small table never outlives it.

    psycopg prepares a statement from its fifth run; PostgreSQL would then reuse a generic plan,
    and the one made while ``entities`` was small scans the whole table (docs/performance.md).
    One pooled connection runs every batch here; ``pg_prepared_statements`` counts the plans.
    """

    async def scenario() -> list[tuple[str, int, int]]:
        store = PostgresStore(pg_url, min_size=1, max_size=1, in_flight=1)
        await store.open()
        try:
            for revision in range(12):
                state = "idle" if revision % 2 == 0 else "active"
                answers = await store.apply_many([move(f"p{n}", state, revision) for n in range(4)])
                assert all(isinstance(a, Committed) for a in answers), answers
            assert store._pool is not None
            async with store._pool.connection() as conn:
                rows = await (
                    await conn.execute("SELECT statement, generic_plans, custom_plans FROM pg_prepared_statements")
                ).fetchall()
        finally:
            await store.close()
        return [(str(s), int(g), int(c)) for s, g, c in rows]

    plans = asyncio.run(scenario())
    batched = [p for p in plans if "json_to_recordset" in p[0]]  # the group writer's update with its records
    assert batched and all(custom >= 1 for _, _, custom in batched)  # prepared, and run several times
    assert [p for p in plans if p[1]] == []


def test_a_batch_probes_the_rows_it_names_instead_of_scanning_entities(pg_url: str) -> None:
    """The batch statements find their rows in ``entities`` by index, whatever the table's size.

    PostgreSQL cannot see into a ``json_to_recordset`` parameter and assumes 100 rows; on a
    table of a few thousand entities it then hash-joins a sequential scan of all of them, once
    per batch (docs/performance.md, "A hundred rows assumed"). The lock and the update say how
    many rows they carry, the read names its ids as an array; EXPLAIN, with the parameters a
    batch of three sends, must show no scan of ``entities``.
    """
    from opscore.storage import postgres

    keys = json.dumps([{"t": "agent", "i": f"e{n}"} for n in (7, 1500, 4999)])
    row = dict.fromkeys(("d", "caps", "ld")) | {"s": "idle", "r": 2, "q": 2, "h": "h", "rw": 1, "sq": 1}
    times = dict.fromkeys(("u", "ls", "lr"), "2026")
    update = json.dumps([{"t": "agent", "i": f"e{n}", **row, **times} for n in (7, 1500, 4999)])
    statements = {
        "read": (postgres._SELECT_IDS, ("agent", json.dumps(["e7", "e1500", "e4999"]))),
        "lock": (postgres._LOCK_MANY, (keys, 3)),
        "update": (postgres._UPDATE_AND_AUDIT_MANY, (update, 3, "[]")),
    }

    async def scenario() -> dict[str, list[str]]:
        store = PostgresStore(pg_url, min_size=1, max_size=1)
        await store.open()
        try:
            assert store._pool is not None
            async with store._pool.connection() as conn:
                await conn.execute(
                    "INSERT INTO entities (entity_type, entity_id, state, revision, seq, head_hash, data, created_at, "
                    "updated_at, last_details) SELECT 'agent', 'e' || n, 'active', 1, 1, 'h', '{}', '2026', '2026', "
                    "'{}' FROM generate_series(0, 4999) AS n"
                )
                await conn.execute("ANALYZE entities")
                scans: dict[str, list[str]] = {}
                async with conn.transaction(force_rollback=True):
                    for name, (statement, params) in statements.items():
                        row = await (await conn.execute("EXPLAIN (FORMAT JSON) " + statement, params)).fetchone()
                        assert row is not None
                        scans[name] = [n["Node Type"] for n in plan_nodes(row[0][0]["Plan"])
                                       if n.get("Relation Name") == "entities"]  # fmt: skip
                return scans
        finally:
            await store.close()

    scans = asyncio.run(scenario())
    assert all(nodes for nodes in scans.values()), scans  # each statement reads entities ...
    assert {name: [n for n in nodes if n == "Seq Scan"] for name, nodes in scans.items()} == {
        name: [] for name in statements
    }  # ... through its primary key


def plan_nodes(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node.get("Plans", []):
        yield from plan_nodes(child)


def test_reads_that_wait_together_find_each_entity_of_every_type(pg_url: str) -> None:
    """The coalesced read asks once per entity type; mixed types, missing ids and odd ids all answer right."""
    ids = ["a1", "a2", "ä ' \\ \" x", "missing"]

    async def scenario() -> list[Entity | None]:
        store = PostgresStore(pg_url)
        await store.open()
        try:
            assert store._pool is not None
            async with store._pool.connection() as conn:
                for entity_type, entity_id in [("agent", i) for i in ids[:3]] + [("task", "a1")]:
                    await conn.execute(
                        "INSERT INTO entities (entity_type, entity_id, state, revision, seq, head_hash, data, "
                        "created_at, updated_at, last_details) VALUES (%s, %s, %s, 1, 1, 'h', '{}', '2026', '2026', "
                        "'{}')",
                        (entity_type, entity_id, f"{entity_type}-state"),
                    )
            keys = [("agent", i) for i in ids] + [("task", "a1"), ("task", "a2")]
            return list(await asyncio.gather(*(store.get(t, i) for t, i in keys)))
        finally:
            await store.close()

    found = asyncio.run(scenario())
    assert [(e.entity_type, e.entity_id, e.state) if e else None for e in found] == [
        ("agent", "a1", "agent-state"),
        ("agent", "a2", "agent-state"),
        ("agent", "ä ' \\ \" x", "agent-state"),
        None,
        ("task", "a1", "task-state"),
        None,
    ]


class Watched:
    """The store's real batch commit, watched: the most batches in flight at once, and any entity two held."""

    def __init__(self, store: PostgresStore) -> None:
        self.commit = store._writer._commit
        self.flying: list[set[tuple[str, str]]] = []
        self.peak = 0
        self.shared: list[tuple[str, str]] = []
        store._writer._commit = self

    async def __call__(self, changes: list[Change]) -> Any:
        keys = {(c.entity_type, c.entity_id) for c in changes}
        for other in self.flying:
            self.shared += sorted(keys & other)
        self.flying.append(keys)
        self.peak = max(self.peak, len(self.flying))
        try:
            return await self.commit(changes)
        finally:
            self.flying.remove(keys)


def test_full_batches_go_out_side_by_side_and_never_share_an_entity(pg_url: str) -> None:
    """A backlog of full batches (``max_batch`` 10 here) keeps two in flight; a change queued behind
    its entity's batch in flight waits for that batch, and every chain stays gap-free."""

    async def scenario() -> tuple[list[Any], Watched]:
        store = PostgresStore(pg_url, max_batch=10, in_flight=2)
        await store.open()
        watched = Watched(store)
        revisions = dict.fromkeys((f"w{n}" for n in range(20)), 0)

        def next_move(agent: str) -> Change:
            revision = revisions[agent]
            revisions[agent] += 1
            return move(agent, "idle" if revision % 2 == 0 else "active", revision)

        try:
            answers: list[Any] = []
            for _ in range(6):
                changes = [next_move(f"w{n}") for n in range(20)] + [next_move("w0")]  # w0 twice
                answers += await asyncio.gather(*(store.apply(c) for c in changes))
            return answers, watched
        finally:
            await store.close()

    answers, watched = asyncio.run(scenario())
    assert all(isinstance(a, Committed) for a in answers), [a for a in answers if not isinstance(a, Committed)]
    assert watched.peak == 2  # two full batches were in flight at once
    assert watched.shared == []  # never the same entity in both
    assert chains(pg_url) == {"w0": list(range(1, 13)), **{f"w{n}": list(range(1, 7)) for n in range(1, 20)}}


def test_batches_that_are_not_full_go_out_one_at_a_time(pg_url: str) -> None:
    """Below ``max_batch``, changes that arrive while a batch is in flight wait for it and form the next
    (a second batch beside every batch halved them under state reports: docs/performance.md)."""

    async def scenario() -> Watched:
        store = PostgresStore(pg_url, in_flight=2)
        await store.open()
        watched = Watched(store)
        try:
            for revision in range(6):
                state = "idle" if revision % 2 == 0 else "active"
                first = [asyncio.ensure_future(store.apply(move(f"w{n}", state, revision))) for n in range(10)]
                await asyncio.sleep(0)  # they are queued ...
                while store._writer._queue.qsize():  # ... until the writer has taken them into its batch
                    await asyncio.sleep(0)
                second = [asyncio.ensure_future(store.apply(move(f"w{n}", state, revision))) for n in range(10, 20)]
                answers = await asyncio.gather(*first, *second)
                assert all(isinstance(a, Committed) for a in answers)
            return watched
        finally:
            await store.close()

    assert asyncio.run(scenario()).peak == 1
    assert chains(pg_url) == {f"w{n}": list(range(1, 7)) for n in range(20)}


@pytest.mark.parametrize("bad", ["bad\x00id", "bad\ud800id"], ids=["nul", "lone-surrogate"])
def test_an_unstorable_id_in_a_coalesced_read_fails_only_its_own_reader(pg_url: str, bad: str) -> None:
    """Reads that arrive together share one query; a key PostgreSQL cannot take fails its reader, not the others.

    The API refuses such ids before the store (``opscore.inputs``); the store must not rely on it:
    one caller's key would otherwise fail every read that joined its batch.
    """

    async def scenario() -> None:
        store = PostgresStore(pg_url)
        await store.open()
        try:
            await store.apply_many([move("r0", "idle", 0), move("r2", "idle", 0)])
            answers = await asyncio.gather(
                store.get("agent", "r0"), store.get("agent", bad), store.get("agent", "r2"), store.get("agent", "none"),
                return_exceptions=True,
            )  # fmt: skip
            assert isinstance(answers[1], Unstorable), answers[1]
            assert isinstance(answers[0], Entity) and answers[0].state == "idle"
            assert isinstance(answers[2], Entity) and answers[2].state == "idle"
            assert answers[3] is None
            with pytest.raises(Unstorable):
                await store.get_many("agent", ["r0", bad])
            assert (await store.get("agent", "r0")) is not None  # the reads go on
            written = await store.apply_many([move("r3", "idle", 0), move(bad, "idle", 0)])
            assert isinstance(written[0], Committed) and isinstance(written[1], Unstorable), written
        finally:
            await store.close()

    asyncio.run(scenario())
