"""How an entity and a timer become a row and back: one codec for every SQL backend.

The SQL stores keep the same columns in the same order (``ENTITY_COLUMNS``,
``TIMER_COLUMNS``); only their placeholders and extra columns differ (PostgreSQL adds a
``capabilities`` array for its index).
"""

from __future__ import annotations

import json
from typing import Any

from opscore.models import Entity, Timer

ENTITY_COLUMNS = (
    "entity_type, entity_id, state, revision, seq, head_hash, data, created_at, updated_at, "
    "last_seen_at, last_report_at, last_details"
)
TIMER_COLUMNS = "key, due_at, kind, entity_type, entity_id, payload"


def dumps(value: Any) -> str:
    """Compact JSON for a stored (never hashed) value; ``{}`` without serialising it."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")) if value else "{}"


def entity_from_row(row: tuple[Any, ...]) -> Entity:
    """An :class:`Entity` from a row selected as ``ENTITY_COLUMNS``."""
    return Entity(
        entity_type=row[0],
        entity_id=row[1],
        state=row[2],
        revision=row[3],
        seq=row[4],
        head_hash=row[5],
        data=json.loads(row[6]),
        created_at=row[7],
        updated_at=row[8],
        last_seen_at=row[9],
        last_report_at=row[10],
        last_details=json.loads(row[11]),
    )


def entity_values(e: Entity) -> tuple[Any, ...]:
    """The values of ``ENTITY_COLUMNS`` for ``e``, in that order."""
    return (
        e.entity_type,
        e.entity_id,
        e.state,
        e.revision,
        e.seq,
        e.head_hash,
        dumps(e.data),
        e.created_at,
        e.updated_at,
        e.last_seen_at,
        e.last_report_at,
        dumps(e.last_details),
    )


def timer_from_row(row: tuple[Any, ...]) -> Timer:
    """A :class:`Timer` from a row selected as ``TIMER_COLUMNS``."""
    return Timer(row[0], row[1], row[2], row[3], row[4], json.loads(row[5]))
