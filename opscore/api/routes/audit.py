"""Audit records: one entity's or everyone's, paged by an opaque cursor, and verification."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Query

from opscore.api.deps import CallerDep, StoreDep, decode_cursor, encode_cursor
from opscore.api.openapi import errors
from opscore.api.schemas import AuditPage, VerifyAnswer
from opscore.engine import normalise_time
from opscore.errors import Invalid, UnknownEntity
from opscore.models import AuditQuery
from opscore.storage.base import Store

router = APIRouter(prefix="/v1/opscore", tags=["audit"])

Limit = Annotated[int, Query(ge=1, le=1000, description="records per page (at most 1000)")]
Cursor = Annotated[str | None, Query(description="nextCursor of the previous page")]
Since = Annotated[datetime | None, Query(description="only records recorded at or after this time (ISO-8601)")]
Until = Annotated[datetime | None, Query(description="only records recorded at or before this time (ISO-8601)")]
Outcome = Annotated[Literal["applied", "rejected"] | None, Query(description="only applied or only rejected")]
Order = Annotated[Literal["asc", "desc"], Query(description="oldest first (asc) or newest first (desc)")]


@dataclass(frozen=True, slots=True)
class AuditFilters:
    """The query parameters every audit listing takes (one agent, everyone, one run)."""

    limit: int
    cursor: str | None
    since: datetime | None
    until: datetime | None
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


async def audit_page(
    store: Store,
    filters: AuditFilters,
    *,
    entity_type: str | None = None,
    entity_id: str | None = None,
    entity_ids: tuple[str, ...] | None = None,
) -> dict[str, Any]:
    """One page of records and the cursor of the next (``None`` on the last page)."""
    limit, order, since, until = filters.limit, filters.order, filters.since, filters.until
    after = decode_cursor(filters.cursor, order)
    # bool is an int, and an int past 2**63 makes sqlite3/psycopg raise OverflowError (a 500)
    if after is not None and (not isinstance(after, int) or isinstance(after, bool) or not 0 <= after < 2**63):
        raise Invalid("cursor is not a cursor this server handed out", code="invalid_cursor")
    query = AuditQuery(
        entity_type=entity_type,
        entity_id=entity_id,
        entity_ids=entity_ids,
        outcome=filters.outcome,
        since=None if since is None else normalise_time(since),
        until=None if until is None else normalise_time(until),
        descending=order == "desc",
        after_id=after,
        limit=limit + 1,
    )
    records = await store.list_audit(query)
    more = len(records) > limit
    records = records[:limit]
    return {"items": records, "nextCursor": encode_cursor(records[-1]["id"], order) if more else None}


@router.get(
    "/agent/{agent_id}/audit", summary="An agent's audit records", response_model=AuditPage, responses=errors(404, 503)
)
async def agent_audit(
    agent_id: Annotated[str, Path(min_length=1, max_length=256)],
    store: StoreDep,
    actor: CallerDep,
    filters: AuditFiltersDep,
) -> dict[str, Any]:
    """Applied and refused transitions of one agent, in `seq` order (or reversed)."""
    if await store.get("agent", agent_id) is None:
        raise UnknownEntity("agent", agent_id)
    return await audit_page(
        store,
        filters,
        entity_type="agent",
        entity_id=agent_id,
    )


@router.get("/audit", summary="Audit records of every entity", response_model=AuditPage, responses=errors(503))
async def all_audit(
    store: StoreDep,
    actor: CallerDep,
    filters: AuditFiltersDep,
    entityType: Annotated[str | None, Query(description="agent, workflow or task")] = None,  # noqa: N803
) -> dict[str, Any]:
    """Every record in `id` order (global), with the same filters as an agent's audit."""
    return await audit_page(
        store,
        filters,
        entity_type=entityType,
    )


@router.get("/audit/verify", summary="Recompute every hash chain", response_model=VerifyAnswer, responses=errors(503))
async def verify(store: StoreDep, actor: CallerDep) -> dict[str, Any]:
    """Checks every record's hash, every `prevHash` link, gap-free `seq` and each entity's stored head."""
    result = await store.verify()
    return result.to_dict()
