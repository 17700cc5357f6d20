"""Dependencies as ``Annotated`` aliases: the engine, the caller, the request's preconditions."""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute

from opscore.api import sessions
from opscore.clock import normalise
from opscore.config import Settings, match_key
from opscore.engine import Context, Engine
from opscore.errors import Invalid, Unauthorized
from opscore.idempotency import Idempotency
from opscore.storage.base import Store


async def get_engine(request: Request) -> Engine:
    """``async`` like every dependency here: FastAPI runs a plain ``def`` one in its thread pool."""
    engine: Engine = request.app.state.engine
    return engine


async def get_store(request: Request) -> Store:
    store: Store = request.app.state.engine.store
    return store


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def caller(request: Request) -> str:
    """The actor name of a valid bearer key (``key:<name>``); 401 otherwise.

    ``async`` although it never awaits: FastAPI runs a plain ``def`` dependency in its thread
    pool, a hop that cost 40% of the requests/s of a bare endpoint here. The header is read
    from the request rather than declared as a ``Header`` parameter (it was hidden from the
    schema anyway): FastAPI re-inspects every declared parameter on every request, ~10 µs each.
    """
    authorization = request.headers.get("authorization")
    if not authorization:
        if sessions.COOKIE in request.cookies:  # the console: a signed session cookie instead of a bearer key
            signed_in = sessions.authenticate(request)
            request.scope["opscore.key"] = signed_in.name
            return f"key:{signed_in.name}"
        request.scope["opscore.denied"] = "missing_key"  # the reason opscore_auth_denied_total counts
        raise Unauthorized("missing Authorization: Bearer <OPSCORE_API_KEY>")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        request.scope["opscore.denied"] = "malformed_header"
        raise Unauthorized("the Authorization header must be 'Bearer <OPSCORE_API_KEY>'")
    key = match_key(request.app.state.api_keys, token.strip().encode())
    if key is None:
        request.scope["opscore.denied"] = "invalid_key"
        raise Unauthorized("invalid API key")
    request.scope["opscore.key"] = key.name  # the access line names the caller's key (Guard)
    return f"key:{key.name}"


EngineDep = Annotated[Engine, Depends(get_engine)]
StoreDep = Annotated[Store, Depends(get_store)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
CallerDep = Annotated[str, Depends(caller)]


MAX_REVISION_DIGITS = 18
"""A revision fits a signed 64-bit integer; longer digit strings are refused before ``int()``
(which raises past 4,300 digits, and would otherwise have answered 500)."""


def parse_if_match(value: str | None) -> int | None:
    """``"3"``, ``W/"3"`` or ``3`` → 3; ``*`` or absent → no precondition; anything else → 422."""
    if value is None or value.strip() == "*":
        return None
    text = value.strip()
    if text.startswith("W/"):
        text = text[2:]
    text = text.strip('"')
    if not (text.isascii() and text.isdigit() and len(text) <= MAX_REVISION_DIGITS):
        shown = value if len(value) <= 40 else value[:40] + "…"
        raise Invalid(f'If-Match must be a revision such as "3", not {shown!r}', code="invalid_if_match")
    return int(text)


TRANSITION_HEADERS: list[dict[str, Any]] = [
    {
        "name": "if-match",
        "in": "header",
        "required": False,
        "schema": {"type": "string", "title": "If-Match"},
        "description": 'Apply only at this revision (the entity\'s ETag, e.g. "3"); else 412',
    },
    {
        "name": "idempotency-key",
        "in": "header",
        "required": False,
        "schema": {"type": "string", "title": "Idempotency-Key", "minLength": 1, "maxLength": 255},
        "description": "A retried request with the same key returns the first answer; kept 48 h",
    },
]


async def context(request: Request, actor: CallerDep) -> Context:
    """The transition context of a request: actor, If-Match, Idempotency-Key, request id.

    The two headers are read from the request, not declared as ``Header`` parameters: FastAPI
    re-inspects declared parameters on every request (~8 µs each on the hottest route).
    :func:`document_transition_headers` puts them into the schema of every route using this.
    The request id is the one ``Guard`` settled on (the client's ``X-Request-Id`` or a new one).
    """
    headers = request.headers
    if_match = headers.get("if-match")
    idempotency_key = headers.get("idempotency-key")
    idem = None
    if idempotency_key is not None:
        if not 1 <= len(idempotency_key) <= 255:
            raise Invalid("Idempotency-Key must be 1 to 255 characters", code="invalid_idempotency_key")
        body = await request.body()
        # If-Match is part of what was asked: the same body at another revision is another request
        precondition = (if_match or "").encode("latin-1", "replace")
        fingerprint = hashlib.sha256(
            request.method.encode() + b" " + request.url.path.encode() + b"\n" + precondition + b"\n" + body
        ).hexdigest()
        idem = Idempotency(actor, idempotency_key, fingerprint)
    request_id = request.scope.get("opscore.request_id")
    return Context(actor=actor, request_id=request_id, if_match=parse_if_match(if_match), idempotency=idem)


def _depends_on(dependant: Dependant, call: Any) -> bool:
    return any(d.call is call or _depends_on(d, call) for d in dependant.dependencies)


def document_transition_headers(router: APIRouter) -> None:
    """Add ``If-Match`` and ``Idempotency-Key`` to the schema of each route using :func:`context`."""
    names = {h["name"] for h in TRANSITION_HEADERS}
    for route in router.routes:
        if isinstance(route, APIRoute) and _depends_on(route.dependant, context):
            extra = dict(route.openapi_extra or {})
            kept = [p for p in extra.get("parameters", []) if p.get("name") not in names]
            extra["parameters"] = kept + TRANSITION_HEADERS
            route.openapi_extra = extra


ContextDep = Annotated[Context, Depends(context)]


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
        raise Invalid("cursor is not a cursor this server handed out", code="invalid_cursor") from exc
    if cursor_order != order:
        raise Invalid(f"this cursor pages in {cursor_order} order, not {order}", code="invalid_cursor")
    return position


def parse_moment(value: str | None, name: str = "at") -> str | None:
    """An ISO-8601 query time as fixed-width UTC text; 422 ``invalid_time`` when it is not one.

    Naive times are UTC. An unencoded ``+`` in a query string arrives as a space
    (``...T10:00:00 00:00``): that space is read back as the ``+`` it was.
    """
    if value is None:
        return None
    text = value.strip()
    candidates = [text]
    head, sep, tail = text.rpartition(" ")
    if sep and "T" in head and len(tail) == 5 and tail[2] == ":":
        candidates.append(f"{head}+{tail}")
    for candidate in candidates:
        try:
            return normalise(candidate)
        except Invalid:
            continue
    raise Invalid(f"{name} must be an ISO-8601 time such as 2026-11-23T10:00:00Z, not {value!r}", code="invalid_time")
