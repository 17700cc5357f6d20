"""Rows and queries shared by every SQL backend: entity/timer codecs and the page SELECTs.

The SQL stores keep the same columns in the same order (``ENTITY_COLUMNS``,
``TIMER_COLUMNS``); only their placeholders and extra columns differ (PostgreSQL adds a
``capabilities`` array for its index).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from opscore.models import AuditQuery, Entity, EntityQuery, Timer

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


@dataclass(frozen=True, slots=True)
class Dialect:
    """What the SQL stores' queries differ in: placeholders and three expressions."""

    ph: str
    capability: str
    """Tests that ``data.capabilities`` holds the one bound value."""
    id_prefix: str
    """Tests ``entity_id`` against a prefix: binds its length, then the prefix."""
    ids_as_array: bool
    """``entity_id = ANY(<one array>)`` rather than ``IN (<one value each>)``."""


SQLITE = Dialect(
    ph="?",
    capability="EXISTS (SELECT 1 FROM json_each(data, '$.capabilities') WHERE value = ?)",
    id_prefix="substr(entity_id, 1, ?) = ?",
    ids_as_array=False,
)
POSTGRES = Dialect(
    ph="%s",
    capability="capabilities @> ARRAY[%s]::text[]",
    id_prefix="left(entity_id, %s) = %s",
    ids_as_array=True,
)


def select_entities(query: EntityQuery, d: Dialect) -> tuple[str, list[Any]]:
    """The page of ``query`` as one SELECT of ``ENTITY_COLUMNS`` and its parameters."""
    p = d.ph
    sql = [f"SELECT {ENTITY_COLUMNS} FROM entities WHERE entity_type = {p}"]
    params: list[Any] = [query.entity_type]
    if query.state is not None:
        sql.append(f"AND state = {p}")
        params.append(query.state)
    if query.capability is not None:
        sql.append(f"AND {d.capability}")
        params.append(query.capability)
    if query.id_prefix is not None:
        sql.append(f"AND {d.id_prefix}")
        params.extend([len(query.id_prefix), query.id_prefix])
    if query.seen_before is not None:
        sql.append(f"AND COALESCE(last_seen_at, '') < {p}")
        params.append(query.seen_before)
    if query.after_id is not None:
        sql.append(f"AND entity_id > {p}")
        params.append(query.after_id)
    sql.append(f"ORDER BY entity_id LIMIT {p}")
    params.append(query.limit)
    return " ".join(sql), params


def select_audit(query: AuditQuery, d: Dialect, columns: str = "body") -> tuple[str, list[Any]]:
    """The page of ``query`` as one SELECT of ``columns`` (keyset on ``id``) and its parameters."""
    p = d.ph
    sql = [f"SELECT {columns} FROM audit WHERE 1=1"]
    params: list[Any] = []
    if query.entity_type is not None:
        sql.append(f"AND entity_type = {p}")
        params.append(query.entity_type)
    if query.entity_id is not None:
        sql.append(f"AND entity_id = {p}")
        params.append(query.entity_id)
    if query.entity_ids is not None:
        if d.ids_as_array:
            sql.append(f"AND entity_id = ANY({p})")
            params.append(list(query.entity_ids))
        else:
            sql.append(f"AND entity_id IN ({','.join([p] * len(query.entity_ids))})")
            params.extend(query.entity_ids)
    if query.entity_types is not None:
        sql.append(f"AND entity_type IN ({','.join([p] * len(query.entity_types))})")
        params.extend(query.entity_types)
    if query.outcome is not None:
        sql.append(f"AND outcome = {p}")
        params.append(query.outcome)
    if query.since is not None:
        sql.append(f"AND recorded_at >= {p}")
        params.append(query.since)
    if query.until is not None:
        sql.append(f"AND recorded_at <= {p}")
        params.append(query.until)
    if query.after_id is not None:
        sql.append(f"AND id < {p}" if query.descending else f"AND id > {p}")
        params.append(query.after_id)
    sql.append(f"ORDER BY id {'DESC' if query.descending else 'ASC'} LIMIT {p}")
    params.append(query.limit)
    return " ".join(sql), params
