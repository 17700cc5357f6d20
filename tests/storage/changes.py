"""The change a store receives for one agent state report, built as the engine builds it."""

from __future__ import annotations

from opscore import audit
from opscore.models import Change, Entity


def agent_change(entity_id: str, state: str, revision: int, *, source: str | None = None, event: str = "go") -> Change:
    """An applied move of agent ``entity_id`` to ``state`` on ``revision`` (created when new)."""
    draft = audit.draft(
        entity_type="agent",
        entity_id=entity_id,
        event=event,
        source=source,
        dest=state,
        outcome="applied",
        reason=None,
        actor="key:test",
        request_id=None,
        details={},
        reported_at=None,
    )
    seed = Entity("agent", entity_id, "registered")
    return Change("agent", entity_id, create=seed, expected_revision=revision, state=state, record=draft)
