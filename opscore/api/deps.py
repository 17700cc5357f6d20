"""Dependencies as ``Annotated`` aliases: the engine, the caller, the request's preconditions."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute

from opscore.api import sessions
from opscore.clock import normalise
from opscore.config import Settings
from opscore.engine import Context, Engine
from opscore.errors import (
    Forbidden,
    Invalid,
    InvalidIdempotencyKey,
    InvalidIfMatch,
    InvalidTime,
    Unauthorized,
)
from opscore.idempotency import Idempotency
from opscore.keys import ApiKey, Scope, match
from opscore.storage.base import Store

log = logging.getLogger("opscore.api")


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


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is calling: the key that authenticated the request (never its secret)."""

    key: ApiKey

    @property
    def actor(self) -> str:
        """The audit ``actor`` (DESIGN §9: ``key:<name>``)."""
        return f"key:{self.key.name}"

    def require_report_for(self, request: Request, agent_id: str) -> None:
        """403 unless this key may report for ``agent_id`` (an agent id named in a body)."""
        if not self.key.may_report_for(agent_id):
            raise denied(request, self, Scope.REPORT, agent_id)


async def caller(request: Request) -> Caller:
    """The key of a valid bearer token; 401 otherwise (authentication only: :class:`Permit` authorises).

    ``async`` although it never awaits: FastAPI runs a plain ``def`` dependency in its thread
    pool, a hop that costs a large share of a bare endpoint's throughput (docs/performance.md). The header is read
    from the request rather than declared as a ``Header`` parameter (it was hidden from the
    schema anyway): FastAPI re-inspects every declared parameter on every request.
    """
    authorization = request.headers.get("authorization")
    if not authorization:
        if sessions.COOKIE in request.cookies:  # the console: a signed session cookie instead of a bearer key
            signed_in = sessions.authenticate(request)
            request.scope["opscore.key"] = signed_in.name
            return Caller(signed_in)
        request.scope["opscore.denied"] = "missing_key"  # the reason opscore_auth_denied_total counts
        raise Unauthorized("missing Authorization: Bearer <OPSCORE_API_KEY>")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        request.scope["opscore.denied"] = "malformed_header"
        raise Unauthorized("the Authorization header must be 'Bearer <OPSCORE_API_KEY>'")
    key = match(request.app.state.api_keys, token.strip().encode())
    if key is None:
        request.scope["opscore.denied"] = "invalid_key"
        raise Unauthorized("invalid API key")
    request.scope["opscore.key"] = key.name  # the access line names the caller's key (Guard)
    return Caller(key)


def denied(request: Request, who: Caller, needs: Scope, agent_id: str | None = None) -> Forbidden:
    """The 403 for ``who``, logged as one ``forbidden`` line (DESIGN §9). Nothing has changed yet."""
    route = request.scope.get("route")
    if agent_id is not None and who.key.holds(needs):
        detail = f"{who.key.describe()}: it may not act for agent {agent_id!r}"
    else:
        detail = f"{who.key.describe()}: this needs {needs.value}"
    log.warning(
        "forbidden",
        extra={
            "keyName": who.key.name,
            "method": request.method,
            "route": getattr(route, "path", None),
            "needs": needs.value,
            "agentId": agent_id,
        },
    )
    return Forbidden(detail, needs=needs.value)


class Permit:
    """A route's permission, declared once in its signature: ``caller: Annotated[Caller, Depends(Permit(...))]``.

    ``agent`` names the path parameter holding the agent the request is about: ``report`` is
    then checked against the key's agent globs, and ``read`` of that agent is allowed to a
    ``report`` key for it too (an agent's key reads its own agent back).
    """

    def __init__(self, scope: Scope, *, agent: str | None = None) -> None:
        self.scope = scope
        self.agent = agent

    def __repr__(self) -> str:
        return f"Permit({self.scope.value}{'' if self.agent is None else f', agent={self.agent}'})"

    def allows(self, key: ApiKey, agent_id: str | None) -> bool:
        if agent_id is None:
            return key.holds(self.scope)
        if self.scope is Scope.REPORT:
            return key.may_report_for(agent_id)
        if self.scope is Scope.READ:
            return key.may_read_agent(agent_id)
        return key.holds(self.scope)

    async def __call__(self, request: Request, who: Annotated[Caller, Depends(caller)]) -> Caller:
        agent_id = None if self.agent is None else str(request.path_params.get(self.agent, ""))
        if not self.allows(who.key, agent_id):
            raise denied(request, who, self.scope, agent_id if self.scope is not Scope.OPERATE else None)
        return who


Reads = Annotated[Caller, Depends(Permit(Scope.READ))]
"""Every GET: ``read`` (``operate`` and ``admin`` imply it)."""
ReadsAgent = Annotated[Caller, Depends(Permit(Scope.READ, agent="agent_id"))]
"""A GET about one agent: ``read``, or ``report`` for that agent."""
REPORTS = Permit(Scope.REPORT)
REPORTS_AGENT = Permit(Scope.REPORT, agent="agent_id")
Reports = Annotated[Caller, Depends(REPORTS)]
"""Reports whose agents are in the body: the route checks each with :meth:`Caller.require_report_for`."""
ReportsAgent = Annotated[Caller, Depends(REPORTS_AGENT)]
"""A state report for the agent in the path."""
Operates = Annotated[Caller, Depends(Permit(Scope.OPERATE))]
"""Operator triggers, workflow definitions, starting and moving runs."""


EngineDep = Annotated[Engine, Depends(get_engine)]
StoreDep = Annotated[Store, Depends(get_store)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
CallerDep = Annotated[Caller, Depends(caller)]


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
        raise InvalidIfMatch(f'If-Match must be a revision such as "3", not {shown!r}')
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


async def context(request: Request, who: CallerDep) -> Context:
    """The transition context of a request: actor, If-Match, Idempotency-Key, request id.

    The two headers are read from the request, not declared as ``Header`` parameters: FastAPI
    re-inspects declared parameters on every request (docs/performance.md, "Micro-costs").
    :func:`document_transition_headers` puts them into the schema of every route using this.
    The request id is the one ``Guard`` settled on (the client's ``X-Request-Id`` or a new one).
    """
    headers = request.headers
    if_match = headers.get("if-match")
    idempotency_key = headers.get("idempotency-key")
    idem = None
    if idempotency_key is not None:
        if not 1 <= len(idempotency_key) <= 255:
            raise InvalidIdempotencyKey()
        body = await request.body()
        # If-Match is part of what was asked: the same body at another revision is another request
        precondition = (if_match or "").encode("latin-1", "replace")
        fingerprint = hashlib.sha256(
            request.method.encode() + b" " + request.url.path.encode() + b"\n" + precondition + b"\n" + body
        ).hexdigest()
        idem = Idempotency(who.actor, idempotency_key, fingerprint)
    request_id = request.scope.get("opscore.request_id")
    return Context(actor=who.actor, request_id=request_id, if_match=parse_if_match(if_match), idempotency=idem)


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
    raise InvalidTime(f"{name} must be an ISO-8601 time such as 2026-11-23T10:00:00Z, not {value!r}")
