"""``POST /v1/opscore/state-reports``: many state reports in one request, one answer each."""

from __future__ import annotations

import json
from typing import Any

import orjson
from fastapi import APIRouter, Request, Response
from pydantic import ValidationError

from opscore.api.deps import REPORTS, EngineDep, Reports, caller, denied
from opscore.api.errors import render_error, validation_body
from opscore.api.fastroute import Call, twin
from opscore.api.openapi import errors, example
from opscore.api.schemas import (
    STATE_REPORT_BATCH_EXAMPLE,
    EntityId,
    StateReport,
    StateReportBatch,
    StateReportBatchAnswer,
)
from opscore.engine import Context, Report
from opscore.errors import OpsCoreError, UnsupportedHeader
from opscore.idempotency import Replay
from opscore.keys import Scope
from opscore.models import Entity, TransitionResult

router = APIRouter(prefix="/v1/opscore", tags=["agents"])


class BatchedReport(StateReport):
    """A state report of a batch: the agent id is in the body, since there is no path."""

    agentId: EntityId


def _check_headers(request: Request) -> None:
    for name in ("if-match", "idempotency-key"):
        if name in request.headers:
            raise UnsupportedHeader(f"{name} is not supported on a batch: send that report alone")


@router.post(
    "/state-reports",
    summary="Report many agents' states at once",
    response_model=StateReportBatchAnswer,
    responses=errors(503),
    openapi_extra=example(STATE_REPORT_BATCH_EXAMPLE),
)
async def report_states(body: StateReportBatch, request: Request, engine: EngineDep, caller: Reports) -> Response:
    """Up to 1000 reports, answered in order: `{"results": [{"status", "body"}, ...]}`.

    Each result has the status and body the report would get alone (200, 409
    `illegal_transition`/`stale_report`, 422 ...). Reports of different agents are applied
    concurrently and committed together; one agent's reports are applied in their order.
    More than 1000 reports: 422 for the whole request. `If-Match` and `Idempotency-Key` are
    refused (422): they name one transition. A report for an agent outside the key's globs
    answers its own 403 `forbidden` and changes nothing; the others go on.
    """
    _check_headers(request)
    ctx = Context(actor=caller.actor, request_id=request.scope.get("opscore.request_id"))
    initial = engine.fsm("agent").initial
    results: list[dict[str, Any] | None] = [None] * len(body.reports)
    reports: list[Report] = []
    positions: list[int] = []
    for i, raw in enumerate(body.reports):
        try:
            report = BatchedReport.model_validate(raw)
        except ValidationError as exc:
            errors = [{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]
            results[i] = {"status": 422, "body": validation_body(errors)}
            continue
        if not caller.key.may_report_for(report.agentId):
            results[i] = _result(denied(request, caller, Scope.REPORT, report.agentId), ctx.request_id)
            continue
        seed = Entity("agent", report.agentId, initial)
        reports.append(Report(report.agentId, report.state, report.timestamp, report.details, seed))
        positions.append(i)
    answers = await engine.report_many("agent", reports, ctx=ctx)
    for i, answer in zip(positions, answers, strict=True):
        results[i] = _result(answer, ctx.request_id)
    # orjson straight to bytes: validating 100 results against the response model and
    # encoding them with the stdlib cost more than applying the transitions did
    payload = {"results": results}
    try:
        content = orjson.dumps(payload)
    except orjson.JSONEncodeError:  # an integer beyond 64 bits somewhere: the stdlib writes it
        content = json.dumps(payload, ensure_ascii=False).encode("utf-8")
    return Response(content, media_type="application/json")


@twin(report_states)
async def report_states_fast(call: Call) -> Response:
    """``report_states`` without FastAPI's solver (``api/fastroute.py``)."""
    request = call.request
    who = await REPORTS(request, await caller(request))
    args = call.arguments()
    return await report_states(args["body"], request, request.app.state.engine, who)


def _result(answer: TransitionResult | Replay | OpsCoreError, request_id: str | None) -> dict[str, Any]:
    if isinstance(answer, OpsCoreError):
        status, body = render_error(answer, request_id)
    elif isinstance(answer, Replay):
        status, body = answer.status, answer.body
    else:
        status, body = 200, answer.answer()
    return {"status": status, "body": body}
