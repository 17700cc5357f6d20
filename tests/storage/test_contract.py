"""The storage contract, once, for every backend (memory, SQLite, PostgreSQL).

What the engine relies on: one atomic write per change, compare-and-set on the revision,
gap-free ``seq`` and an intact hash chain per entity, refused requests recorded without
moving the revision, heartbeats without records, idempotency keys used once, filters and
keyset pages that agree across backends, verification that finds tampering, immutable
definitions, leased timers, webhook replay memory, and no lost update under concurrency.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from opscore import audit
from opscore.errors import Conflict, Invalid, RevisionConflict, UnknownEntity
from opscore.models import AuditQuery, Change, Committed, Entity, EntityQuery, IdempotencyEntry, Timer
from opscore.storage import Store
from tests.storage.conftest import Backend

NEXT = {"registered": "idle", "idle": "active", "active": "idle"}


def draft(
    entity_id: str, source: str, dest: str | None, *, outcome: str = "applied", entity_type: str = "agent"
) -> dict[str, Any]:
    return audit.draft(
        entity_type=entity_type,
        entity_id=entity_id,
        event="go",
        source=source,
        dest=dest,
        outcome=outcome,
        reason=None if outcome == "applied" else "illegal_transition",
        actor="key:test",
        request_id=None,
        details={"note": "ünïcode ✓", "n": 1.5, "nul": "a\u0000b"},
        reported_at=None,
    )


async def step(store: Store, entity_id: str, *, entity_type: str = "agent", **extra: Any) -> Committed:
    """One applied transition along NEXT, compare-and-set on the revision just read."""
    current = await store.get(entity_type, entity_id)
    seed = Entity(entity_type, entity_id, "registered") if current is None else None
    base = current or seed
    assert base is not None
    dest = NEXT[base.state]
    return await store.apply(
        Change(
            entity_type,
            entity_id,
            create=seed,
            expected_revision=base.revision,
            state=dest,
            record=draft(entity_id, base.state, dest, entity_type=entity_type),
            **extra,
        )
    )


async def chain(store: Store, entity_id: str, entity_type: str = "agent") -> list[dict[str, Any]]:
    return await store.list_audit(AuditQuery(entity_type=entity_type, entity_id=entity_id, limit=1000))


def assert_chain(records: list[dict[str, Any]]) -> None:
    """seq 1..n without gaps, each prevHash the hash before it, each hash the record's digest."""
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
    prev = audit.GENESIS
    for r in records:
        assert r["prevHash"] == prev
        assert r["hash"] == audit.digest(r)
        prev = r["hash"]


# -- writes -------------------------------------------------------------------------------


def test_create_apply_and_compare_and_set(backend: Backend) -> None:
    async def scenario(store: Store) -> None:
        first = await step(store, "a1")
        assert first.created is True
        assert (first.entity.state, first.entity.revision, first.entity.seq) == ("idle", 1, 1)
        assert first.record is not None and first.record["prevHash"] == audit.GENESIS
        assert first.entity.head_hash == first.record["hash"]
        assert await store.get("agent", "a1") == first.entity

        stale = Change("agent", "a1", expected_revision=0, state="active", record=draft("a1", "registered", "active"))
        with pytest.raises(RevisionConflict):
            await store.apply(stale)
        assert await store.get("agent", "a1") == first.entity
        assert len(await chain(store, "a1")) == 1

        second = await step(store, "a1")
        assert (second.entity.state, second.entity.revision, second.entity.seq) == ("active", 2, 2)
        assert second.created is False
        assert second.record is not None and second.record["id"] > first.record["id"]

        with pytest.raises(UnknownEntity):
            await store.apply(Change("agent", "nobody", state="idle", record=draft("nobody", "registered", "idle")))
        assert await store.get("agent", "nobody") is None
        assert await store.list_audit(AuditQuery(entity_id="nobody")) == []

    backend.run(scenario)


def test_create_without_record_and_metadata_merge(backend: Backend) -> None:
    async def scenario(store: Store) -> None:
        seed = Entity("agent", "a1", "registered", data={"agentName": "one"})
        made = await store.apply(Change("agent", "a1", create=seed, data={"agentName": "one"}))
        assert made.created and made.record is None and made.entity.revision == 0
        again = await store.apply(Change("agent", "a1", create=seed, data={"version": "2"}))
        assert not again.created
        assert again.entity.data == {"agentName": "one", "version": "2"}
        assert again.entity.state == "registered"
        assert (await store.get("agent", "a1")) == again.entity
        assert await chain(store, "a1") == []

    backend.run(scenario)


def test_expected_data_is_a_compare_and_set_on_metadata(backend: Backend) -> None:
    """A data-only write moves no revision, so ``expected_data`` is what makes it a CAS."""

    async def scenario(store: Store) -> None:
        seed = Entity("agent", "a1", "registered", data={"agentName": "one"})
        await store.apply(Change("agent", "a1", create=seed))
        won = await store.apply(Change("agent", "a1", expected_data={"claim": None}, data={"claim": "x"}))
        assert won.entity.data == {"agentName": "one", "claim": "x"} and won.entity.revision == 0
        for lost in (
            Change("agent", "a1", expected_data={"claim": None}, data={"claim": "y"}),
            Change("agent", "a1", expected_data={"claim": "x", "agentName": "two"}, data={"claim": "y"}),
            Change("agent", "a1", expected_revision=1, expected_data={"claim": "x"}, data={"claim": "y"}),
        ):
            with pytest.raises(RevisionConflict):
                await store.apply(lost)
        assert (await store.get("agent", "a1")) == won.entity
        moved = await store.apply(
            Change("agent", "a1", expected_revision=0, expected_data={"claim": "x"}, data={"claim": "y"})
        )
        assert moved.entity.data["claim"] == "y"
        assert await chain(store, "a1") == []

    backend.run(scenario)


def test_seq_is_gap_free_and_every_chain_links(backend: Backend) -> None:
    async def scenario(store: Store) -> None:
        for i in range(21):
            await step(store, f"a{i % 3}")
        await step(store, "w1", entity_type="workflow")
        for eid in ("a0", "a1", "a2"):
            records = await chain(store, eid)
            assert len(records) == 7
            assert_chain(records)
            entity = await store.get("agent", eid)
            assert entity is not None and (entity.seq, entity.head_hash) == (7, records[-1]["hash"])
        everything = await store.list_audit(AuditQuery(limit=1000))
        assert len(everything) == 22
        ids = [r["id"] for r in everything]
        assert ids == sorted(ids) and len(set(ids)) == 22
        result = await store.verify()
        assert result.ok, result.problems
        assert (result.entities, result.records) == (4, 22)

    backend.run(scenario)


def test_rejected_records_extend_the_chain_but_not_the_revision(backend: Backend) -> None:
    async def scenario(store: Store) -> None:
        await step(store, "a1")
        refused = await store.apply(
            Change(
                "agent",
                "a1",
                seen_at="2030-01-01T00:00:00.000000+00:00",
                record=draft("a1", "idle", "error", outcome="rejected"),
            )
        )
        assert refused.record is not None and refused.record["outcome"] == "rejected"
        assert (refused.entity.state, refused.entity.revision, refused.entity.seq) == ("idle", 1, 2)
        applied = await step(store, "a1")
        assert (applied.entity.revision, applied.entity.seq) == (2, 3)
        assert_chain(await chain(store, "a1"))
        outcomes = [r["outcome"] for r in await chain(store, "a1")]
        assert outcomes == ["applied", "rejected", "applied"]

    backend.run(scenario)


def test_heartbeats_write_no_record_and_times_only_move_forward(backend: Backend) -> None:
    async def scenario(store: Store) -> None:
        first = await step(store, "a1")
        t1, t2 = "2030-01-01T00:00:01.000000+00:00", "2030-01-01T00:00:02.000000+00:00"
        beat = await store.apply(Change("agent", "a1", seen_at=t2, report_at=t2, details={"load": 3}))
        assert beat.record is None
        assert (beat.entity.revision, beat.entity.seq, beat.entity.head_hash) == (1, 1, first.entity.head_hash)
        assert (beat.entity.last_seen_at, beat.entity.last_report_at) == (t2, t2)
        older = await store.apply(Change("agent", "a1", seen_at=t1, report_at=t1))
        assert (older.entity.last_seen_at, older.entity.last_report_at) == (t2, t2)
        assert older.entity.last_details == {"load": 3}
        stored = await store.get("agent", "a1")
        assert stored == older.entity
        assert len(await chain(store, "a1")) == 1

    backend.run(scenario)


def test_idempotency_key_is_stored_with_the_write_and_used_once(backend: Backend) -> None:
    async def scenario(store: Store) -> None:
        answer = IdempotencyEntry("agent:a1", "k1", "fp", 200, {"state": "idle", "auditId": None})
        done = await step(store, "a1", idempotency=answer)
        assert done.record is not None
        saved = await store.get_idempotency("agent:a1", "k1")
        assert saved == IdempotencyEntry("agent:a1", "k1", "fp", 200, {"state": "idle", "auditId": done.record["id"]})
        assert await store.get_idempotency("agent:a1", "other") is None
        assert await store.get_idempotency("agent:a2", "k1") is None

        with pytest.raises(Conflict) as refused:
            await step(store, "a1", idempotency=answer)
        assert refused.value.code == "idempotency_key_in_use"
        entity = await store.get("agent", "a1")
        assert entity is not None and (entity.revision, entity.seq) == (1, 1)
        assert len(await chain(store, "a1")) == 1

        same_key_elsewhere = IdempotencyEntry("agent:a2", "k1", "fp", 200, {"state": "idle"})
        await step(store, "a2", idempotency=same_key_elsewhere)
        assert (await store.get_idempotency("agent:a2", "k1")) == same_key_elsewhere

    backend.run(scenario)


def test_purge_drops_old_idempotency_answers_and_keeps_fresh_ones(backend: Backend) -> None:
    async def scenario(store: Store) -> None:
        answer = IdempotencyEntry("agent:a1", "k1", "fp", 200, {"state": "idle"})
        await step(store, "a1", idempotency=answer)
        assert await store.purge_idempotency() == 0  # younger than the 48 h it is kept
        assert await store.get_idempotency("agent:a1", "k1") == answer
        await asyncio.sleep(0.05)
        assert await store.purge_idempotency(older_than=0.01) == 1
        assert await store.get_idempotency("agent:a1", "k1") is None
        entity = await store.get("agent", "a1")
        assert entity is not None and entity.revision == 1  # the write it answered stays

    backend.run(scenario)


# -- reads --------------------------------------------------------------------------------


def test_list_entities_filters_and_pages(backend: Backend) -> None:
    ids = ["a-1", "a1", "a10", "a2", "B1", "b1", "ab"]

    async def scenario(store: Store) -> None:
        for n, eid in enumerate(ids):
            data = {"capabilities": ["search", "write"] if n % 2 == 0 else ["search"]}
            await store.apply(Change("agent", eid, create=Entity("agent", eid, "registered", data=data), data=data))
        await store.apply(Change("workflow", "a-wf", create=Entity("workflow", "a-wf", "pending")))
        for eid in ("a1", "b1"):
            await step(store, eid)
        await store.apply(Change("agent", "a10", seen_at="2030-01-01T00:00:00.000000+00:00"))
        await store.apply(Change("agent", "a2", seen_at="2030-06-01T00:00:00.000000+00:00"))

        async def names(**kw: Any) -> list[str]:
            return [e.entity_id for e in await store.list_entities(EntityQuery("agent", **kw))]

        assert await names() == sorted(ids)
        assert await names(state="idle") == ["a1", "b1"]
        assert await names(state="registered") == sorted(set(ids) - {"a1", "b1"})
        assert await names(capability="write") == sorted(ids[0::2])
        assert await names(capability="search") == sorted(ids)
        assert await names(capability="sear") == []
        assert await names(id_prefix="a") == ["a-1", "a1", "a10", "a2", "ab"]
        assert await names(id_prefix="a1") == ["a1", "a10"]
        assert await names(id_prefix="a%") == []
        assert await names(seen_before="2030-03-01T00:00:00.000000+00:00") == sorted(set(ids) - {"a2"})
        assert await names(seen_before="2000-01-01T00:00:00.000000+00:00") == sorted(set(ids) - {"a2", "a10"})
        assert await names(state="registered", capability="write", id_prefix="a") == ["a-1", "a10", "ab"]

        pages, after = [], None
        while True:
            page = await names(limit=2, after_id=after)
            if not page:
                break
            pages.append(page)
            after = page[-1]
        assert [eid for page in pages for eid in page] == sorted(ids)
        assert all(len(p) == 2 for p in pages[:-1])
        assert [e.entity_id for e in await store.list_entities(EntityQuery("workflow"))] == ["a-wf"]

    backend.run(scenario)


def test_list_audit_filters_and_keyset_order(backend: Backend) -> None:
    async def scenario(store: Store) -> None:
        for i in range(12):
            await step(store, f"a{i % 3}")
        await store.apply(Change("agent", "a0", record=draft("a0", "active", "error", outcome="rejected")))
        await step(store, "w1", entity_type="workflow")
        everything = await store.list_audit(AuditQuery(limit=1000))
        ids = [r["id"] for r in everything]
        assert len(ids) == 14 and ids == sorted(ids)

        async def page_ids(**kw: Any) -> list[int]:
            return [r["id"] for r in await store.list_audit(AuditQuery(**kw))]

        assert await page_ids(descending=True, limit=1000) == ids[::-1]
        for descending in (False, True):
            walked: list[int] = []
            after = None
            while page := await page_ids(descending=descending, after_id=after, limit=5):
                walked += page
                after = page[-1]
            assert walked == (ids[::-1] if descending else ids)

        assert {r["entityType"] for r in await store.list_audit(AuditQuery(entity_type="workflow"))} == {"workflow"}
        assert len(await page_ids(entity_type="agent", limit=1000)) == 13
        assert [r["entityId"] for r in await store.list_audit(AuditQuery(entity_id="a1"))] == ["a1"] * 4
        assert len(await page_ids(entity_ids=("a1", "a2"), limit=1000)) == 8
        rejected = await store.list_audit(AuditQuery(outcome="rejected"))
        assert [(r["entityId"], r["outcome"]) for r in rejected] == [("a0", "rejected")]
        middle = everything[5]["recordedAt"], everything[9]["recordedAt"]
        window = await store.list_audit(AuditQuery(since=middle[0], until=middle[1], limit=1000))
        assert [r["id"] for r in window] == [r["id"] for r in everything if middle[0] <= r["recordedAt"] <= middle[1]]
        assert {5, 9} <= {i for i, r in enumerate(everything) if r in window}
        assert (
            await page_ids(entity_id="a1", descending=True, limit=2)
            == [r["id"] for r in everything if r["entityId"] == "a1"][::-1][:2]
        )
        assert everything == await store.list_audit(AuditQuery(limit=1000))  # reads are stable

    backend.run(scenario)


# -- verification ---------------------------------------------------------------------------


def test_verify_passes_on_an_empty_store(backend: Backend) -> None:
    result = backend.run(lambda store: store.verify())
    assert result.ok and (result.entities, result.records) == (0, 0)


def test_verify_detects_an_edited_record(backend: Backend) -> None:
    async def scenario(store: Store) -> audit.Verification:
        for _ in range(3):
            await step(store, "a1")
        await step(store, "a2")
        assert (await store.verify()).ok
        second = (await chain(store, "a1"))[1]
        await backend.tamper_body(store, second["id"], {"dest": "error"})
        return await store.verify()

    result = backend.run(scenario)
    assert not result.ok
    # the hash gives the edit away, and the replay the chain no longer makes sense of after it
    assert [(p.entity_id, p.seq) for p in result.problems] == [("a1", 2), ("a1", 3)]
    assert "hash does not match" in result.problems[0].problem
    assert "source" in result.problems[1].problem and "'error'" in result.problems[1].problem


def test_verify_detects_a_deleted_tail(backend: Backend) -> None:
    async def scenario(store: Store) -> audit.Verification:
        for _ in range(3):
            await step(store, "a1")
        last = (await chain(store, "a1"))[-1]
        await backend.delete_record(store, last["id"])
        return await store.verify()

    result = backend.run(scenario)
    assert not result.ok
    assert [(p.entity_id, p.problem) for p in result.problems] == [
        ("a1", "entity head is at seq 3 but the chain ends at 2"),
        ("a1", "entity state is 'idle' but its chain replays to 'active'"),
        ("a1", "entity revision is 3 but its chain holds 2 transitions"),
    ]


# -- workflows: definitions and timers ------------------------------------------------------


def test_definitions_are_immutable_per_version(backend: Backend) -> None:
    v1 = {"id": "wf", "version": "1", "name": "Two steps", "tasks": [{"taskId": "t1", "parameters": {"b": 1, "a": 2}}]}
    v1_reordered = {
        "tasks": [{"parameters": {"a": 2, "b": 1}, "taskId": "t1"}],
        "name": "Two steps",
        "version": "1",
        "id": "wf",
    }
    v2 = {**v1, "version": "2", "name": "Two steps, again"}

    async def scenario(store: Store) -> None:
        assert await store.get_definition("wf") is None
        assert await store.put_definition("wf", "1", v1) is True
        assert await store.put_definition("wf", "1", v1_reordered) is False
        with pytest.raises(Conflict) as refused:
            await store.put_definition("wf", "1", {**v1, "name": "changed"})
        assert refused.value.code == "definition_exists"
        assert await store.get_definition("wf", "1") == v1
        assert await store.put_definition("wf", "2", v2) is True
        assert await store.get_definition("wf") == v2
        assert await store.get_definition("wf", "1") == v1
        assert await store.get_definition("wf", "3") is None
        await store.put_definition("other", "1", {"id": "other"})
        assert await store.list_definitions() == [v1, v2, {"id": "other"}]

    backend.run(scenario)


def test_timers_are_armed_with_a_change_claimed_leased_replaced_and_cancelled(backend: Backend) -> None:
    past, later, future = (
        "2020-01-01T00:00:00.000000+00:00",
        "2020-01-01T00:00:05.000000+00:00",
        "2999-01-01T00:00:00.000000+00:00",
    )
    now = "2026-01-01T00:00:00.000000+00:00"
    t_due = Timer("deadline:t1:1", past, "task_deadline", "task", "t1", {"attempt": 1})
    t_due2 = Timer("deadline:t2:1", later, "task_deadline", "task", "t2", {"attempt": 1})
    t_future = Timer("deadline:t3:1", future, "task_deadline", "task", "t3", {})

    async def scenario(store: Store) -> None:
        await step(store, "t1", entity_type="task", timers=(t_due, t_due2, t_future))
        assert await store.list_timers() == [t_due, t_due2, t_future]
        assert await store.list_timers("task", "t2") == [t_due2]
        assert await store.list_timers("agent") == []

        assert await store.claim_timers(now, limit=1, lease_seconds=60) == [t_due]
        assert await store.claim_timers(now, limit=10, lease_seconds=60) == [t_due2]
        assert await store.claim_timers(now, limit=10, lease_seconds=60) == []  # both leased

        await store.finish_timer("deadline:t1:1")
        await store.finish_timer("no-such-timer")
        assert await store.list_timers() == [t_due2, t_future]

        # Arming a key again replaces the timer and drops its lease.
        moved = Timer("deadline:t2:1", past, "task_deadline", "task", "t2", {"attempt": 2})
        await step(store, "t1", entity_type="task", timers=(moved,))
        assert await store.list_timers("task", "t2") == [moved]
        assert await store.claim_timers(now, limit=10, lease_seconds=0) == [moved]
        assert await store.claim_timers(now, limit=10, lease_seconds=60) == [moved]  # a lease of 0 s ran out

        await step(store, "t1", entity_type="task", cancel_timers=("deadline:t2:1", "deadline:t3:1"))
        assert await store.list_timers() == []
        assert await store.claim_timers(future, limit=10, lease_seconds=60) == []

    backend.run(scenario)


def test_a_refused_change_arms_no_timer(backend: Backend) -> None:
    async def scenario(store: Store) -> None:
        await step(store, "t1", entity_type="task")
        timer = Timer("deadline:t1:1", "2020-01-01T00:00:00.000000+00:00", "task_deadline", "task", "t1")
        with pytest.raises(RevisionConflict):
            await store.apply(Change("task", "t1", expected_revision=7, state="active", timers=(timer,)))
        assert await store.list_timers() == []

    backend.run(scenario)


def test_remember_signature_refuses_a_replay(backend: Backend) -> None:
    now = time.time()

    async def scenario(store: Store) -> list[bool]:
        return [
            await store.remember_signature("sig-1", now, 300),
            await store.remember_signature("sig-1", now, 300),
            await store.remember_signature("sig-2", now, 300),
            await store.remember_signature("sig-1", now + 1, 300),
        ]

    assert backend.run(scenario) == [True, False, True, False]


# -- concurrency ----------------------------------------------------------------------------


def test_concurrent_writers_on_one_entity_lose_no_update(backend: Backend) -> None:
    """Many tasks race compare-and-set on one entity, retrying lost races from a fresh read."""
    writers, each = 24, 3

    async def writer(store: Store, n: int) -> int:
        conflicts = 0
        for _ in range(each):
            while True:
                try:
                    await step(store, "hot", details={"writer": n})
                    break
                except RevisionConflict:
                    conflicts += 1
                    assert conflicts < 10_000
        return conflicts

    async def scenario(store: Store) -> tuple[Entity | None, list[dict[str, Any]], audit.Verification]:
        await store.apply(Change("agent", "hot", create=Entity("agent", "hot", "registered")))
        await asyncio.gather(*(writer(store, n) for n in range(writers)))
        return await store.get("agent", "hot"), await chain(store, "hot"), await store.verify()

    entity, records, verification = backend.run(scenario)
    assert entity is not None
    assert entity.revision == writers * each == len(records) == entity.seq
    assert_chain(records)
    states = [r["dest"] for r in records]
    assert states == [NEXT[s] for s in ["registered", *states[:-1]]]  # each applied from the one before
    assert verification.ok, verification.problems


# -- listings by creation, filtered by labels (schema 2) -------------------------------------


async def _keyset_walk(store: Store, size: int, **kw: Any) -> list[str]:
    """Every page of ``size`` in creation order, each continued from the last entity's position."""
    walked: list[str] = []
    after: tuple[str, str] | None = None
    while True:
        query = EntityQuery(
            "workflow",
            by_created=True,
            limit=size,
            after_created=None if after is None else after[0],
            after_id=None if after is None else after[1],
            **kw,
        )
        page = await store.list_entities(query)
        assert len(page) <= size
        walked += [e.entity_id for e in page]
        if len(page) < size:
            return walked
        after = (page[-1].created_at, page[-1].entity_id)


def test_list_entities_by_creation_filtered_by_labels(backend: Backend) -> None:
    async def scenario(store: Store) -> None:
        for n in range(9):
            eid = f"r{8 - n}"  # ids against creation order: creation order must not be id order
            data = {"workflowId": f"wf-{n % 3}", "agentId": f"ag-{n % 2}", "n": n}
            await store.apply(Change("workflow", eid, create=Entity("workflow", eid, "pending", data=data)))
        await store.apply(Change("workflow", "bare", create=Entity("workflow", "bare", "pending")))
        odd = Entity("workflow", "odd", "pending", data={"workflowId": 7, "agentId": ["ag-0"]})
        await store.apply(Change("workflow", "odd", create=odd))
        await store.apply(Change("agent", "x", create=Entity("agent", "x", "registered", data={"workflowId": "wf-0"})))

        everything = await store.list_entities(EntityQuery("workflow", limit=100))
        order = [e.entity_id for e in sorted(everything, key=lambda e: (e.created_at, e.entity_id))]
        data = {e.entity_id: e.data for e in everything}

        def having(**fields: str) -> list[str]:
            return [eid for eid in order if all(data[eid].get(k) == v for k, v in fields.items())]

        async def ids(**kw: Any) -> list[str]:
            return [e.entity_id for e in await store.list_entities(EntityQuery("workflow", by_created=True, **kw))]

        assert len(order) == 11 and order[:9] == [f"r{8 - n}" for n in range(9)]
        assert await ids() == order
        assert await ids(descending=True) == order[::-1]
        wf1 = (("workflowId", "wf-1"),)
        assert await ids(labels=wf1) == having(workflowId="wf-1") == ["r7", "r4", "r1"]
        assert await ids(labels=wf1, descending=True) == ["r1", "r4", "r7"]
        both = (("workflowId", "wf-0"), ("agentId", "ag-0"))
        assert await ids(labels=both) == having(workflowId="wf-0", agentId="ag-0") == ["r8", "r2"]
        assert await ids(labels=(("agentId", "ag-0"),), limit=2, descending=True) == having(agentId="ag-0")[::-1][:2]
        assert await ids(labels=(("workflowId", "wf-none"),)) == []
        assert await ids(labels=(("workflowId", "7"),)) == []  # only strings are labels
        assert await ids(id_prefix="r", labels=wf1) == ["r7", "r4", "r1"]

        for size in (1, 2, 4):
            assert await _keyset_walk(store, size) == order
            assert await _keyset_walk(store, size, descending=True) == order[::-1]
            assert await _keyset_walk(store, size, labels=(("agentId", "ag-1"),)) == having(agentId="ag-1")
            assert await _keyset_walk(store, size, labels=wf1, descending=True) == ["r1", "r4", "r7"]

        # a run's state is a label too, moved by its transitions, and only by committed ones
        for eid in ("r4", "r2"):
            start = audit.draft(entity_type="workflow", entity_id=eid, event="start", source="pending",
                                dest="running", outcome="applied", reason=None, actor="key:test", request_id=None,
                                details={}, reported_at=None)  # fmt: skip
            await store.apply(Change("workflow", eid, expected_revision=0, state="running", record=start))
        assert await ids(state="running") == ["r4", "r2"]
        assert await ids(state="running", descending=True) == ["r2", "r4"]
        assert await ids(state="pending", labels=wf1) == ["r7", "r1"]
        assert await ids(state="running", labels=(("agentId", "ag-0"),)) == ["r4", "r2"]
        assert await _keyset_walk(store, 1, state="pending", labels=wf1) == ["r7", "r1"]
        with pytest.raises(RevisionConflict):
            refused = draft("r7", "pending", "failed", entity_type="workflow")
            await store.apply(Change("workflow", "r7", expected_revision=5, state="failed", record=refused))
        assert await ids(state="failed") == []

        # a labelled key that changes moves its label; one that goes away (or stops being text) drops it
        await store.apply(Change("workflow", "r7", data={"workflowId": "wf-9"}))
        assert await ids(labels=(("workflowId", "wf-9"),)) == ["r7"]
        assert await ids(labels=wf1) == ["r4", "r1"]
        await store.apply(Change("workflow", "r7", data={"workflowId": None}))
        assert await ids(labels=(("workflowId", "wf-9"),)) == []
        await store.apply(Change("workflow", "bare", data={"agentId": "ag-1"}))
        assert (await ids(labels=(("agentId", "ag-1"),)))[-1:] == ["bare"]

        with pytest.raises(ValueError, match="no label"):
            await ids(labels=(("currentTaskId", "t1"),))
        with pytest.raises(ValueError, match="no label"):
            await store.list_entities(EntityQuery("agent", labels=(("workflowId", "wf-0"),)))
        assert [e.entity_id for e in await store.list_entities(EntityQuery("agent", by_created=True))] == ["x"]
        if backend.name != "memory":  # entity types without labels write no label row
            assert await backend.query("SELECT count(*) FROM labels WHERE entity_type <> 'workflow'") == [(0,)]

    backend.run(scenario)


# -- ?at= as a seek (schema 2) ----------------------------------------------------------------


def just_before(moment: str) -> str:
    from datetime import datetime, timedelta

    return (datetime.fromisoformat(moment) - timedelta(microseconds=1)).isoformat(timespec="microseconds")


async def build_history(store: Store, entity_id: str) -> list[dict[str, Any]]:
    """A chain with refusals before and between transitions and metadata records after them."""

    def metadata(state: str) -> dict[str, Any]:
        return audit.draft(entity_type="agent", entity_id=entity_id, event=audit.METADATA_EVENT, source=state,
                           dest=state, outcome="applied", reason=None, actor="key:test", request_id=None,
                           details={"changed": {"v": {"old": 1, "new": 2}}}, reported_at=None)  # fmt: skip

    await store.apply(Change("agent", entity_id, create=Entity("agent", entity_id, "registered")))
    refuse = Change("agent", entity_id, record=draft(entity_id, "registered", "active", outcome="rejected"))
    await store.apply(refuse)  # a refusal at revision 0
    await step(store, entity_id)  # registered -> idle
    for _ in range(3):
        await store.apply(Change("agent", entity_id, record=draft(entity_id, "idle", "error", outcome="rejected")))
    await step(store, entity_id)  # idle -> active
    await store.apply(Change("agent", entity_id, data={"v": 2}, record=metadata("active")))
    await store.apply(Change("agent", entity_id, record=draft(entity_id, "active", "error", outcome="rejected")))
    await step(store, entity_id)  # active -> idle
    await store.apply(Change("agent", entity_id, data={"v": 3}, record=metadata("idle")))
    await step(store, entity_id)  # idle -> active
    return await chain(store, entity_id)


def moments_of(entity: Entity, records: list[dict[str, Any]]) -> list[str]:
    moments = [entity.created_at]
    for r in records:
        moments += [just_before(r["recordedAt"]), r["recordedAt"]]
    return [*moments, "2999-01-01T00:00:00.000000+00:00"]


def test_at_a_moment_seeks_and_agrees_with_the_replay(backend: Backend) -> None:
    """``history.at`` (a seek on the SQL stores) answers exactly what replaying the chain answers."""
    from opscore import history

    async def scenario(store: Store) -> None:
        records = await build_history(store, "h")
        entity = await store.get("agent", "h")
        assert entity is not None and entity.revision == 4 and len(records) == 11
        seen = set()
        for moment in moments_of(entity, records):
            for last in (0, 1, 3, 10):
                fast = await history.at(store, entity, "registered", moment, last)
                slow = await history.replay(store, entity, "registered", moment, last)
                assert fast == slow, moment
                seen.add((fast.state, fast.revision))
            position = await store.position_at("agent", "h", moment)
            assert (position is None) == (backend.name == "memory")  # the SQL stores seek every time
        assert seen == {("registered", 0), ("idle", 1), ("active", 2), ("idle", 3), ("active", 4)}
        late = await history.at(store, entity, "registered", records[6]["recordedAt"], 10)  # the metadata record
        assert (late.state, late.revision, late.seq, late.previous_state) == ("active", 2, 7, "idle")
        assert late.timestamp == late.since == records[5]["recordedAt"] and late.details["n"] == 1.5
        assert [r["dest"] for r in late.path] == ["idle", "active"]

    backend.run(scenario)


# -- definitions, a page at a time -------------------------------------------------------------


def test_definitions_come_a_page_at_a_time_oldest_first(backend: Backend) -> None:
    async def scenario(store: Store) -> None:
        assert await store.definitions_page(None, 10) == []
        bodies = [{"id": f"d{n}", "version": "1"} for n in (3, 1, 2, 0)]
        for body in bodies:
            await store.put_definition(body["id"], "1", body)
        await store.put_definition("d1", "1", {"id": "d1", "version": "1"})  # already stored: no new position
        everything = await store.definitions_page(None, 100)
        assert [body for _, body in everything] == bodies
        positions = [n for n, _ in everything]
        assert positions == sorted(positions) and len(set(positions)) == 4
        walked, after = [], None
        while page := await store.definitions_page(after, 3):
            walked += page
            after = page[-1][0]
        assert walked == everything
        assert await store.definitions_page(positions[1], 1) == everything[2:3]
        assert await store.list_definitions() == bodies

    backend.run(scenario)


def test_get_many_answers_in_the_order_asked(backend: Backend) -> None:
    async def scenario(store: Store) -> None:
        for eid in ("t1", "t2", "t3"):
            await store.apply(Change("task", eid, create=Entity("task", eid, "pending", data={"n": eid})))
        found = await store.get_many("task", ["t3", "nope", "t1", "t3"])
        assert [None if e is None else e.data["n"] for e in found] == ["t3", None, "t1", "t3"]
        assert await store.get_many("task", []) == []
        assert await store.get_many("agent", ["t1"]) == [None]

    backend.run(scenario)


def test_the_stream_hands_out_every_record_once_in_order_and_resumes(backend: Backend) -> None:
    """DESIGN §10 at the storage port: positions are opaque, "0" is the start, the head is now."""

    async def scenario(store: Store) -> None:
        assert await store.stream_head() == "0"
        for n in range(7):
            await step(store, f"s{n % 3}")
        everything = await store.stream_page("0", AuditQuery(limit=100))
        records = [audit.loads(text) for _, text in everything]
        assert [r["id"] for r in records] == sorted(r["id"] for r in records) and len(records) == 7
        assert len({position for position, _ in everything}) == 7
        assert await store.stream_head() == everything[-1][0]
        middle = everything[3][0]
        rest = await store.stream_page(middle, AuditQuery(limit=100))
        assert rest == everything[4:]
        assert await store.stream_page(everything[-1][0], AuditQuery(limit=100)) == []
        only = await store.stream_page("0", AuditQuery(entity_id="s1", limit=100))
        assert [audit.loads(t)["entityId"] for _, t in only] == ["s1", "s1"]
        two = await store.stream_page("0", AuditQuery(limit=2))
        assert two == everything[:2]
        for bad in ("", "-1", "abc", "1" * 40, "٣"):
            with pytest.raises(Invalid):
                await store.stream_page(bad, AuditQuery(limit=1))

    backend.run(scenario)
