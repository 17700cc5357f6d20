"""The engine on the memory store and on SQLite: what is applied, refused, recorded, replayed."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from opscore.api.errors import render_error, status_of
from opscore.clock import normalise as normalise_time
from opscore.engine import Context, Engine, Idempotency, Replay
from opscore.errors import (
    IdempotencyKeyReused,
    IllegalTransition,
    Invalid,
    PreconditionFailed,
    RevisionConflict,
    StaleReport,
    UnknownEntity,
    UnknownState,
    UnknownTrigger,
)
from opscore.models import AuditQuery, Change, Committed, Entity, TransitionResult
from opscore.storage.memory import MemoryStore
from tests.unit.conftest import CTX, Runner

T0 = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)
SEED = Entity("agent", "a", "registered")


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


async def records(engine: Engine, entity_id: str = "a") -> list[dict[str, Any]]:
    return await engine.store.list_audit(AuditQuery(entity_type="agent", entity_id=entity_id, limit=10_000))


async def report(engine: Engine, target: str, t: float, ctx: Context = CTX, **kw: Any) -> TransitionResult:
    result = await engine.report("agent", "a", target, ctx=ctx, reported_at=at(t), create=SEED, **kw)
    assert isinstance(result, TransitionResult)
    return result


def test_unknown_agent_report_registers_it_and_applies_from_registered(run_engine: Runner) -> None:
    async def scenario(engine: Engine) -> None:
        result = await report(engine, "idle", 0, details={"k": "v"})
        assert result.created is True and result.changed is True
        assert (result.previous_state, result.entity.state, result.entity.revision) == ("registered", "idle", 1)
        assert result.entity.data == {}
        (record,) = await records(engine)
        assert (record["event"], record["source"], record["dest"]) == ("ready", "registered", "idle")
        assert record["actor"] == "key:test" and record["requestId"] == "req-test"
        assert record["details"] == {"k": "v"} and record["reportedAt"] == normalise_time(at(0))
        assert record["id"] == result.audit_id and record["seq"] == 1 and record["prevHash"] == "0" * 64
        stored = await engine.get("agent", "a")
        assert stored.last_details == {"k": "v"} and stored.last_report_at == normalise_time(at(0))

    run_engine(scenario)


def test_heartbeat_changes_nothing_but_last_seen(run_engine: Runner) -> None:
    async def scenario(engine: Engine) -> None:
        first = await report(engine, "idle", 0)
        await asyncio.sleep(0.002)
        beat = await report(engine, "idle", 1, details={"beat": 1})
        assert beat.changed is False and beat.record is None and beat.audit_id is None
        assert beat.previous_state == "idle" and beat.entity.state == "idle"
        assert beat.entity.revision == first.entity.revision
        assert beat.entity.last_seen_at is not None and first.entity.last_seen_at is not None
        assert beat.entity.last_seen_at > first.entity.last_seen_at
        assert beat.entity.last_report_at == normalise_time(at(1))
        assert len(await records(engine)) == 1

    run_engine(scenario)


def test_stale_report_is_refused_and_recorded(run_engine: Runner) -> None:
    async def scenario(engine: Engine) -> None:
        await report(engine, "idle", 10)
        with pytest.raises(StaleReport) as info:
            await report(engine, "active", 5)
        err = info.value
        assert status_of(err) == 409 and err.code == "stale_report"
        assert err.extra["from"] == "idle" and err.extra["to"] == "active"
        assert err.extra["newest"] == normalise_time(at(10))
        entity = await engine.get("agent", "a")
        assert entity.state == "idle" and entity.revision == 1
        last = (await records(engine))[-1]
        assert (last["outcome"], last["reason"], last["source"], last["dest"]) == (
            "rejected",
            "stale_report",
            "idle",
            "active",
        )
        assert err.extra["auditId"] == last["id"]
        # the same timestamp as the newest is not stale
        assert (await report(engine, "active", 10)).changed is True

    run_engine(scenario)


def test_illegal_report_is_refused_with_from_to_allowed_and_recorded(run_engine: Runner) -> None:
    async def scenario(engine: Engine) -> None:
        await report(engine, "idle", 0)
        await report(engine, "error", 1)
        with pytest.raises(IllegalTransition) as info:
            await report(engine, "active", 2)
        body = render_error(info.value)
        assert body[0] == 409
        assert body[1]["code"] == "illegal_transition" and isinstance(body[1]["detail"], str)
        assert (body[1]["from"], body[1]["to"]) == ("error", "active")
        assert body[1]["allowed"] == ["initializing", "idle", "offline", "deregistered"]
        last = (await records(engine))[-1]
        assert (last["outcome"], last["reason"], last["source"], last["dest"]) == (
            "rejected",
            "illegal_transition",
            "error",
            "active",
        )
        assert (await engine.get("agent", "a")).state == "error"

    run_engine(scenario)


def test_unknown_state_is_422_and_not_recorded(run_engine: Runner) -> None:
    async def scenario(engine: Engine) -> None:
        await report(engine, "idle", 0)
        with pytest.raises(UnknownState) as info:
            await report(engine, "sleeping", 1)
        assert status_of(info.value) == 422
        assert info.value.extra["valid"] == list(engine.fsm("agent").states)
        assert "registered" in info.value.detail
        assert len(await records(engine)) == 1
        with pytest.raises(UnknownState):
            await engine.report("agent", "never-seen", "sleeping", ctx=CTX, create=SEED)
        assert await engine.store.get("agent", "never-seen") is None

    run_engine(scenario)


def test_upsert_creates_then_merges_metadata_and_never_resets_state(run_engine: Runner) -> None:
    async def scenario(engine: Engine) -> None:
        entity, created = await engine.upsert("agent", "a", {"agentName": "A", "capabilities": ["x"]}, ctx=CTX)
        assert created and entity.state == "registered" and entity.revision == 0
        await report(engine, "idle", 0)
        await report(engine, "active", 1)
        entity, created = await engine.upsert("agent", "a", {"version": "2"}, ctx=CTX)
        assert not created
        assert entity.state == "active" and entity.revision == 2
        assert entity.data == {"agentName": "A", "capabilities": ["x"], "version": "2"}
        stored = await records(engine)
        assert len(stored) == 3  # two transitions, then the metadata change
        change = stored[-1]
        assert (change["event"], change["source"], change["dest"], change["outcome"], change["seq"]) == (
            "update_metadata",
            "active",
            "active",
            "applied",
            3,
        )
        assert change["details"] == {"changed": {"version": {"old": None, "new": "2"}}}
        same, _ = await engine.upsert("agent", "a", {"version": "2"}, ctx=CTX)
        assert same.seq == 3 and len(await records(engine)) == 3  # nothing changed: no record

    run_engine(scenario)


def test_operator_trigger_by_name(run_engine: Runner) -> None:
    async def scenario(engine: Engine) -> None:
        with pytest.raises(UnknownEntity) as missing:
            await engine.fire("agent", "a", "ready", ctx=CTX)
        assert status_of(missing.value) == 404 and missing.value.code == "unknown_agent"
        await engine.upsert("agent", "a", {}, ctx=CTX)
        result = await engine.fire("agent", "a", "ready", ctx=CTX, details={"by": "op"})
        assert isinstance(result, TransitionResult) and result.entity.state == "idle" and result.changed
        with pytest.raises(UnknownTrigger) as unknown:
            await engine.fire("agent", "a", "to_active", ctx=CTX)
        assert status_of(unknown.value) == 422 and "begin_task" in unknown.value.extra["valid"]
        with pytest.raises(IllegalTransition) as illegal:
            await engine.fire("agent", "a", "recover", ctx=CTX)
        assert status_of(illegal.value) == 409
        assert illegal.value.extra["from"] == "idle" and illegal.value.extra["trigger"] == "recover"
        assert "active" in illegal.value.extra["allowed"] and "begin_task" in illegal.value.extra["allowedTriggers"]
        rec = await records(engine)
        assert [(r["event"], r["outcome"]) for r in rec] == [("ready", "applied"), ("recover", "rejected")]
        assert rec[0]["details"] == {"by": "op"}

    run_engine(scenario)


def test_if_match_mismatch_is_precondition_failed_and_recorded(run_engine: Runner) -> None:
    async def scenario(engine: Engine) -> None:
        await report(engine, "idle", 0)
        with pytest.raises(PreconditionFailed) as info:
            await report(engine, "active", 1, ctx=replace(CTX, if_match=0))
        assert status_of(info.value) == 412 and info.value.extra["revision"] == 1
        last = (await records(engine))[-1]
        assert (last["outcome"], last["reason"]) == ("rejected", "revision_mismatch")
        assert (await engine.get("agent", "a")).state == "idle"
        ok = await report(engine, "active", 2, ctx=replace(CTX, if_match=1))
        assert ok.entity.revision == 2

    run_engine(scenario)


def idem(key: str, fingerprint: str = "fp-1") -> Context:
    return replace(CTX, idempotency=Idempotency("key:test", key, fingerprint))


def test_idempotency_replay_returns_the_first_answer_and_no_second_transition(run_engine: Runner) -> None:
    async def scenario(engine: Engine) -> None:
        first = await engine.report("agent", "a", "idle", ctx=idem("k1"), reported_at=at(0), create=SEED)
        assert isinstance(first, TransitionResult)
        second = await engine.report("agent", "a", "idle", ctx=idem("k1"), reported_at=at(0), create=SEED)
        assert isinstance(second, Replay)
        assert second.status == 200
        assert second.body == first.answer()
        assert second.body["auditId"] == first.audit_id and second.body["changed"] is True
        assert len(await records(engine)) == 1
        assert (await engine.get("agent", "a")).revision == 1

    run_engine(scenario)


def test_idempotency_replays_a_refusal_without_recording_it_twice(run_engine: Runner) -> None:
    async def scenario(engine: Engine) -> None:
        await report(engine, "idle", 0)
        with pytest.raises(IllegalTransition) as first:
            await engine.report("agent", "a", "registered", ctx=idem("k2"), reported_at=at(1), create=SEED)
        count = len(await records(engine))
        with pytest.raises(IllegalTransition) as again:
            await engine.report("agent", "a", "registered", ctx=idem("k2"), reported_at=at(1), create=SEED)
        assert render_error(again.value) == render_error(first.value)
        assert again.value.extra["auditId"] == first.value.extra["auditId"] is not None
        assert len(await records(engine)) == count

    run_engine(scenario)


def test_same_idempotency_key_with_another_body_is_refused(run_engine: Runner) -> None:
    async def scenario(engine: Engine) -> None:
        await engine.report("agent", "a", "idle", ctx=idem("k1", "fp-1"), reported_at=at(0), create=SEED)
        with pytest.raises(IdempotencyKeyReused) as info:
            await engine.report("agent", "a", "initializing", ctx=idem("k1", "fp-2"), reported_at=at(1), create=SEED)
        assert status_of(info.value) == 422 and info.value.code == "idempotency_key_reused"
        assert (await engine.get("agent", "a")).state == "idle"
        assert len(await records(engine)) == 1

    run_engine(scenario)


def test_revision_equals_applied_records_and_the_chain_verifies(run_engine: Runner) -> None:
    flow = ["initializing", "idle", "active", "idle", "active", "error", "active", "idle", "idle", "offline"]

    async def scenario(engine: Engine) -> None:
        for i, target in enumerate(flow):
            with contextlib.suppress(IllegalTransition):
                await report(engine, target, i)
        with pytest.raises(StaleReport):
            await report(engine, "deregistered", 0)
        rec = await records(engine)
        applied = [r for r in rec if r["outcome"] == "applied"]
        entity = await engine.get("agent", "a")
        assert entity.revision == len(applied) == 8
        assert entity.state == "offline"
        assert [r["seq"] for r in rec] == list(range(1, len(rec) + 1))
        assert entity.seq == len(rec) and entity.head_hash == rec[-1]["hash"]
        assert (await engine.store.verify()).ok

    run_engine(scenario)


def test_listeners_see_every_committed_record_and_its_entity(run_engine: Runner) -> None:
    async def scenario(engine: Engine) -> None:
        seen: list[tuple[dict[str, Any], Entity]] = []
        engine.listeners.append(lambda record, entity: seen.append((record, entity)))
        await report(engine, "idle", 0)
        await report(engine, "idle", 1)
        with pytest.raises(IllegalTransition):
            await report(engine, "registered", 2)
        assert [r["outcome"] for r, _ in seen] == ["applied", "rejected"]
        assert [r for r, _ in seen] == await records(engine)
        assert [(e.state, e.seq, e.head_hash) for _, e in seen] == [
            ("idle", 1, seen[0][0]["hash"]),
            ("idle", 2, seen[1][0]["hash"]),
        ]

    run_engine(scenario)


def test_report_without_timestamp_skips_the_stale_check(run_engine: Runner) -> None:
    async def scenario(engine: Engine) -> None:
        await report(engine, "idle", 100)
        result = await engine.report("agent", "a", "deregistered", ctx=CTX)
        assert isinstance(result, TransitionResult) and result.entity.state == "deregistered"
        with pytest.raises(UnknownEntity):
            await engine.report("agent", "ghost", "idle", ctx=CTX)

    run_engine(scenario)


def test_normalise_time() -> None:
    assert normalise_time("2026-11-23T11:00:00+01:00") == "2026-11-23T10:00:00.000000+00:00"
    assert normalise_time("2026-11-23T10:00:00") == "2026-11-23T10:00:00.000000+00:00"
    for bad in ("yesterday", "0001-01-01T00:00:00+05:00", "9999-12-31T23:59:59-05:00"):
        with pytest.raises(Invalid) as info:
            normalise_time(bad)
        assert status_of(info.value) == 422


class RacingStore(MemoryStore):
    """Another replica moves the entity just before each of our first ``races`` writes."""

    def __init__(self, races: int) -> None:
        super().__init__()
        self.races = races

    async def apply(self, change: Change) -> Committed:
        if change.expected_revision is not None and self.races > 0:
            self.races -= 1
            current = self.entities[(change.entity_type, change.entity_id)]
            other = "active" if current.state == "idle" else "idle"
            self.entities[(change.entity_type, change.entity_id)] = replace(
                current, state=other, revision=current.revision + 1
            )
        return await super().apply(change)


def test_a_lost_compare_and_set_is_retried_from_a_fresh_read() -> None:
    async def scenario() -> None:
        store = RacingStore(races=0)
        engine = Engine(store)
        await engine.upsert("agent", "a", {}, ctx=CTX)
        await engine.fire("agent", "a", "ready", ctx=CTX)
        store.races = 1
        result = await engine.fire("agent", "a", "fail", ctx=CTX)  # legal from idle and from active
        assert isinstance(result, TransitionResult)
        assert result.previous_state == "active" and result.entity.state == "error"
        assert result.entity.revision == 3

    asyncio.run(scenario())


def test_a_lost_compare_and_set_under_if_match_is_precondition_failed() -> None:
    async def scenario() -> None:
        store = RacingStore(races=0)
        engine = Engine(store)
        await engine.upsert("agent", "a", {}, ctx=CTX)
        await engine.fire("agent", "a", "ready", ctx=CTX)
        store.races = 1
        with pytest.raises(PreconditionFailed) as info:
            await engine.fire("agent", "a", "fail", ctx=replace(CTX, if_match=1))
        assert info.value.extra["revision"] == 2

    asyncio.run(scenario())


class FailingMeanwhileStore(MemoryStore):
    """Another replica fails the agent (a transition: revision and seq move) just before our next write."""

    race = False

    async def apply(self, change: Change) -> Committed:
        if self.race:
            self.race = False
            current = self.entities[(change.entity_type, change.entity_id)]
            self.entities[(change.entity_type, change.entity_id)] = replace(
                current, state="error", revision=current.revision + 1, seq=current.seq + 1
            )
        return await super().apply(change)


def test_a_heartbeat_decided_on_a_state_that_moved_is_decided_again_from_a_fresh_read() -> None:
    """Decided on ``idle``, the report ``idle`` is a heartbeat (it writes no revision): the store refuses
    it because the entity moved since the engine's read, and from ``error`` it is ``recover``."""

    async def scenario() -> None:
        store = FailingMeanwhileStore()
        engine = Engine(store)
        await engine.upsert("agent", "a", {}, ctx=CTX)
        await engine.fire("agent", "a", "ready", ctx=CTX)
        store.race = True
        result = await engine.report("agent", "a", "idle", ctx=CTX)
        assert isinstance(result, TransitionResult)
        assert (result.previous_state, result.entity.state, result.changed) == ("error", "idle", True)
        assert result.record is not None and result.record["event"] == "recover"

    asyncio.run(scenario())


def test_endless_races_end_in_a_409_conflict() -> None:
    async def scenario() -> None:
        store = RacingStore(races=0)
        engine = Engine(store)
        await engine.upsert("agent", "a", {}, ctx=CTX)
        await engine.fire("agent", "a", "ready", ctx=CTX)
        store.races = 10_000
        with pytest.raises(RevisionConflict) as info:
            await engine.fire("agent", "a", "fail", ctx=CTX)
        assert status_of(info.value) == 409 and info.value.code == "revision_conflict"

    asyncio.run(scenario())


def test_revision_conflict_maps_to_409() -> None:
    assert status_of(RevisionConflict("x")) == 409
