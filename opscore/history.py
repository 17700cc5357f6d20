"""An entity as it was: its state, revision and recent path, now or at any past moment.

The audit chain is the history: every applied transition has its record, written in the same
transaction as the state change (DESIGN §4). So the state at a moment ``at`` is the replay of
the applied records with ``recordedAt <= at`` from the machine's initial state, and the
revision is how many of them there were. Refused records move nothing but still count in
``seq``; metadata records (``update_metadata``) are applied but move neither state nor revision.

That replay is the definition, not the method: the SQL stores *seek* instead
(:meth:`~opscore.storage.base.Store.position_at`: the last record at or before the moment, and
the transition that produced its revision, each an index lookup), so ``?at=`` costs the same on
a chain of ten records or of a million. Where a store cannot seek (the memory store; records
written before schema 2) :func:`at` replays, with the same answer.

Moments before the entity existed (``at`` earlier than its ``createdAt``) have no state:
:class:`~opscore.errors.NotYetCreated` (404), rather than an invented initial state. Between
its creation and its first record it is in the initial state with revision 0.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from opscore.audit import is_transition
from opscore.errors import NotYetCreated
from opscore.models import AuditQuery, Entity
from opscore.storage.base import Store

PAGE = 1000


@dataclass(frozen=True, slots=True)
class Snapshot:
    """An entity's position at ``at`` (``None``: now) and the applied records that led there."""

    entity_type: str
    entity_id: str
    state: str
    at: str | None
    seq: int
    revision: int
    as_of_record_id: int | None = None
    since: str | None = None
    previous_state: str | None = None
    details: dict[str, Any] = field(default_factory=dict)
    timestamp: str | None = None
    path: list[dict[str, Any]] = field(default_factory=list)
    """The last applied records up to ``at``, oldest first (as many as were asked for)."""


async def recent_path(
    store: Store, entity_type: str, entity_id: str, last: int, up_to_id: int | None = None
) -> list[dict[str, Any]]:
    """The entity's last ``last`` transitions (up to record ``up_to_id`` included), oldest first.

    Read newest first along the entity's index, a page at a time until ``last`` are found:
    applied metadata records (no transition) are skipped without shortening the path.
    """
    found: list[dict[str, Any]] = []
    after = None if up_to_id is None else up_to_id + 1
    while len(found) < last:
        want = last - len(found) + 16
        page = await store.list_audit(
            AuditQuery(
                entity_type=entity_type,
                entity_id=entity_id,
                outcome="applied",
                descending=True,
                after_id=after,
                limit=want,
            )
        )
        found.extend(r for r in page if is_transition(r))
        if len(page) < want:
            break
        after = int(page[-1]["id"])
    return found[:last][::-1]


async def now(store: Store, entity: Entity, last: int) -> Snapshot:
    """The entity as stored, with its last ``last`` applied records."""
    path = await recent_path(store, entity.entity_type, entity.entity_id, last)
    return Snapshot(
        entity_type=entity.entity_type,
        entity_id=entity.entity_id,
        state=entity.state,
        at=None,
        seq=entity.seq,
        revision=entity.revision,
        details=entity.last_details,
        timestamp=entity.last_report_at or entity.updated_at,
        path=path,
    )


async def at(store: Store, entity: Entity, initial: str, moment: str, last: int) -> Snapshot:
    """The entity as it was at ``moment`` (fixed-width UTC ISO text, inclusive), with its last ``last`` steps."""
    if entity.created_at and moment < entity.created_at:
        raise NotYetCreated(
            f"{entity.entity_type} {entity.entity_id!r} was first seen at {entity.created_at}; "
            f"it did not exist yet at {moment}",
            createdAt=entity.created_at,
            at=moment,
        )
    position = await store.position_at(entity.entity_type, entity.entity_id, moment)
    if position is None:
        return await replay(store, entity, initial, moment, last)
    record, producer = position.last, position.transition
    path: list[dict[str, Any]] = []
    if record is not None and last > 0:
        path = await recent_path(store, entity.entity_type, entity.entity_id, last, up_to_id=int(record["id"]))
    return _snapshot(
        entity,
        state=initial if producer is None else str(producer["dest"]),
        moment=moment,
        seq=0 if record is None else int(record["seq"]),
        revision=position.revision,
        as_of=None if record is None else int(record["id"]),
        last_applied=producer,
        path=path,
    )


async def replay(store: Store, entity: Entity, initial: str, moment: str, last: int) -> Snapshot:
    """:func:`at` by replaying the chain up to ``moment``: the definition, and the fallback.

    Reads the chain in pages, keeping only the last ``last`` applied records, so memory stays
    small however long the chain is.
    """
    state, revision, seq = initial, 0, 0
    as_of: int | None = None
    last_applied: dict[str, Any] | None = None
    path: deque[dict[str, Any]] = deque(maxlen=max(last, 0))
    after: int | None = None
    while True:
        page = await store.list_audit(
            AuditQuery(
                entity_type=entity.entity_type,
                entity_id=entity.entity_id,
                until=moment,
                after_id=after,
                limit=PAGE,
            )
        )
        for record in page:
            seq, as_of = int(record["seq"]), int(record["id"])
            if is_transition(record):
                state = str(record["dest"])
                revision += 1
                last_applied = record
                if last > 0:
                    path.append(record)
        if len(page) < PAGE:
            break
        after = int(page[-1]["id"])
    return _snapshot(
        entity,
        state=state,
        moment=moment,
        seq=seq,
        revision=revision,
        as_of=as_of,
        last_applied=last_applied,
        path=list(path),
    )


def _snapshot(
    entity: Entity,
    *,
    state: str,
    moment: str,
    seq: int,
    revision: int,
    as_of: int | None,
    last_applied: dict[str, Any] | None,
    path: list[dict[str, Any]],
) -> Snapshot:
    """The snapshot at ``moment``; ``last_applied`` is the transition that led to ``state``."""
    return Snapshot(
        entity_type=entity.entity_type,
        entity_id=entity.entity_id,
        state=state,
        at=moment,
        seq=seq,
        revision=revision,
        as_of_record_id=as_of,
        since=None if last_applied is None else last_applied["recordedAt"],
        previous_state=None if last_applied is None else last_applied.get("source"),
        details={} if last_applied is None else dict(last_applied.get("details") or {}),
        timestamp=None if last_applied is None else (last_applied.get("reportedAt") or last_applied["recordedAt"]),
        path=path,
    )
