"""Two replicas' workflow logic racing on one store, step by step.

Each "replica" is its own :class:`Engine` and :class:`Runs` (so its own process-local locks
and instance id) over ONE store that yields to the event loop before every call, so the
two interleave at every read and write as processes on one database would. What must hold
is what the compare-and-sets promise: one ``/run`` per attempt, never one agent for two
tasks, and exactly one outcome when a report and a deadline meet.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from opscore.clock import after as seconds_from_now
from opscore.engine import Context, Engine, Replay
from opscore.models import AuditQuery, Change, Committed, Entity, EntityQuery, Timer
from opscore.storage.memory import MemoryStore
from opscore.workflows import claims as claims_module
from opscore.workflows.claims import Hold
from opscore.workflows.dispatch import AgentKitClient, DispatchResult
from opscore.workflows.runs import Runs
from opscore.workflows.state import AgentClaim, task_entity_id

FREE, HELD_, PENDING = Hold.FREE, Hold.HELD, Hold.PENDING

CTX = Context(actor="key:test")
DEFINITION = {"id": "race", "version": "1", "tasks": [{"taskId": "t", "agentCapability": "cap", "maxRetries": 1}]}


class InterleavingStore(MemoryStore):
    """The memory store, giving every other coroutine a turn before each call (as I/O would)."""

    async def get(self, entity_type: str, entity_id: str) -> Entity | None:
        await asyncio.sleep(0)
        return await super().get(entity_type, entity_id)

    async def apply(self, change: Change) -> Committed:
        await asyncio.sleep(0)
        return await super().apply(change)

    async def list_entities(self, query: EntityQuery) -> list[Entity]:
        await asyncio.sleep(0)
        return await super().list_entities(query)


class RecordingAgentKit(AgentKitClient):
    """AgentKit that accepts every ``/run`` and remembers it."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, int]] = []

    async def run(self, agent_id: str, body: dict[str, Any]) -> DispatchResult:
        self.calls.append((agent_id, body["opscore_task_id"], body["payload"]["attempt"]))
        return DispatchResult("accepted", 202, None)

    async def close(self) -> None:
        return None


Scenario = Callable[[Runs, Runs, RecordingAgentKit], Awaitable[None]]


def play(scenario: Scenario) -> None:
    async def main() -> None:
        store = InterleavingStore()
        await store.open()
        kit = RecordingAgentKit()
        one, two = (Runs(Engine(store), kit, default_timeout=60) for _ in range(2))
        await one.publish(DEFINITION)
        await scenario(one, two, kit)
        await one.drain()
        await two.drain()

    asyncio.run(main())


async def agent(runs: Runs, agent_id: str, state: str = "idle") -> None:
    await runs.engine.upsert("agent", agent_id, {"capabilities": ["cap"]}, ctx=CTX)
    await runs.engine.report("agent", agent_id, state, ctx=CTX)


async def waiting_run(runs: Runs) -> str:
    """A run whose task waits (no agent is free yet): both replicas may then dispatch it."""
    run = await runs.start(await runs.definition("race", "1"), agent_id="nobody", payload={}, ctx=CTX)
    task = await runs.store.get("task", task_entity_id(run.entity_id, "t"))
    assert task is not None and task.state == "waiting"
    return run.entity_id


async def applied(runs: Runs, entity_id: str) -> list[str]:
    records = await runs.store.list_audit(AuditQuery(entity_id=entity_id, limit=1000))
    return [r["event"] for r in records if r["outcome"] == "applied"]


def test_two_replicas_dispatching_one_task_send_it_once() -> None:
    async def scenario(one: Runs, two: Runs, kit: RecordingAgentKit) -> None:
        sid = await waiting_run(one)
        await agent(one, "a1")
        await agent(one, "a2")
        await asyncio.gather(one.advance(sid), two.advance(sid))
        await one.drain()
        await two.drain()
        eid = task_entity_id(sid, "t")
        task = await one.store.get("task", eid)
        assert task is not None and (task.state, task.data["attempt"]) == ("dispatched", 1)
        assert kit.calls == [(task.data["agentId"], eid, 1)]
        assert await applied(one, eid) == ["wait", "dispatch"]
        # Both got as far as claiming (the race really happened): the loser's claim is over.
        claims = {a: await one.store.get("agent", a) for a in ("a1", "a2")}
        owners = {AgentClaim.of(c).by for c in claims.values() if c is not None and AgentClaim.of(c) is not None}
        assert owners == {one.shared.instance, two.shared.instance}
        observer = Runs(Engine(one.store), kit, default_timeout=60)
        status = {a: await observer.claims.status(c) for a, c in claims.items() if c is not None}
        assert sorted(status.values()) == [FREE, HELD_]
        assert status[task.data["agentId"]] == HELD_

    play(scenario)


def test_two_replicas_never_give_one_free_agent_two_tasks() -> None:
    async def scenario(one: Runs, two: Runs, kit: RecordingAgentKit) -> None:
        first, second = await waiting_run(one), await waiting_run(one)
        await agent(one, "a1")
        await asyncio.gather(one.advance(first), two.advance(second))
        await one.drain()
        await two.drain()
        assert len(kit.calls) == 1 and kit.calls[0][0] == "a1"
        states = sorted([(await one.engine.get("task", task_entity_id(s, "t"))).state for s in (first, second)])
        assert states == ["dispatched", "waiting"]

    play(scenario)


def test_a_report_and_a_deadline_meeting_on_two_replicas_have_one_outcome() -> None:
    async def scenario(one: Runs, two: Runs, kit: RecordingAgentKit) -> None:
        sid = await waiting_run(one)
        await agent(one, "a1")
        await one.advance(sid)
        eid = task_entity_id(sid, "t")
        (deadline,) = await one.store.list_timers("task", eid)
        await one.engine.report("agent", "a1", "active", ctx=CTX)
        done = await one.engine.report("agent", "a1", "idle", ctx=CTX, details={"result": 42})
        assert not isinstance(done, Replay) and done.record is not None
        await asyncio.gather(one.on_timer(deadline), two.reactions.on_agent(done.record))
        events = await applied(one, eid)
        assert events[:2] == ["wait", "dispatch"]
        assert events[2:] in (["succeed"], ["fail_attempt"]), events  # one outcome, never both
        if events[2:] == ["succeed"]:
            task = await one.engine.get("task", eid)
            assert task.data["result"] == 42

    play(scenario)


def test_what_a_claim_means() -> None:
    async def scenario(one: Runs, two: Runs, kit: RecordingAgentKit) -> None:
        sid = await waiting_run(one)
        eid = task_entity_id(sid, "t")
        await agent(one, "a1")

        async def claimed(by: str, at: str, agent_id: str = "a1") -> Entity:
            await one.engine.update(
                "agent",
                agent_id,
                AgentClaim(eid, 1, f"token-{at}", by, at, 0).to_data(last_dispatch_at=at),
                ctx=CTX,
            )
            return await one.engine.get("agent", agent_id)

        fresh = await claimed(two.shared.instance, seconds_from_now(0))
        assert await one.claims.status(fresh, "other-task") == PENDING  # another replica is dispatching
        assert await one.claims.status(fresh, eid) == PENDING  # even for its own task, for a while
        assert await two.claims.status(fresh, "other-task") == FREE  # its own claim: that dispatch is over
        old = await claimed(two.shared.instance, seconds_from_now(-2 * claims_module.CLAIM_GRACE_SECONDS))
        assert await one.claims.status(old, eid) == FREE  # its claimer is presumed dead: the task may take it
        assert await one.claims.status(old, "other-task") == PENDING  # but no other task may
        await one.advance(sid)  # dispatched to a1 at attempt 1: the claim is held
        held = await one.engine.get("agent", "a1")
        assert await two.claims.status(held) == HELD_
        await one.engine.report("agent", "a1", "active", ctx=CTX)
        await one.engine.report("agent", "a1", "idle", ctx=CTX)
        await one.reactions.on_agent(
            (await one.store.list_audit(AuditQuery(entity_id="a1", descending=True, limit=1)))[0]
        )  # as the listener would
        assert (await one.engine.get("task", eid)).state == "succeeded"
        assert await two.claims.status(await one.engine.get("agent", "a1")) == FREE  # over for good

    play(scenario)


def test_a_report_older_than_the_claim_never_touches_the_task() -> None:
    async def scenario(one: Runs, two: Runs, kit: RecordingAgentKit) -> None:
        sid = await waiting_run(one)
        await agent(one, "a1", "initializing")
        await one.engine.report("agent", "a1", "idle", ctx=CTX)
        await one.engine.report("agent", "a1", "active", ctx=CTX)
        old = await one.engine.report("agent", "a1", "idle", ctx=CTX)  # about some earlier work
        assert not isinstance(old, Replay) and old.record is not None
        await one.advance(sid)  # claims a1 after that report
        await two.reactions.on_agent(old.record)  # processed late, on another replica
        assert (await one.engine.get("task", task_entity_id(sid, "t"))).state == "dispatched"

    play(scenario)


def test_a_lost_timer_race_is_harmless(monkeypatch: Any) -> None:
    """The same deadline handled by two replicas (a lease ran out) fails the attempt once."""

    async def scenario(one: Runs, two: Runs, kit: RecordingAgentKit) -> None:
        sid = await waiting_run(one)
        await agent(one, "a1")
        await one.advance(sid)
        eid = task_entity_id(sid, "t")
        (deadline,) = await one.store.list_timers("task", eid)
        assert isinstance(deadline, Timer)
        await asyncio.gather(one.on_timer(deadline), two.on_timer(deadline))
        assert (await applied(one, eid)).count("fail_attempt") == 1
        assert (await one.engine.get("task", eid)).data["failures"] == 1

    play(scenario)


def test_the_listener_spawns_work_only_for_agents_that_were_ever_claimed() -> None:
    """Reports of agents outside every workflow cost the run logic nothing (no task spawned)."""

    async def scenario() -> None:
        runs = Runs(Engine(MemoryStore()), RecordingAgentKit(), default_timeout=60)
        record = {"entityType": "agent", "entityId": "a", "outcome": "applied", "source": "idle", "dest": "active"}
        runs.listener(record, Entity("agent", "a", "active"))
        assert not runs.shared.background
        claimed = Entity("agent", "a", "active", data=AgentClaim("s:t", 1, "tok", "p", "", 0).to_data(""))
        runs.listener(record, claimed)
        assert len(runs.shared.background) == 1
        await runs.drain()

    asyncio.run(scenario())
