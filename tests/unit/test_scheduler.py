"""The scheduler's housekeeping: expired idempotency answers are purged without anyone asking."""

from __future__ import annotations

import asyncio

from opscore.engine import Engine
from opscore.models import Change, Entity, IdempotencyEntry
from opscore.storage.memory import MemoryStore
from opscore.workflows.runs import Runs
from opscore.workflows.scheduler import Scheduler
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
