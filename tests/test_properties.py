"""Random walks of state reports through the Engine keep state == replay(audit) and the chain valid."""

from __future__ import annotations

import asyncio
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from opscore import audit
from opscore.engine import Context, Engine
from opscore.errors import IllegalTransition, StaleReport
from opscore.models import AuditQuery, Entity, TransitionResult
from opscore.storage.base import Store
from opscore.storage.memory import MemoryStore
from opscore.storage.sqlite import SQLiteStore
from tests.pairs import DECLARED, STATES

T0 = datetime(2026, 11, 23, tzinfo=UTC)
CTX = Context(actor="key:prop")

# (target state, seconds after the previous report: mostly forward, sometimes back in time)
steps = st.lists(
    st.tuples(st.sampled_from(STATES), st.one_of(st.integers(0, 30), st.integers(-5, -1))),
    min_size=1,
    max_size=40,
)


async def walk(store: Store, plan: list[tuple[str, int]]) -> None:
    engine = Engine(store)
    state, newest, clock, applied = "registered", None, T0, 0
    for target, delta in plan:
        clock += timedelta(seconds=delta)
        seed = Entity("agent", "w", "registered")
        if newest is not None and clock < newest:
            with pytest.raises(StaleReport):
                await engine.report("agent", "w", target, ctx=CTX, reported_at=clock, create=seed)
            continue
        if target != state and (state, target) not in DECLARED:
            with pytest.raises(IllegalTransition):
                await engine.report("agent", "w", target, ctx=CTX, reported_at=clock, create=seed)
            continue
        result = await engine.report("agent", "w", target, ctx=CTX, reported_at=clock, create=seed)
        assert isinstance(result, TransitionResult)
        assert result.changed is (target != state)
        applied += result.changed
        state, newest = target, clock

    records = await store.list_audit(AuditQuery(entity_type="agent", entity_id="w", limit=10_000))
    entity = await engine.get("agent", "w")
    assert entity.state == state == audit.replay(records, "registered")
    assert entity.revision == applied == sum(r["outcome"] == "applied" for r in records)
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
    assert entity.seq == len(records)
    verdict = await store.verify()
    assert verdict.ok, verdict.problems


FAST = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(plan=steps)
def test_random_walks_on_the_memory_store(plan: list[tuple[str, int]]) -> None:
    asyncio.run(walk(MemoryStore(), plan))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plan=steps)
def test_random_walks_on_sqlite(plan: list[tuple[str, int]]) -> None:
    async def main() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            store = SQLiteStore(str(Path(tmp) / "walk.db"))
            await store.open()
            try:
                await walk(store, plan)
            finally:
                await store.close()
            # and once more from the file alone, with no cache
            again = SQLiteStore(str(Path(tmp) / "walk.db"))
            await again.open()
            try:
                assert (await again.verify()).ok
                records = await again.list_audit(AuditQuery(entity_id="w", limit=10_000))
                entity = await again.get("agent", "w")
                assert entity is not None and entity.state == audit.replay(records, "registered")
            finally:
                await again.close()

    asyncio.run(main())
