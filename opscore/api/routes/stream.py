"""``GET /v1/opscore/audit/stream``: audit records as Server-Sent Events, live (DESIGN §10)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from opscore.api.deps import Reads, StoreDep
from opscore.api.openapi import errors
from opscore.api.streams import EventStream, Hub
from opscore.models import AuditQuery

router = APIRouter(prefix="/v1/opscore", tags=["audit"])

STREAM_CONTENT: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "`text/event-stream`: per record `id: <position>`, `event: audit`, "
        "`data: <the record as one line of JSON>`; `: ping` comments when idle; a final `event: end` "
        '(`{"reason": "slow_consumer" | "shutdown" | "max_age", "detail", "lastEventId"}`) before the server '
        "closes it",
        # OpenAPI 3.1: for an event stream, `schema` describes one event (3.2 would say `itemSchema`)
        "content": {
            "text/event-stream": {
                "schema": {
                    "type": "object",
                    "required": ["data"],
                    "properties": {
                        "event": {"type": "string", "enum": ["audit", "end"]},
                        "id": {"type": "string", "description": "the record's position (opaque)"},
                        "data": {
                            "type": "string",
                            "description": "`audit`: the record as one line of JSON; "
                            '`end`: `{"reason", "detail", "lastEventId"}`',
                        },
                        "retry": {"type": "integer"},
                    },
                }
            }
        },
    }
}


@router.get(
    "/audit/stream",
    summary="Follow the audit log live (Server-Sent Events)",
    response_class=Response,
    responses={**STREAM_CONTENT, **errors(429, 503)},
)
async def audit_stream(
    request: Request,
    store: StoreDep,
    who: Reads,
    entityType: Annotated[str | None, Query(description="agent, workflow or task")] = None,  # noqa: N803
    entityId: Annotated[str | None, Query(description="only this entity's records")] = None,  # noqa: N803
    outcome: Annotated[Literal["applied", "rejected"] | None, Query(description="only applied or rejected")] = None,
    after: Annotated[
        str | None,
        Query(description="resume after this position (an event's `id`); `0`: from the first record"),
    ] = None,
) -> Response:
    """Each record committed after the position, once and in one order, then every new one as it commits.

    The position is the `Last-Event-ID` header (what a browser's `EventSource` sends when it
    reconnects), else `after`; without either, only records committed from now on. A position
    is opaque: pass back an `id` this server sent. 422 `invalid_position` for anything else;
    429 `too_many_streams` when the key holds `OPSCORE_MAX_STREAMS_PER_KEY` open streams.
    """
    hub: Hub = request.app.state.streams
    given = request.headers.get("last-event-id") or after
    if given is not None:
        store.parse_position(given.strip())  # 422 before anything is sent
        start = given.strip()
    else:
        start = await store.stream_head()
    key = who.key.name
    hub.acquire(key)
    query = AuditQuery(entity_type=entityType, entity_id=entityId, outcome=outcome)
    return EventStream(hub, store, query, start, key)
