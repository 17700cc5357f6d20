"""Signed checkpoints (DESIGN §12): the lines of this server's ``OPSCORE_CHECKPOINT_FILE``, paged."""

from __future__ import annotations

import json
import logging
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from opscore.api.deps import Reads, StoreDep
from opscore.api.openapi import errors
from opscore.api.paging import decode_cursor, encode_cursor
from opscore.api.schemas import CheckpointPage, HeadPage
from opscore.checkpointer import Checkpointer
from opscore.checkpoints import CheckpointFile, InvalidCheckpointSettings, InvalidSigningKey, load_signer
from opscore.config import Settings
from opscore.errors import InvalidCursor
from opscore.machines import MACHINES
from opscore.models import EntityQuery
from opscore.storage.checkpoint_relay import open_relay

router = APIRouter(prefix="/v1/opscore", tags=["audit"])
log = logging.getLogger("opscore")


async def start(app: Any) -> None:
    """The lifespan's start hook: sign checkpoints when ``OPSCORE_SIGNING_KEY`` is set."""
    conf: Settings = app.state.settings
    app.state.checkpointer = None
    if not conf.signing_key.strip():
        return
    try:
        signer = load_signer(conf.signing_key.strip())
    except InvalidSigningKey as exc:
        log.critical("refusing to start", extra={"detail": str(exc), "code": "invalid_signing_key"})
        raise
    relay_url = conf.pg_session_url.strip() or conf.database_url
    if conf.pg_pooler == "transaction" and not conf.pg_session_url.strip() and open_relay(relay_url).shared:
        # the leader's advisory lock lives in a session: through a transaction pooler it would
        # stay on whichever server connection took it, held by no one and granted to anyone there
        detail = (
            "OPSCORE_PG_POOLER=transaction: the checkpoint leader needs a session of its own; set "
            "OPSCORE_PG_SESSION_URL to the database directly or to the pooler in session mode"
        )
        log.critical("refusing to start", extra={"detail": detail, "code": "invalid_checkpoint_settings"})
        raise InvalidCheckpointSettings(detail)
    runner = Checkpointer(
        app.state.engine.store,
        CheckpointFile(conf.checkpoint_file),
        signer,
        relay=open_relay(relay_url),
        records=conf.checkpoint_records,
        seconds=conf.checkpoint_seconds,
    )
    try:
        await runner.start()
    except OSError as exc:
        detail = f"OPSCORE_CHECKPOINT_FILE {conf.checkpoint_file!r} cannot be written: {exc.strerror or exc}"
        log.critical("refusing to start", extra={"detail": detail, "code": "invalid_checkpoint_file"})
        raise InvalidCheckpointSettings(detail) from exc
    app.state.checkpointer = runner
    log.info("checkpoints", extra={"keyId": signer.key_id, "file": conf.checkpoint_file})


async def stop(app: Any) -> None:
    runner: Checkpointer | None = getattr(app.state, "checkpointer", None)
    if runner is not None:
        await runner.stop()


CheckpointLimit = Annotated[int, Query(ge=1, le=100, description="lines per page (at most 100)")]


@router.get(
    "/audit/checkpoints",
    summary="Signed checkpoints of the audit chains",
    response_model=CheckpointPage,
    responses=errors(503),
)
async def checkpoints(
    request: Request,
    caller: Reads,
    limit: CheckpointLimit = 20,
    cursor: Annotated[str | None, Query(description="nextCursor of the previous page")] = None,
) -> Response:
    """The signed lines, oldest first, served as stored: verify them offline with the public key.

    Every replica keeps a full copy of the one stream of lines; `keyId` is null when this
    server signs none (no `OPSCORE_SIGNING_KEY`).
    """
    after = decode_cursor(cursor)
    if after is None:
        after = 0
    if not isinstance(after, int) or isinstance(after, bool) or not 0 <= after < 2**63:
        raise InvalidCursor("cursor is not a cursor this server handed out")
    runner: Checkpointer | None = getattr(request.app.state, "checkpointer", None)
    lines = runner.file.read(after, limit + 1) if runner is not None else []
    more = len(lines) > limit
    lines = lines[:limit]
    next_cursor = encode_cursor(after + len(lines)) if more else None
    tail = {
        "nextCursor": next_cursor,
        "keyId": runner.signer.key_id if runner is not None else None,
        "halted": runner.halted if runner is not None else None,
    }
    body = '{"items":[' + ",".join(lines) + "]," + json.dumps(tail, separators=(",", ":"))[1:]
    return Response(body.encode("utf-8"), media_type="application/json")


HeadLimit = Annotated[int, Query(ge=1, le=1000, description="heads per page (at most 1000)")]
TYPES = list(MACHINES)


@router.get("/audit/heads", summary="Every entity's chain head", response_model=HeadPage, responses=errors(503))
async def heads(
    store: StoreDep,
    caller: Reads,
    limit: HeadLimit = 500,
    cursor: Annotated[str | None, Query(description="nextCursor of the previous page")] = None,
) -> dict[str, Any]:
    """Where each entity's chain ends (`seq`, `hash`), with its `state` and `revision`: an export's trailer.

    Read them before the records: a record past its entity's head committed later, and is left
    out of that export (`opscore audit export --server` does so).
    """
    position = decode_cursor(cursor)
    if position is None:
        position = [0, None]
    if not (
        isinstance(position, list)
        and len(position) == 2
        and isinstance(position[0], int)
        and not isinstance(position[0], bool)
        and 0 <= position[0] < len(TYPES)
        and (position[1] is None or isinstance(position[1], str))
    ):
        raise InvalidCursor("cursor is not a cursor this server handed out")
    index, after = position
    items: list[dict[str, Any]] = []
    while index < len(TYPES) and len(items) <= limit:
        page = await store.list_entities(EntityQuery(TYPES[index], after_id=after, limit=limit + 1 - len(items)))
        items.extend(
            {
                "entityType": e.entity_type,
                "entityId": e.entity_id,
                "seq": e.seq,
                "hash": e.head_hash,
                "state": e.state,
                "revision": e.revision,
            }
            for e in page
        )
        if len(items) > limit:
            break
        index, after = index + 1, None
    more = len(items) > limit
    items = items[:limit]
    next_cursor = None
    if more:
        last = items[-1]
        next_cursor = encode_cursor([TYPES.index(last["entityType"]), last["entityId"]])
    return {"items": items, "nextCursor": next_cursor}
