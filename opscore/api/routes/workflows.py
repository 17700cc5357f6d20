"""Workflow definitions and runs: publish, start, inspect, pause/resume/cancel/retry, audit."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from pydantic import AfterValidator, Field
from pydantic_core import PydanticCustomError

from opscore.api.deps import ContextDep, Operates, Reads, StoreDep
from opscore.api.openapi import errors, example, raw_body
from opscore.api.paging import AuditFiltersDep, audit_page, encode_cursor, int_position, pair_position
from opscore.api.responses import JsonAnswer
from opscore.api.schemas import (
    DEFINITION_EXAMPLE,
    RUN_TRIGGER_EXAMPLE,
    START_RUN_EXAMPLE,
    AgentIdPath,
    AuditPage,
    DefinitionIdPath,
    DefinitionList,
    RunPage,
    RunStarted,
    RunView,
    SessionIdPath,
    Wire,
    WorkflowDefinition,
)
from opscore.api.views import run_summary, run_view
from opscore.engine import Context
from opscore.errors import Invalid, UnacceptableInput, UnknownEntity
from opscore.inputs import check_id
from opscore.models import EntityQuery
from opscore.workflows.definitions import parse
from opscore.workflows.runs import Runs
from opscore.workflows.state import TASK, WORKFLOW, task_entity_id

router = APIRouter(prefix="/v1/opscore", tags=["workflows"])

SessionId = SessionIdPath


def get_runs(request: Request) -> Runs:
    runs: Runs = request.app.state.runs
    return runs


class StartRequest(Wire):
    """Start a run of a stored definition (by id, optionally version) or of an inline one."""

    workflowDefinitionId: str | None = Field(default=None, min_length=1, max_length=200)
    version: str | None = Field(default=None, description="a stored version; the latest when absent")
    workflowDefinition: dict[str, Any] | None = Field(default=None, description="validated and stored like a POST")
    initialPayload: dict[str, Any] = Field(default_factory=dict)


class RunTrigger(Wire):
    trigger: str = Field(min_length=1, max_length=64, description="pause, resume, cancel or retry")
    details: dict[str, Any] | None = None


# -- definitions -------------------------------------------------------------------------------


@router.post(
    "/workflow-definitions",
    summary="Publish a workflow definition (JSON or YAML)",
    status_code=201,
    response_model=WorkflowDefinition,
    responses={
        201: {"description": "stored"},
        200: {"model": WorkflowDefinition, "description": "the same body was already stored"},
        **errors(409, 503),
    },
    openapi_extra=raw_body(WorkflowDefinition, DEFINITION_EXAMPLE, "application/json", "application/yaml"),
)
async def publish_definition(request: Request, caller: Operates) -> JsonAnswer:
    """Validated on upload (422 lists every problem). id+version is immutable: the same body → 200, another → 409."""
    body = parse(await request.body(), request.headers.get("content-type"))
    definition, created = await get_runs(request).publish(body)
    return JsonAnswer(definition.body, status_code=201 if created else 200)


@router.get(
    "/workflow-definitions",
    summary="Stored workflow definitions, a page at a time",
    response_model=None,
    responses={200: {"model": DefinitionList, "description": "Successful Response"}, **errors(503)},
)
async def list_definitions(
    store: StoreDep,
    caller: Reads,
    limit: Annotated[int, Query(ge=1, le=1000, description="definitions per page (at most 1000)")] = 100,
    cursor: Annotated[str | None, Query(description="nextCursor of the previous page")] = None,
) -> JsonAnswer:
    """`{"items": [definition, ...], "nextCursor"}`, oldest first (the order they were published in,
    which is stable: a stored definition is never replaced or removed), one query per page."""
    after = int_position(cursor)
    page = await store.definitions_page(after, limit + 1)
    more = len(page) > limit
    page = page[:limit]
    return JsonAnswer({"items": [body for _, body in page], "nextCursor": encode_cursor(page[-1][0]) if more else None})


@router.get(
    "/workflow-definitions/{definition_id}",
    summary="One workflow definition",
    response_model=None,
    responses={200: {"model": WorkflowDefinition, "description": "Successful Response"}, **errors(404, 503)},
)
async def get_definition(
    definition_id: DefinitionIdPath,
    request: Request,
    caller: Reads,
    version: Annotated[str | None, Query(description="the latest stored version when absent")] = None,
) -> JsonAnswer:
    """The stored body of `definition_id` (a given `version`, or the one stored last)."""
    definition = await get_runs(request).definition(definition_id, version)
    return JsonAnswer(definition.body)


# -- runs --------------------------------------------------------------------------------------


@router.post(
    "/agent/{agent_id}/workflow",
    summary="Start a workflow run",
    status_code=202,
    response_model=RunStarted,
    responses=errors(404, 409, 503),
    openapi_extra=example(START_RUN_EXAMPLE),
)
async def start_workflow(
    agent_id: AgentIdPath,
    body: StartRequest,
    request: Request,
    caller: Operates,
) -> JsonAnswer:
    """202 `{"sessionId", "workflowId", "state"}`; the first task is dispatched (or waits for an agent).

    404 `unknown_agent` when the triggering agent is unknown (only a state report registers one).
    """
    runs = get_runs(request)
    if (body.workflowDefinitionId is None) == (body.workflowDefinition is None):
        raise Invalid("give exactly one of workflowDefinitionId and workflowDefinition")
    await runs.trigger_agent(agent_id)
    if body.workflowDefinition is not None:
        definition, _ = await runs.publish(body.workflowDefinition)
    else:
        assert body.workflowDefinitionId is not None
        definition = await runs.definition(body.workflowDefinitionId, body.version)
    run = await runs.start(
        definition,
        agent_id=agent_id,
        payload=body.initialPayload,
        ctx=Context(actor=caller.actor, request_id=request.scope.get("opscore.request_id")),
    )
    return JsonAnswer(
        {
            "sessionId": run.entity_id,
            "workflowId": definition.definition_id,
            "version": definition.version,
            "state": run.state,
        },
        status_code=202,
    )


def _filter_id(value: str | None) -> str | None:
    """A query filter naming an id: the rule of ids in paths and bodies (422 ``invalid_id``)."""
    if value is None:
        return None
    try:
        return check_id(value)
    except UnacceptableInput as exc:
        raise PydanticCustomError(exc.code, exc.detail) from exc


FilterId = AfterValidator(_filter_id)


@router.get(
    "/workflows",
    summary="List workflow runs, newest first",
    response_model=None,
    responses={200: {"model": RunPage, "description": "Successful Response"}, **errors(503)},
)
async def list_runs(
    store: StoreDep,
    caller: Reads,
    state: Annotated[str | None, Query(description="only runs in this state"), FilterId] = None,
    workflowId: Annotated[str | None, Query(description="only runs of this definition"), FilterId] = None,  # noqa: N803
    agentId: Annotated[str | None, Query(description="only runs started by this agent"), FilterId] = None,  # noqa: N803
    order: Annotated[
        Literal["asc", "desc"], Query(description="newest first (desc, the default) or oldest first (asc)")
    ] = "desc",
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: Annotated[str | None, Query(description="nextCursor of the previous page (of the same order)")] = None,
) -> JsonAnswer:
    """Runs ordered by creation (`createdAt`, then `sessionId`), one page at a time.

    Every filter is an index range, however many runs are stored: `workflowId`, `agentId`
    and `state` are labels the store keeps beside each run (opscore/storage/rows.py), and a
    page continues from the position in its cursor.
    """
    position = pair_position(cursor, order)
    labels = tuple((k, v) for k, v in (("workflowId", workflowId), ("agentId", agentId)) if v is not None)
    page = await store.list_entities(
        EntityQuery(
            WORKFLOW,
            state=state,
            labels=labels,
            by_created=True,
            descending=order == "desc",
            after_created=None if position is None else position[0],
            after_id=None if position is None else position[1],
            limit=limit + 1,
        )
    )
    more = len(page) > limit
    page = page[:limit]
    return JsonAnswer(
        {
            "items": [run_summary(r) for r in page],
            "nextCursor": encode_cursor([page[-1].created_at, page[-1].entity_id], order) if more else None,
        }
    )


@router.get(
    "/workflows/{session_id}",
    summary="One run, its tasks, attempts and results",
    response_model=RunView,
    responses=errors(404, 503),
)
async def get_run(session_id: SessionId, store: StoreDep, caller: Reads) -> JsonAnswer:
    """The run's state and, per task: state, agent, attempts (with errors), result."""
    run = await store.get(WORKFLOW, session_id)
    if run is None:
        raise UnknownEntity(WORKFLOW, session_id)
    return JsonAnswer(await run_view(store, run), headers={"ETag": f'"{run.revision}"'})


@router.post(
    "/workflows/{session_id}/transitions",
    summary="pause, resume, cancel or retry a run",
    response_model=RunView,
    responses=errors(404, 409, 503),
    openapi_extra=example(RUN_TRIGGER_EXAMPLE),
)
async def run_transition(
    session_id: SessionId, body: RunTrigger, request: Request, store: StoreDep, ctx: ContextDep, caller: Operates
) -> JsonAnswer:
    """409 `illegal_transition` (and a rejected audit record) when the trigger is illegal in the run's state."""
    run = await get_runs(request).operate(session_id, body.trigger, ctx, body.details)
    return JsonAnswer(await run_view(store, run), headers={"ETag": f'"{run.revision}"'})


@router.get(
    "/workflows/{session_id}/audit",
    summary="Audit records of a run and its tasks",
    response_model=AuditPage,
    responses=errors(404, 503),
)
async def run_audit(
    session_id: SessionId,
    store: StoreDep,
    caller: Reads,
    filters: AuditFiltersDep,
) -> Response:
    """The run's records and its tasks' records, interleaved in `id` order."""
    run = await store.get(WORKFLOW, session_id)
    if run is None:
        raise UnknownEntity(WORKFLOW, session_id)
    ids = (session_id, *(task_entity_id(session_id, t) for t in run.data.get("taskIds", [])))
    return await audit_page(store, filters, entity_ids=ids, entity_types=(WORKFLOW, TASK))
