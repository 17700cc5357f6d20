"""Paged listings shared by several routes: the audit filters and the audit page answer.

An audit page is written from the records' stored JSON text, never re-encoded through a
response model: whatever a store holds can always be listed (a record too deep for a
serialiser, written before today's input rules, once made every page holding it answer 500),
and each served record is exactly the text that hashes to its ``hash``.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import Depends, Query
from fastapi.responses import Response

from opscore.api.deps import parse_moment
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


def encode_cursor(position: Any, order: str = "asc") -> str:
    raw = json.dumps({"p": position, "o": order}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str | None, order: str = "asc") -> Any:
    """The position inside an opaque cursor; 422 when it is not one of ours or of another order."""
    if cursor is None:
        return None
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        data = json.loads(raw)
        position, cursor_order = data["p"], data["o"]
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidCursor() from exc
    if cursor_order != order:
        raise InvalidCursor(f"this cursor pages in {cursor_order} order, not {order}")
    return position


def text_position(cursor: str | None, order: str = "asc") -> str | None:
    """The id a cursor of an id-ordered listing points after (agents)."""
    after = decode_cursor(cursor, order)
    if after is not None and (not isinstance(after, str) or "\x00" in after):
        raise InvalidCursor()
    return after


def int_position(cursor: str | None, order: str = "asc") -> int | None:
    """The number a cursor points after (record ids, definitions' publication order)."""
    after = decode_cursor(cursor, order)
    # bool is an int, and an int past 2**63 makes sqlite3/psycopg raise OverflowError (a 500)
    if after is not None and (not isinstance(after, int) or isinstance(after, bool) or not 0 <= after < 2**63):
        raise InvalidCursor()
    return after


def pair_position(cursor: str | None, order: str = "asc") -> tuple[str, str] | None:
    """The (createdAt, id) a cursor of a creation-ordered listing points after (runs)."""
    after = decode_cursor(cursor, order)
    if after is None:
        return None
    if not (isinstance(after, list) and len(after) == 2 and all(isinstance(p, str) for p in after)):
        raise InvalidCursor()
    return after[0], after[1]


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
        after_id=int_position(filters.cursor, order),
        limit=limit + 1,
    )
    rows = await store.list_audit_text(query)
    more = len(rows) > limit
    rows = rows[:limit]
    cursor = json.dumps(encode_cursor(rows[-1][0], order)) if more else "null"
    body = '{"items":[' + ",".join(text for _, text in rows) + '],"nextCursor":' + cursor + "}"
    return Response(body.encode("utf-8"), media_type="application/json")
