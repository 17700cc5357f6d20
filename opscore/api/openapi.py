"""The OpenAPI document and the two pages that show it, ``/docs`` (Swagger UI) and ``/redoc``.

DESIGN §5: both pages work offline (their scripts and styles are served from
``opscore/static/docs``, see its README for versions and licenses), every ``$ref`` in
``/openapi.json`` resolves, and the document declares the bearer scheme.

FastAPI writes most of the document from the routes; :func:`finish` adds what the routes
cannot say by themselves, from the same facts the server acts on:

- ``security`` (HTTP bearer) and a 401 on every operation that depends on ``deps.caller``,
  which reads the header by hand (a declared parameter costs every request: docs/performance.md);
- 412 and 422 on every operation that depends on ``deps.context`` (``If-Match``,
  ``Idempotency-Key``), 413 and 422 on every operation with a body, 422 on every operation
  with a parameter: the machinery that answers them is shared, so the rule is too;
- bodies that a route reads raw (the HMAC webhook must see the bytes that were signed; a
  definition may be YAML) are declared with :func:`raw_body` and their models put into
  ``components``; a ``$defs`` left anywhere by a model schema is moved there too;
- ``minLength: 1`` on ``at``, ``cursor`` and ``If-Match``: the server refuses an empty value
  of each (422), and the schema says so rather than promising that ``""`` is a value
  (``at`` is a ``date-time`` too, like ``since`` and ``until``);
- examples for path parameters, so "Try it out" starts from requests that work.

Routes declare the rest themselves: their success model, their request example
(:func:`example`) and the errors only they answer (:func:`errors`: 404, 409, 501, 503).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.dependencies.models import Dependant
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.routing import APIRoute, iter_route_contexts
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel

from opscore.api.deps import Permit, caller, context
from opscore.api.schemas import ErrorBody, WorkflowDefinition

SWAGGER_UI_VERSION = "5.35.0"
REDOC_VERSION = "2.5.4"
ASSETS_URL = "/static/docs"
ASSETS_DIR = Path(__file__).resolve().parent.parent / "static" / "docs"
REF = "#/components/schemas/{model}"
BEARER = "bearer"

ERROR_DESCRIPTIONS: dict[int, str] = {
    401: "No valid bearer key (the answer carries `WWW-Authenticate: Bearer`)",
    403: "The key lacks the scope this needs, or the agent is outside its globs (`forbidden`): nothing changed",
    404: "Unknown id",
    409: "Refused: an illegal transition, a stale report, or a body that conflicts with what is stored",
    412: 'If-Match named another revision than the current one (see the `ETag`, e.g. "3")',
    413: "Body over the limit (OPSCORE_MAX_BODY_BYTES)",
    429: "Too many open streams for this key (OPSCORE_MAX_STREAMS_PER_KEY): close one, or retry later",
    422: "Invalid request: the body, a parameter or a header (`code` says which rule)",
    501: "SVG asked for, but Graphviz's `dot` is not installed on the server",
    503: "Storage unreachable: nothing was changed, retry later",
}

PATH_EXAMPLES: dict[str, str] = {
    "agent_id": "agent-7",
    "name": "agent",
    "definition_id": "summarise-and-review",
    "task_id": "summarise",
}
"""Path parameters "Try it out" fills in: the ids the request examples (``schemas.py``) create."""

NON_EMPTY: frozenset[tuple[str, str]] = frozenset(
    {("query", "at"), ("query", "since"), ("query", "until"), ("query", "cursor"), ("header", "if-match")}
)
"""Parameters whose empty value the server refuses (``deps.parse_moment``, ``decode_cursor``, ``parse_if_match``)."""

MOMENTS = frozenset({"at", "since", "until"})
"""Query times, ISO-8601 only (``deps.parse_moment``)."""

_RAW_BODIES: dict[str, type[BaseModel]] = {}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for the error statuses a route answers, each with the one error shape."""
    return {s: {"model": ErrorBody, "description": ERROR_DESCRIPTIONS[s]} for s in statuses}


def example(value: dict[str, Any], media_type: str = "application/json") -> dict[str, Any]:
    """``openapi_extra=`` giving a parsed body its example: a request that succeeds as it is."""
    return {"requestBody": {"content": {media_type: {"example": value}}}}


def raw_body(model: type[BaseModel], value: dict[str, Any], *media_types: str) -> dict[str, Any]:
    """``openapi_extra=`` declaring a body the route reads itself, typed by ``model``.

    The model documents the body and is never run on it: the route keeps its own reading
    (an HMAC over the raw bytes, a YAML parser with its own list of problems).
    """
    _RAW_BODIES[model.__name__] = model
    ref = {"$ref": REF.format(model=model.__name__)}
    types = media_types or ("application/json",)
    return {"requestBody": {"required": True, "content": {t: {"schema": ref, "example": value} for t in types}}}


# -- the document ------------------------------------------------------------------------------


def install(app: FastAPI) -> None:
    """Serve ``/openapi.json`` as :func:`finish` completes it, ``/docs``, ``/redoc`` and their assets.

    The app must be built with ``docs_url=None, redoc_url=None``: FastAPI's own pages load
    their scripts from a CDN.
    """

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = finish(FastAPI.openapi(app), app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to extend it
    app.mount(ASSETS_URL, StaticFiles(directory=ASSETS_DIR), name="docs-assets")
    docs_routes(app)


def finish(doc: dict[str, Any], app: FastAPI) -> dict[str, Any]:
    """Complete FastAPI's document (see the module docstring); ``doc`` is changed in place."""
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for name, model in _RAW_BODIES.items():
        _add_schema(schemas, name, model.model_json_schema(ref_template=REF))
    _add_schema(schemas, "ErrorBody", ErrorBody.model_json_schema(ref_template=REF))
    _hoist_defs(doc, schemas)
    doc["components"]["securitySchemes"] = {
        BEARER: {
            "type": "http",
            "scheme": "bearer",
            "description": "`Authorization: Bearer <key>`: OPSCORE_API_KEY (or a key of OPSCORE_KEYS_FILE)",
        }
    }
    for route, op in _operations(doc, app):
        implied: set[int] = set()
        if _uses(route.dependant, caller):
            op["security"] = [{BEARER: []}]
            implied.add(401)
        permit = permission(route)
        if permit is not None:
            implied.add(403)
            op["x-opscore-scope"] = permit.scope.value
            op["description"] = (
                op.get("description", "")
                + f"\n\nNeeds scope `{permit.scope.value}`"
                + (" (or `report` for this agent)." if permit.agent and permit.scope.value == "read" else ".")
            ).strip()
        if _uses(route.dependant, context):
            implied |= {412, 422}
        if "requestBody" in op:
            implied |= {413, 422}
        if op.get("parameters"):
            implied.add(422)
        responses = op.setdefault("responses", {})
        for status in implied:
            responses.setdefault(str(status), _error_response(status))
        if _is_fastapi_422(responses.get("422")):
            responses["422"] = _error_response(422)
        op["responses"] = dict(sorted(responses.items()))
        for param in op.get("parameters", []):
            _complete_parameter(param)
    _type_inline_definitions(schemas)
    for unused in ("HTTPValidationError", "ValidationError"):
        if f'"{REF.format(model=unused)}"' not in json.dumps(doc):
            schemas.pop(unused, None)
    return doc


def permission(route: APIRoute) -> Permit | None:
    """The :class:`~opscore.api.deps.Permit` a route declares (each route under /v1/opscore has one)."""
    stack = [route.dependant]
    while stack:
        dependant = stack.pop()
        if isinstance(dependant.call, Permit):
            return dependant.call
        stack.extend(dependant.dependencies)
    return None


def _is_fastapi_422(response: dict[str, Any] | None) -> bool:
    """FastAPI's own 422 (``detail`` a list): ours is the one error shape (``detail`` a sentence)."""
    schema = (response or {}).get("content", {}).get("application/json", {}).get("schema", {})
    return bool(schema.get("$ref") == REF.format(model="HTTPValidationError"))


def _operations(doc: dict[str, Any], app: FastAPI) -> Iterator[tuple[APIRoute, dict[str, Any]]]:
    """Each route with its operation in ``doc``.

    FastAPI 0.165 keeps included routers as routers (``app.routes`` lists them, not their
    routes); ``iter_route_contexts`` is how its own OpenAPI code walks them. Dependencies are
    read from the route as declared: ``include_router`` adds none here.
    """
    for ctx in iter_route_contexts(app.routes):
        route = ctx.original_route
        if isinstance(route, APIRoute) and ctx.include_in_schema and ctx.path_format in doc["paths"]:
            for method in sorted(ctx.methods or ()):
                yield route, doc["paths"][ctx.path_format][method.lower()]


def _uses(dependant: Dependant, call: Callable[..., Any]) -> bool:
    return any(d.call is call or _uses(d, call) for d in dependant.dependencies)


def _error_response(status: int) -> dict[str, Any]:
    return {
        "description": ERROR_DESCRIPTIONS[status],
        "content": {"application/json": {"schema": {"$ref": REF.format(model="ErrorBody")}}},
    }


def _complete_parameter(param: dict[str, Any]) -> None:
    where, name = param.get("in", ""), param.get("name", "")
    if (where, name.lower()) in NON_EMPTY:
        schema = param.setdefault("schema", {})
        for branch in schema.get("anyOf", [schema]):
            if branch.get("type") == "string":
                branch["minLength"] = 1
                if name in MOMENTS:  # read by deps.parse_moment, which also takes a naive time as UTC
                    branch["format"] = "date-time"
    if where == "path" and name in PATH_EXAMPLES:
        param.setdefault("example", PATH_EXAMPLES[name])


def _add_schema(schemas: dict[str, Any], name: str, schema: dict[str, Any]) -> None:
    """Put one model's schema (and its ``$defs``) into ``components``; a name means one schema.

    FastAPI's copy of a model it already put there wins (it drops ``"default": null`` and
    the like); two models that only share a name are refused.
    """
    defs = schema.pop("$defs", {})
    for def_name, definition in {**defs, name: schema}.items():
        known = schemas.setdefault(def_name, definition)
        if _shape(known) != _shape(definition):
            raise ValueError(f"two different schemas are both called {def_name!r} in the OpenAPI document")


def _shape(schema: dict[str, Any]) -> tuple[Any, ...]:
    return (schema.get("type"), sorted(schema.get("properties", {})), sorted(schema.get("required", [])))


def _hoist_defs(node: Any, schemas: dict[str, Any]) -> None:
    """Move every nested ``$defs`` into ``components`` and point its ``#/$defs/X`` references there.

    ReDoc stops with "Invalid reference token: $defs" on such a reference: inside an
    operation, ``#/$defs/X`` names the root of the whole document, where nothing is.
    """
    if isinstance(node, dict):
        for name, definition in node.pop("$defs", {}).items():
            _add_schema(schemas, name, definition)
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            node["$ref"] = REF.format(model=ref.removeprefix("#/$defs/"))
        for value in node.values():
            _hoist_defs(value, schemas)
    elif isinstance(node, list):
        for item in node:
            _hoist_defs(item, schemas)


def _type_inline_definitions(schemas: dict[str, Any]) -> None:
    """``StartRequest.workflowDefinition`` is a definition like a published one, read by the same code."""
    field = schemas.get("StartRequest", {}).get("properties", {}).get("workflowDefinition")
    if field is not None:
        _add_schema(schemas, "WorkflowDefinition", WorkflowDefinition.model_json_schema(ref_template=REF))
        description = field.get("description")
        field.clear()
        field["anyOf"] = [{"$ref": REF.format(model="WorkflowDefinition")}, {"type": "null"}]
        if description:
            field["description"] = description


# -- the pages ---------------------------------------------------------------------------------

SWAGGER_UI_PARAMETERS: dict[str, Any] = {
    "validatorUrl": None,  # no badge fetched from validator.swagger.io
    "displayRequestDuration": True,
    "persistAuthorization": False,  # the key is never written to the browser's storage
}


def docs_routes(app: FastAPI) -> None:
    """``/docs`` and ``/redoc``, loading nothing from any other host (their CSP says so too)."""
    spec_url = app.openapi_url or "/openapi.json"
    swagger = f"{ASSETS_URL}/swagger-ui"
    redoc = f"{ASSETS_URL}/redoc"

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        page = get_swagger_ui_html(
            openapi_url=spec_url,
            title=f"{app.title} API",
            swagger_js_url=f"{swagger}/swagger-ui-bundle.js?v={SWAGGER_UI_VERSION}",
            swagger_css_url=f"{swagger}/swagger-ui.css?v={SWAGGER_UI_VERSION}",
            swagger_favicon_url=f"{swagger}/favicon-32x32.png",
            swagger_ui_parameters=SWAGGER_UI_PARAMETERS,
        )
        return _same_origin_only(page)

    @app.get("/redoc", include_in_schema=False)
    async def redoc_ui() -> HTMLResponse:
        page = get_redoc_html(
            openapi_url=spec_url,
            title=f"{app.title} API",
            redoc_js_url=f"{redoc}/redoc.standalone.js?v={REDOC_VERSION}",
            redoc_favicon_url=f"{swagger}/favicon-32x32.png",
            with_google_fonts=False,  # its default loads fonts from Google
        )
        return _same_origin_only(page)


_INLINE_SCRIPT = re.compile(rb"<script>(.*?)</script>", re.DOTALL)


def _same_origin_only(page: HTMLResponse) -> HTMLResponse:
    """A Content-Security-Policy that lets the page reach this server only.

    The page's own inline script is allowed by its hash, not by ``'unsafe-inline'``. Both
    bundles inject styles and draw images from ``data:`` URIs; ReDoc runs its search index
    in a ``blob:`` worker.
    """
    scripts = " ".join(
        ["'self'"]
        + [
            f"'sha256-{base64.b64encode(hashlib.sha256(s).digest()).decode()}'"
            for s in _INLINE_SCRIPT.findall(page.body)
        ]
    )
    page.headers["Content-Security-Policy"] = (
        "default-src 'self'; "
        f"script-src {scripts}; "
        "style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data:; "
        "font-src 'self' data:; "
        "worker-src 'self' blob:; "
        "connect-src 'self'; "
        "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
    )
    return page
