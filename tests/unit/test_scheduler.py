"""The scheduler's housekeeping: expired idempotency answers are purged, wakes for idle agents are spaced and gated."""

from __future__ import annotations

import asyncio
import time

from opscore.engine import Context, Engine
from opscore.models import Change, Entity, EntityQuery, IdempotencyEntry, Timer
from opscore.storage.memory import MemoryStore
from opscore.workflows.runs import Runs
from opscore.workflows.scheduler import Scheduler
from opscore.workflows.shared import Shared
from tests.unit.test_workflow_races import RecordingAgentKit


def test_the_scheduler_purges_expired_idempotency_answers() -> None:
    async def scenario() -> None:
        store = MemoryStore()
        entry = IdempotencyEntry("key:a", "old", "fp", 200, {"state": "registered"})
        await store.apply(Change("agent", "a", create=Entity("agent", "a", "registered"), idempotency=entry))
        store.idempotency_at[("key:a", "old")] = 0.0  # written long before the 48 h window
        scheduler = Scheduler(Runs(Engine(store), RecordingAgentKit(), default_timeout=60), agent_timeout=300)
        await scheduler.start()
        try:
            for _ in range(200):
                if ("key:a", "old") not in store.idempotency:
                    break
                await asyncio.sleep(0.01)
        finally:
            await scheduler.stop()
        assert ("key:a", "old") not in store.idempotency

    asyncio.run(scenario())


class CountingStore(MemoryStore):
    """A memory store that counts the scheduler's timer claims and its looks for waiting tasks."""

    def __init__(self) -> None:
        super().__init__()
        self.claims = 0
        self.waiting_lists = 0

    async def claim_timers(self, now: str, limit: int, lease_seconds: float) -> list[Timer]:
        self.claims += 1
        return await super().claim_timers(now, limit, lease_seconds)

    async def list_entities(self, query: EntityQuery) -> list[Entity]:
        if query.entity_type == "task" and query.state == "waiting":
            self.waiting_lists += 1
        return await super().list_entities(query)


def test_agents_becoming_idle_share_the_looks_for_waiting_tasks_and_timers_keep_the_tick() -> None:
    """Under a fleet reporting ``idle`` all the time, the waiting tasks are looked for every ``wake_gap`` s at most.

    Each agent going idle used to send the loop round at once: a look for waiting tasks and a
    timer claim (a write through the store) for every commit that sent an agent to ``idle``,
    about one per 18 state reports under ``wrk -c4``, 2-3 % of the server's samples.
    """

    async def scenario() -> tuple[int, int, float]:
        store = CountingStore()
        runs = Runs(Engine(store), RecordingAgentKit(), default_timeout=60)
        scheduler = Scheduler(runs, agent_timeout=300, tick=0.2, wake_gap=0.05)
        await scheduler.start()
        started = time.monotonic()
        try:
            for _ in range(100):  # an agent goes idle every 5 ms for half a second
                runs.agent_available.set()
                await asyncio.sleep(0.005)
        finally:
            elapsed = time.monotonic() - started
            await scheduler.stop()
        return store.claims, store.waiting_lists, elapsed

    claims, waiting_lists, elapsed = asyncio.run(scenario())
    assert 3 <= waiting_lists <= elapsed / 0.05 + 2  # the wakes were heard, a look per gap at most
    assert claims <= elapsed / 0.2 + 2  # the first claim at start, then one a tick at most


def test_an_agent_going_idle_after_a_quiet_spell_is_looked_for_at_once() -> None:
    """The gap spaces looks that follow each other; the first wake after a quiet spell does not wait for it.

    With a gap of 1 s, a loop that slept the gap after every wake would answer after 1 s.
    """

    async def scenario() -> float:
        store = CountingStore()
        runs = Runs(Engine(store), RecordingAgentKit(), default_timeout=60)
        scheduler = Scheduler(runs, agent_timeout=300, tick=10, wake_gap=1.0)
        await scheduler.start()
        try:
            await asyncio.sleep(1.2)  # past the first look and the gap; the tick is far away
            before = store.waiting_lists
            runs.agent_available.set()
            woke = time.monotonic()
            while store.waiting_lists == before:
                await asyncio.sleep(0.001)
            return time.monotonic() - woke
        finally:
            await scheduler.stop()

    assert asyncio.run(scenario()) < 0.5


def test_agents_going_idle_wake_the_scheduler_only_while_a_task_may_be_waiting() -> None:
    """With the store's only writer, a look that found no waiting task stops idle agents from waking the loop.

    A fleet reporting without workflows then costs the scheduler nothing per report; a task
    this process sends to ``waiting`` makes the next idle agent wake it again at once (the
    periodic look is 30 s away here, so only the wake can explain the second look).
    """

    async def scenario() -> tuple[list[int], list[bool]]:
        store = CountingStore()
        engine = Engine(store)
        runs = Runs(engine, RecordingAgentKit(), default_timeout=60)
        engine.listeners.append(runs.listener)
        scheduler = Scheduler(runs, agent_timeout=300, tick=10, waiting_interval=30, wake_gap=0.01)
        ctx = Context(actor="key:test", request_id="t")
        looks: list[int] = []
        woken: list[bool] = []

        async def report(state: str) -> None:
            await engine.report("agent", "a1", state, ctx=ctx, details={}, create=Entity("agent", "a1", "registered"))

        async def settle() -> None:
            for _ in range(50):
                await asyncio.sleep(0.01)
                if not runs.agent_available.is_set():
                    break
            await asyncio.sleep(0.05)

        await scheduler.start()
        try:
            await report("idle")  # the first idle agent wakes the loop: nothing is known yet
            await settle()
            looks.append(store.waiting_lists)
            for _ in range(10):
                await report("active")
                await report("idle")
                woken.append(runs.agent_available.is_set())
            await settle()
            looks.append(store.waiting_lists)
            await engine.report("task", "t1", "waiting", ctx=ctx, details={}, create=Entity("task", "t1", "pending"))
            await report("active")
            await report("idle")
            woken.append(runs.agent_available.is_set())
            await settle()
            looks.append(store.waiting_lists)
        finally:
            await scheduler.stop()
        return looks, woken

    looks, woken = asyncio.run(scenario())
    assert looks[0] == 1 and looks[1] == 1, looks  # ten agents went idle after the look that found none
    assert woken[:10] == [False] * 10
    assert woken[10] is True and looks[2] == 2, (looks, woken)  # the task went waiting: the next idle agent woke it


class RacingStore(CountingStore):
    """A look for waiting tasks during which this process sends a task to ``waiting`` (its listener runs meanwhile)."""

    shared: Shared | None = None

    async def list_entities(self, query: EntityQuery) -> list[Entity]:
        page = await super().list_entities(query)
        if query.entity_type == "task" and query.state == "waiting" and self.shared is not None:
            self.shared.went_waiting += 1  # as Reactions.listener does for a commit the read missed
            self.shared.none_waiting = False
        return page


class SharedStore(CountingStore):
    """A store other processes write to as well (PostgreSQL replicas)."""

    sole_writer = False


def test_a_look_that_raced_a_task_going_waiting_or_a_shared_store_keeps_the_wakes() -> None:
    async def none_waiting(store: CountingStore) -> bool:
        runs = Runs(Engine(store), RecordingAgentKit(), default_timeout=60)
        if isinstance(store, RacingStore):
            store.shared = runs.shared
        await runs.dispatch_waiting()
        return runs.shared.none_waiting

    assert asyncio.run(none_waiting(CountingStore())) is True
    assert asyncio.run(none_waiting(RacingStore())) is False
    assert asyncio.run(none_waiting(SharedStore())) is False
