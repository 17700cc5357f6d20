"""ONE test generated from the declaration: every ordered pair of agent states through the Engine.

Exactly the declared (source, dest) pairs are applied; a report of the current state is a
heartbeat; every other pair is refused as 409 ``illegal_transition`` and recorded.
"""

from __future__ import annotations

import asyncio

import pytest

from opscore.api.errors import status_of
from opscore.engine import Context, Engine
from opscore.errors import IllegalTransition
from opscore.models import AuditQuery, Entity, TransitionResult
from opscore.storage.memory import MemoryStore
from tests.pairs import DECLARED, STATES, pair_params, path_to

CTX = Context(actor="key:test")


def test_every_state_is_reachable() -> None:
    for state in STATES:
        path_to(state)


@pytest.mark.parametrize(("source", "target"), pair_params())
def test_every_ordered_pair(source: str, target: str) -> None:
    async def scenario() -> None:
        store = MemoryStore()
        engine = Engine(store)
        await engine.upsert("agent", "a", {}, ctx=CTX)
        for trigger in path_to(source):
            await engine.fire("agent", "a", trigger, ctx=CTX)
        before = await engine.get("agent", "a")
        assert before.state == source
        records_before = len(store.records)

        seed = Entity("agent", "a", "registered")
        if source == target:
            result = await engine.report("agent", "a", target, ctx=CTX, create=seed)
            assert isinstance(result, TransitionResult)
            assert result.changed is False and result.record is None
            assert len(store.records) == records_before
            assert (await engine.get("agent", "a")).revision == before.revision
        elif (source, target) in DECLARED:
            result = await engine.report("agent", "a", target, ctx=CTX, create=seed)
            assert isinstance(result, TransitionResult)
            assert result.changed is True and result.entity.state == target
            assert result.entity.revision == before.revision + 1
            assert result.record is not None
            assert (result.record["event"], result.record["outcome"]) == (DECLARED[(source, target)], "applied")
        else:
            with pytest.raises(IllegalTransition) as info:
                await engine.report("agent", "a", target, ctx=CTX, create=seed)
            err = info.value
            assert status_of(err) == 409 and err.code == "illegal_transition"
            assert err.extra["from"] == source and err.extra["to"] == target
            assert err.extra["allowed"] == [d for s in STATES for (src, d) in DECLARED if src == source and d == s]
            after = await engine.get("agent", "a")
            assert after.state == source and after.revision == before.revision
            (record,) = await store.list_audit(AuditQuery(after_id=records_before, limit=10))
            assert (record["outcome"], record["reason"]) == ("rejected", "illegal_transition")
            assert (record["source"], record["dest"]) == (source, target)
            assert err.extra["auditId"] == record["id"]

    asyncio.run(scenario())
