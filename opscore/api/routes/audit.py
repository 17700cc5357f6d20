"""Audit records: one entity's or everyone's, paged by an opaque cursor, and verification."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from opscore import checkpoints
from opscore.api.deps import Reads, ReadsAgent, StoreDep
from opscore.api.openapi import errors
from opscore.api.paging import AuditFiltersDep, audit_page
from opscore.api.schemas import AgentIdPath, AuditPage, VerifyAnswer
from opscore.audit import Verification
from opscore.errors import UnknownEntity
from opscore.singleflight import SingleFlight

router = APIRouter(prefix="/v1/opscore", tags=["audit"])


@router.get(
    "/agent/{agent_id}/audit", summary="An agent's audit records", response_model=AuditPage, responses=errors(404, 503)
)
async def agent_audit(
    agent_id: AgentIdPath,
    store: StoreDep,
    caller: ReadsAgent,
    filters: AuditFiltersDep,
) -> Response:
    """Applied and refused transitions of one agent, in `seq` order (or reversed)."""
    if await store.get("agent", agent_id) is None:
        raise UnknownEntity("agent", agent_id)
    return await audit_page(store, filters, entity_type="agent", entity_id=agent_id)


@router.get("/audit", summary="Audit records of every entity", response_model=AuditPage, responses=errors(503))
async def all_audit(
    store: StoreDep,
    caller: Reads,
    filters: AuditFiltersDep,
    entityType: Annotated[str | None, Query(description="agent, workflow or task")] = None,  # noqa: N803
) -> Response:
    """Every record in `id` order (global), with the same filters as an agent's audit."""
    return await audit_page(store, filters, entity_type=entityType)


@router.get("/audit/verify", summary="Recompute every hash chain", response_model=VerifyAnswer, responses=errors(503))
async def verify(request: Request, store: StoreDep, caller: Reads) -> dict[str, Any]:
    """Checks every record's hash, every `prevHash` link, gap-free `seq`, each entity's stored head,
    state and revision (the replay of its chain) and, when this server signs checkpoints, every
    head they pinned.

    One verification runs at a time: callers arriving while one runs share its answer.
    """
    flight: SingleFlight[Verification] | None = getattr(request.app.state, "verification", None)
    if flight is None:
        flight = request.app.state.verification = SingleFlight()
    runner = getattr(request.app.state, "checkpointer", None)

    async def check() -> Verification:
        signed = await runner.signed() if runner is not None else None
        return await checkpoints.verify_database(store, signed)

    result = await flight.run(check)
    return result.to_dict()
