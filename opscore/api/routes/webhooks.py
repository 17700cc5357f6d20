"""AgentKit's registration webhook: HMAC-signed, no bearer key."""

from __future__ import annotations

import json
import time
from typing import Annotated

from fastapi import APIRouter, Header, Request
from pydantic import ValidationError

from opscore.agentkit import check_signature
from opscore.api.deps import EngineDep, SettingsDep, StoreDep
from opscore.api.errors import validation_body
from opscore.api.openapi import errors, raw_body
from opscore.api.responses import JsonAnswer
from opscore.api.schemas import WEBHOOK_EXAMPLE, WebhookDeregistered, WebhookEvent, WebhookRegistered
from opscore.api.views import agent_metadata, agent_view
from opscore.engine import Context
from opscore.errors import Invalid, Replayed, by_code

router = APIRouter(prefix="/v1/opscore/internal", tags=["webhooks"])

ACTOR = "agentkit"


@router.post(
    "/agent/notify",
    summary="AgentKit registration webhook",
    response_model=None,
    responses={
        200: {"model": WebhookRegistered | WebhookDeregistered, "description": "applied"},
        **errors(401, 404, 409, 503),
    },
    openapi_extra=raw_body(WebhookEvent, WEBHOOK_EXAMPLE),
)
async def notify(
    request: Request,
    engine: EngineDep,
    store: StoreDep,
    settings: SettingsDep,
    x_agentkit_timestamp: Annotated[str | None, Header(description="Unix epoch seconds or ISO-8601")] = None,
    x_agentkit_signature: Annotated[
        str | None, Header(description="hex HMAC-SHA256 of timestamp + '.' + raw body")
    ] = None,
) -> JsonAnswer:
    """REGISTER creates the agent or updates its metadata (never its state); DEREGISTER fires `deregister`.

    401 for a missing, wrong, stale (±300 s) or replayed signature.
    """
    raw = await request.body()
    now = time.time()
    window = settings.webhook_window_seconds
    sent, signature = check_signature(
        settings.webhook_secrets, x_agentkit_timestamp, x_agentkit_signature, raw, now=now, window=window
    )
    if not await store.remember_signature(signature, sent, window):
        raise Replayed()
    try:
        # Python's parser first, as for every other body, so that opscore.inputs sees what it
        # accepts (NaN, lone surrogates) and names the problem, instead of a parser message.
        event = WebhookEvent.model_validate(json.loads(raw))
    except ValidationError as exc:
        refusal = validation_body(exc.errors())
        named = by_code().get(refusal["code"], Invalid)  # lone_surrogate, too_deep, ... or validation_error
        raise named(refusal["detail"].replace("invalid request", "invalid webhook body", 1)) from exc
    except (ValueError, RecursionError) as exc:  # after ValidationError, which is a ValueError too
        raise Invalid(f"invalid webhook body: not JSON: {exc}") from exc
    ctx = Context(actor=ACTOR, request_id=request.scope.get("opscore.request_id"))
    agent_id = event.agent_details.agentId
    if event.event_type == "REGISTER":
        entity, created = await engine.upsert("agent", agent_id, agent_metadata(event.agent_details), ctx=ctx)
        return JsonAnswer({"status": "success", "event": "REGISTER", "created": created, "agent": agent_view(entity)})
    await engine.get("agent", agent_id)
    await engine.report("agent", agent_id, "deregistered", ctx=ctx)
    return JsonAnswer({"status": "success", "event": "DEREGISTER", "agentId": agent_id, "state": "deregistered"})
