"""Agents: registration, state reports, trigger requests, reading them back."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request

from opscore import history
from opscore.api.deps import (
    REPORTS_AGENT,
    ContextDep,
    EngineDep,
    Operates,
    Reads,
    ReadsAgent,
    Reports,
    ReportsAgent,
    StoreDep,
    caller,
    context,
    parse_moment,
)
from opscore.api.fastroute import Call, twin
from opscore.api.openapi import errors, example
from opscore.api.paging import encode_cursor, text_position
from opscore.api.responses import JsonAnswer
from opscore.api.schemas import (
    AGENT_DETAILS_EXAMPLE,
    STATE_REPORT_EXAMPLE,
    TRIGGER_EXAMPLE,
    AgentDetails,
    AgentIdPath,
    AgentPage,
    AgentStateAtView,
    AgentView,
    StateReport,
    StateReportAnswer,
    TriggerRequest,
)
from opscore.api.views import agent_metadata, agent_view
from opscore.engine import Context, Engine
from opscore.errors import AgentIdMismatch
from opscore.idempotency import Replay
from opscore.models import Entity, EntityQuery, TransitionResult

router = APIRouter(prefix="/v1/opscore", tags=["agents"])

AgentId = AgentIdPath


def answer(result: TransitionResult | Replay) -> JsonAnswer:
    """A transition's answer, with the entity's ``ETag``."""
    if isinstance(result, Replay):
        status, body = result.status, result.body
    else:
        status, body = 200, result.answer()
    revision = body.get("revision")
    headers = {"ETag": f'"{revision}"'} if isinstance(revision, int) else None
    return JsonAnswer(body, status_code=status, headers=headers)


async def register(engine: Engine, details: AgentDetails, ctx: Context) -> tuple[Entity, bool]:
    return await engine.upsert("agent", details.agentId, agent_metadata(details), ctx=ctx)


@router.post(
    "/agents",
    summary="Register an agent, or update a known agent's metadata",
    status_code=201,
    response_model=AgentView,
    responses={
        201: {"description": "registered"},
        200: {"model": AgentView, "description": "known agent, metadata updated"},
        **errors(409, 503),
    },
    openapi_extra=example(AGENT_DETAILS_EXAMPLE),
)
async def register_agent(body: AgentDetails, engine: EngineDep, request: Request, caller: Reports) -> JsonAnswer:
    """Body as the webhook's `agent_details`. A known agent keeps its state; only its metadata changes."""
    caller.require_report_for(request, body.agentId)
    entity, created = await register(engine, body, Context(actor=caller.actor))
    return JsonAnswer(agent_view(entity), status_code=201 if created else 200, headers={"ETag": f'"{entity.revision}"'})


@router.get("/agents", summary="List agents", response_model=AgentPage, responses=errors(503))
async def list_agents(
    store: StoreDep,
    caller: Reads,
    state: Annotated[str | None, Query(description="only agents in this state")] = None,
    capability: Annotated[str | None, Query(description="only agents with this capability")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: Annotated[str | None, Query(description="nextCursor of the previous page")] = None,
) -> JsonAnswer:
    """Agents ordered by id, one page at a time."""
    after = text_position(cursor)
    entities = await store.list_entities(
        EntityQuery("agent", state=state, capability=capability, after_id=after, limit=limit + 1)
    )
    more = len(entities) > limit
    entities = entities[:limit]
    return JsonAnswer(
        {
            "items": [agent_view(e) for e in entities],
            "nextCursor": encode_cursor(entities[-1].entity_id) if more else None,
        }
    )


@router.get("/agent/{agent_id}", summary="One agent", response_model=AgentView, responses=errors(404, 503))
async def get_agent(agent_id: AgentId, engine: EngineDep, caller: ReadsAgent) -> JsonAnswer:
    """Metadata, `state`, `revision` (also the `ETag`) and `lastSeenAt`."""
    entity = await engine.get("agent", agent_id)
    return JsonAnswer(agent_view(entity), headers={"ETag": f'"{entity.revision}"'})


@router.post(
    "/agent/{agent_id}/state",
    summary="Report an agent's state (AgentKit SDK)",
    response_model=StateReportAnswer,
    responses=errors(409, 503),
    openapi_extra=example(STATE_REPORT_EXAMPLE),
)
async def report_state(
    agent_id: AgentId, body: StateReport, ctx: ContextDep, request: Request, caller: ReportsAgent
) -> JsonAnswer:
    """Applies the one declared transition to the reported state; the same state is a heartbeat.

    An agent never seen before is registered on the spot (AgentKit reports before its
    registration webhook arrives). 409 `illegal_transition` or `stale_report`, 422 for an
    unknown state; refusals are written to the audit log too.
    """
    if body.agentId is not None and body.agentId != agent_id:
        raise AgentIdMismatch(f"body agentId {body.agentId!r} does not match the path's {agent_id!r}")
    engine: Engine = request.app.state.engine
    seed = Entity("agent", agent_id, engine.fsm("agent").initial)
    result = await engine.report(
        "agent", agent_id, body.state, ctx=ctx, reported_at=body.timestamp, details=body.details, create=seed
    )
    return answer(result)


@twin(report_state)
async def report_state_fast(call: Call) -> JsonAnswer:
    """``report_state`` without FastAPI's solver: its dependencies in its signature's order (``api/fastroute.py``)."""
    request = call.request
    who = await caller(request)
    ctx = await context(request, who)
    who = await REPORTS_AGENT(request, who)
    args = call.arguments()
    return await report_state(args["agent_id"], args["body"], ctx, request, who)


@router.get(
    "/agent/{agent_id}/state",
    summary="An agent's state, now or at any past moment",
    response_model=AgentStateAtView,
    responses=errors(404, 503),
)
async def get_state(
    agent_id: AgentId,
    engine: EngineDep,
    caller: ReadsAgent,
    at: Annotated[
        str | None,
        Query(description="the state at this ISO-8601 time, replayed from the agent's audit chain; default: now"),
    ] = None,
) -> JsonAnswer:
    """The state, the details and timestamp of the newest accepted report, and the revision.

    With `at`: the state replayed from the applied audit records with `recordedAt <= at`, plus
    `at`, `seq` and `asOfRecordId` (the chain's last record then), `since` (when it entered that
    state) and `previousState`; `details`/`timestamp` come from that last applied record. Before
    the first record the agent is in `registered` at revision 0; before it existed, 404
    `not_yet_created`.
    """
    moment = parse_moment(at)
    entity = await engine.get("agent", agent_id)
    if moment is None:
        return JsonAnswer(
            {
                "agentId": entity.entity_id,
                "state": entity.state,
                "details": entity.last_details,
                "timestamp": entity.last_report_at or entity.updated_at,
                "revision": entity.revision,
            },
            headers={"ETag": f'"{entity.revision}"'},
        )
    snap = await history.at(engine.store, entity, engine.fsm("agent").initial, moment, last=0)
    return JsonAnswer(
        {
            "agentId": entity.entity_id,
            "state": snap.state,
            "details": snap.details,
            "timestamp": snap.timestamp,
            "revision": snap.revision,
            "at": snap.at,
            "seq": snap.seq,
            "asOfRecordId": snap.as_of_record_id,
            "since": snap.since,
            "previousState": snap.previous_state,
        }
    )


@router.post(
    "/agent/{agent_id}/transitions",
    summary="Fire a trigger by name (operators)",
    response_model=StateReportAnswer,
    responses=errors(404, 409, 503),
    openapi_extra=example(TRIGGER_EXAMPLE),
)
async def fire_trigger(
    agent_id: AgentId, body: TriggerRequest, engine: EngineDep, ctx: ContextDep, caller: Operates
) -> JsonAnswer:
    """`{"trigger": "recover"}`: 422 for an unknown trigger, 409 when it is illegal from the current state."""
    result = await engine.fire("agent", agent_id, body.trigger, ctx=ctx, details=body.details)
    return answer(result)
