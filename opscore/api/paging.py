"""Paged listings shared by several routes: the audit filters and the audit page answer.

An audit page is written from the records' stored JSON text, never re-encoded through a
response model: whatever a store holds can always be listed (a record too deep for a
serialiser, written before today's input rules, once made every page holding it answer 500),
and each served record is exactly the text that hashes to its ``hash``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Annotated, Literal

from fastapi import Depends, Query
from fastapi.responses import Response

from opscore.api.deps import decode_cursor, encode_cursor, parse_moment
from opscore.errors import InvalidCursor
from opscore.models import AuditQuery
from opscore.storage.base import Store

Limit = Annotated[int, Query(ge=1, le=1000, description="records per page (at most 1000)")]
Cursor = Annotated[str | None, Query(description="nextCursor of the previous page")]
Since = Annotated[str | None, Query(description="only records recorded at or after this time (ISO-8601)")]
Until = Annotated[str | None, Query(description="only records recorded at or before this time (ISO-8601)")]
Outcome = Annotated[Literal["applied", "rejected"] | None, Query(description="only applied or only rejected")]
Order = Annotated[Literal["asc", "desc"], Query(description="oldest first (asc) or newest first (desc)")]


@dataclass(frozen=True, slots=True)
class AuditFilters:
    """The query parameters every audit listing takes (one agent, everyone, one run)."""

    limit: int
    cursor: str | None
    since: str | None
    until: str | None
    outcome: str | None
    order: str


async def audit_filters(
    limit: Limit = 100,
    cursor: Cursor = None,
    since: Since = None,
    until: Until = None,
    outcome: Outcome = None,
    order: Order = "asc",
) -> AuditFilters:
    return AuditFilters(limit, cursor, since, until, outcome, order)


AuditFiltersDep = Annotated[AuditFilters, Depends(audit_filters)]


def audit_position(cursor: str | None, order: str) -> int | None:
    """The record id an audit cursor points after; 422 ``invalid_cursor`` for anything else."""
    after = decode_cursor(cursor, order)
    # bool is an int, and an int past 2**63 makes sqlite3/psycopg raise OverflowError (a 500)
    if after is not None and (not isinstance(after, int) or isinstance(after, bool) or not 0 <= after < 2**63):
        raise InvalidCursor()
    return after


async def audit_page(
    store: Store,
    filters: AuditFilters,
    *,
    entity_type: str | None = None,
    entity_id: str | None = None,
    entity_ids: tuple[str, ...] | None = None,
    entity_types: tuple[str, ...] | None = None,
) -> Response:
    """One page of records, ``{"items": [...], "nextCursor"}``, written from the stored texts."""
    limit, order, since, until = filters.limit, filters.order, filters.since, filters.until
    query = AuditQuery(
        entity_type=entity_type,
        entity_id=entity_id,
        entity_ids=entity_ids,
        entity_types=entity_types,
        outcome=filters.outcome,
        since=parse_moment(since, "since"),
        until=parse_moment(until, "until"),
        descending=order == "desc",
        after_id=audit_position(filters.cursor, order),
        limit=limit + 1,
    )
    rows = await store.list_audit_text(query)
    more = len(rows) > limit
    rows = rows[:limit]
    cursor = json.dumps(encode_cursor(rows[-1][0], order)) if more else "null"
    body = '{"items":[' + ",".join(text for _, text in rows) + '],"nextCursor":' + cursor + "}"
    return Response(body.encode("utf-8"), media_type="application/json")
