"""Fast routes: a hot FastAPI route answered without FastAPI's per-request machinery.

A state report spent most of its server time in the framework, not in Ops-Core: routing
through the included routers and the middleware stack, FastAPI's dependency solver, and its
body handling (``docs/performance.md``, "Fast routes"). For the one or two routes where that
matters, the route keeps being declared as usual and gets a **twin**: a small coroutine that
does what FastAPI would do for that route, in the same order, by calling the same functions.

The pattern, and nothing more (``routes/agents.py`` ``report_state_fast`` is the example)::

    @router.post("/agent/{agent_id}/state", ...)      # the route, as before: its OpenAPI,
    async def report_state(agent_id: AgentId, ...):   # its handler, its dependencies
        ...

    @twin(report_state)
    async def report_state_fast(call: Call) -> Response:
        who = await caller(call.request)               # the route's dependencies, called by hand
        ctx = await context(call.request, who)         # in its signature's order (FastAPI's order)
        who = await REPORTS_AGENT(call.request, who)
        args = call.arguments()                        # path parameters and body, validated
        return await report_state(args["agent_id"], args["body"], ctx, call.request, who)

What stays FastAPI's, so that nothing can drift:

- the **declaration** (path, models, responses): ``/openapi.json`` is written from the route,
  which stays registered; the twin only answers its requests;
- the **validation**: :meth:`Call.arguments` runs FastAPI's own ``request_params_to_args`` and
  ``request_body_to_args`` over the route's own fields (pydantic ``TypeAdapter`` objects of the same
  models), so the 422 lists are FastAPI's;
- the **errors**: anything the twin raises goes to the app's own exception handlers
  (``api/errors.py``), looked up as Starlette's ``ExceptionMiddleware`` looks them up; an
  unexpected exception gets the app's 500 answer as from ``ServerErrorMiddleware`` and is
  re-raised for the server to log;
- the **body rules**: :class:`Call` reads the body as FastAPI's request handler does (JSON only
  for a JSON content type, invalid JSON a ``json_invalid`` 422, an unreadable body FastAPI's 400
  that ``api/errors.py`` turns into 422) before the twin runs, as FastAPI reads it before
  solving dependencies.

What the twin skips: FastAPI's per-request telemetry check, Starlette's error and exception
middlewares, the routing walk through the included routers, the solver and its dependency
cache, and ``Response.__call__``. ``app.OpsCoreApp`` asks :meth:`FastRoutes.match` before
handing a request to FastAPI, and sends a matched one through a ``Guard`` of its own (request
id, body limit, access line, metrics: the same settings, the same code).

``create_app(fast_routes=False)`` serves every request through FastAPI;
``tests/api/test_fastroute.py`` sends the same valid and hostile requests to both apps and
requires the same status, headers and body, the same access lines, metrics and audit chains,
and the same ``/openapi.json``. What it measured: ``docs/performance.md``, "Fast routes".
"""

from __future__ import annotations

import email.message
import json
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, params
from fastapi.datastructures import DefaultPlaceholder
from fastapi.dependencies.utils import request_body_to_args, request_params_to_args
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel
from pydantic_core import PydanticUndefined
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Match
from starlette.types import ASGIApp, Receive, Scope, Send

Twin = Callable[["Call"], Awaitable[Response]]

_TWINS: dict[Callable[..., Any], Twin] = {}
"""Endpoint function → its twin, filled by :func:`twin` at import."""

ANSWERED = "opscore.answered"
"""Scope key set when a twin's answer starts going out (an exception after it must not answer again)."""

_UNDEFINED: Any = PydanticUndefined
"""No body (FastAPI's ``Undefined``: an absent body validates as a missing field)."""


def twin(endpoint: Callable[..., Any]) -> Callable[[Twin], Twin]:
    """Register the decorated coroutine as the fast twin of the FastAPI route whose handler is ``endpoint``."""

    def register(fast: Twin) -> Twin:
        _TWINS[endpoint] = fast
        return fast

    return register


class Call:
    """One request to a twinned route: its Starlette ``Request`` and its body, read as FastAPI reads it."""

    __slots__ = ("body", "plain", "request", "route")

    def __init__(self, request: Request, route: APIRoute, plain: bool = False) -> None:
        self.request = request
        self.route = route
        self.plain = plain
        """:func:`plain` of the route, worked out once per app."""
        self.body: Any = _UNDEFINED

    async def read_body(self) -> None:
        """FastAPI's request handler, body part: JSON for a JSON content type, else the raw bytes.

        Raises what FastAPI raises there: ``RequestValidationError`` for invalid JSON,
        ``HTTPException`` (the body limit's 413, or 400 for a body that is not even text).
        """
        request = self.request
        try:
            raw = await _read(request)
            if not raw:
                return
            content_type = request.headers.get("content-type")
            if content_type == "application/json" or (
                _is_json(content_type) if content_type else not _strict(self.route)
            ):
                self.body = json.loads(raw)
            else:  # no content type (FastAPI's strict default) or another one: the bytes, refused by validation
                self.body = raw
        except json.JSONDecodeError as exc:
            raise RequestValidationError(
                [
                    {
                        "type": "json_invalid",
                        "loc": ("body", exc.pos),
                        "msg": "JSON decode error",
                        "input": {},
                        "ctx": {"error": exc.msg},
                    }
                ],
                body=exc.doc,
            ) from exc
        except HTTPException:
            raise
        except Exception as exc:
            raise HTTPException(status_code=400, detail="There was an error parsing the body") from exc

    def arguments(self) -> dict[str, Any]:
        """The route's path parameters and body, validated by FastAPI over the route's own fields.

        ``RequestValidationError`` with FastAPI's list of problems (path first, then body) otherwise.
        """
        dependant = self.route.dependant
        if self.plain and self.body is not _UNDEFINED:
            # What those two functions come down to for plain str path parameters and one
            # non-embedded body model (see plain()): each field's own validate().
            values: dict[str, Any] = {}
            errors: list[Any] = []
            path_params = self.request.scope["path_params"]
            for field in dependant.path_params:
                value, problems = field.validate(path_params[field.alias], values, loc=("path", field.alias))
                if problems:
                    errors.extend(problems)
                else:
                    values[field.name] = value
            body_field = dependant.body_params[0]  # the one body model (plain())
            value, problems = body_field.validate(self.body, values, loc=("body",))
            if problems:
                errors.extend(problems)
            else:
                values[body_field.name] = value
        else:
            values, errors = request_params_to_args(dependant.path_params, self.request.path_params)
            if dependant.body_params:
                body_values, body_errors = _body_to_args(
                    dependant.body_params, self.body, self.route._embed_body_fields
                )
                values.update(body_values)
                errors.extend(body_errors)
        if errors:
            raise RequestValidationError(errors, body=None if self.body is _UNDEFINED else self.body)
        return values


async def _read(request: Request) -> bytes:
    """``await request.body()`` without Starlette's async-generator stream: the same bytes, cached alike.

    A disconnect while reading raises ``ClientDisconnect`` as Starlette's does (FastAPI's 400).
    """
    receive = request.receive
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.request":
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        elif message["type"] == "http.disconnect":
            raise ClientDisconnect()
    body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    request._body = body  # what Request.body() returns from now on (deps.context reads it again)
    return body


def plain(route: APIRoute) -> bool:
    """Whether FastAPI's argument functions come down to ``field.validate`` for this route.

    True when every path parameter is a required ``str`` ``Path`` field read under its own
    name and the body is one non-embedded pydantic model (no form): then
    ``request_params_to_args`` reads ``path_params[alias]`` and validates it at
    ``("path", alias)``, and ``request_body_to_args`` validates the parsed body at ``("body",)``.
    """
    dependant = route.dependant
    body = dependant.body_params
    return (
        all(
            isinstance(f.field_info, params.Path)
            and f.field_info.annotation is str
            and f.field_info.validation_alias is None
            and f.field_info.is_required()
            for f in dependant.path_params
        )
        and len(body) == 1
        and not route._embed_body_fields
        and not isinstance(body[0].field_info, params.Form)
        and isinstance(body[0].field_info.annotation, type)
        and issubclass(body[0].field_info.annotation, BaseModel)
    )


def _is_json(content_type: str) -> bool:
    """FastAPI's test of a JSON content type (``application/json``, ``application/*+json``)."""
    message = email.message.Message()
    message["content-type"] = content_type
    if message.get_content_maintype() != "application":
        return False
    subtype = message.get_content_subtype()
    return subtype == "json" or subtype.endswith("+json")


def _strict(route: APIRoute) -> bool:
    """Whether a body without a content type stays bytes (FastAPI's default) rather than JSON."""
    strict = route.strict_content_type
    return bool(strict.value if isinstance(strict, DefaultPlaceholder) else strict)


def _body_to_args(fields: Any, body: Any, embed: bool) -> tuple[dict[str, Any], list[Any]]:
    """``request_body_to_args`` is a coroutine only for form bodies: run it to its end without a loop."""
    coro = request_body_to_args(body_fields=fields, received_body=body, embed_body_fields=embed)
    try:
        coro.send(None)
    except StopIteration as done:
        result: tuple[dict[str, Any], list[Any]] = done.value
        return result
    coro.close()
    raise RuntimeError("request_body_to_args awaited: a form body has no fast twin")


class FastRoutes:
    """The twinned routes of one app, and the ASGI answer for a request to one of them."""

    def __init__(self, app: FastAPI, routes: list[tuple[APIRoute, Twin]]) -> None:
        self.app = app
        self.routes = routes
        self._methods = frozenset(m for route, _ in routes for m in route.methods or ())
        self.plain = {id(route): plain(route) for route, _ in routes}
        """:func:`plain` of each route (by id: routes compare by value, not hashable; they live as long as this)."""
        self._handlers: tuple[dict[Any, Any], dict[Any, Any], Any] | None = None

    def _load_handlers(self) -> tuple[dict[Any, Any], dict[Any, Any], Any]:
        """The app's exception handlers, split as Starlette splits them when it builds its stack.

        Read at the first error, like Starlette's stack, which is built at the first request.
        ``ExceptionMiddleware`` gets the class and status handlers; the ``500``/``Exception``
        one is ``ServerErrorMiddleware``'s.
        """
        if self._handlers is None:
            handlers = self.app.exception_handlers
            by_class = {k: v for k, v in handlers.items() if isinstance(k, type) and k is not Exception}
            by_status = {k: v for k, v in handlers.items() if isinstance(k, int) and k != 500}
            self._handlers = (by_class, by_status, handlers.get(500) or handlers.get(Exception))
        return self._handlers

    @classmethod
    def of(cls, app: FastAPI, routers: list[Any]) -> FastRoutes:
        """Every route of ``routers`` whose endpoint has a :func:`twin`, in the routers' order."""
        found = [
            (route, _TWINS[route.endpoint])
            for router in routers
            for route in router.routes
            if isinstance(route, APIRoute) and route.endpoint in _TWINS
        ]
        return cls(app, found)

    def match(self, scope: Scope) -> ASGIApp | None:
        """The ASGI app answering this request when a twinned route matches it fully.

        The scope gets the route and its path parameters when that app runs (as the router
        sets them when it hands over): a request ``Guard`` refuses first is logged unrouted.
        """
        if scope["method"] not in self._methods:
            return None
        for route, fast in self.routes:
            found, child = route.matches(scope)
            if found is Match.FULL:
                return _Answer(self, route, fast, child)
        return None

    async def server_error(self, scope: Scope, exc: Exception) -> Response:
        """The answer to an unexpected exception, as Starlette's ``ServerErrorMiddleware`` makes it."""
        handler = self._load_handlers()[2]
        if handler is None:
            return Response("Internal Server Error", status_code=500, media_type="text/plain")
        response: Response = await handler(Request(scope), exc)
        return response

    def handler(self, exc: Exception) -> Callable[..., Any] | None:
        """The app's handler for ``exc``, looked up as Starlette's ``ExceptionMiddleware`` does."""
        by_class, by_status, _ = self._load_handlers()
        if isinstance(exc, HTTPException) and exc.status_code in by_status:
            handler: Callable[..., Any] = by_status[exc.status_code]
            return handler
        for cls in type(exc).__mro__:
            if cls in by_class:
                found: Callable[..., Any] = by_class[cls]
                return found
        return None


class _Answer:
    """The ASGI app of one matched request: read the body, run the twin, send what it answers."""

    __slots__ = ("child", "fast", "route", "routes")

    def __init__(self, routes: FastRoutes, route: APIRoute, fast: Twin, child: Scope) -> None:
        self.routes, self.route, self.fast, self.child = routes, route, fast, child

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope.update(self.child)
        request = Request(scope, receive)
        call = Call(request, self.route, self.routes.plain.get(id(self.route), False))
        try:
            await call.read_body()
            response = await self.fast(call)
        except Exception as exc:
            handler = self.routes.handler(exc)
            if handler is None:
                raise  # answered 500 as ServerErrorMiddleware answers it (``app.OpsCoreApp``), and logged
            response = await handler(request, exc)
        scope[ANSWERED] = True
        if response.background is None:
            await send({"type": "http.response.start", "status": response.status_code, "headers": response.raw_headers})
            await send({"type": "http.response.body", "body": response.body})
        else:
            await response(scope, receive, send)
