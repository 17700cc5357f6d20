"""Every route of the app has a client method, in ``Client`` and in ``AsyncClient``; none is invented.

Walks the app's own routes, so a route added tomorrow fails here until the client has a
method for it (marked ``@route(METHOD, PATH)`` in ``opscore/client/_async.py``).
"""

from __future__ import annotations

import inspect
from typing import Any

import pytest
from fastapi.routing import iter_route_contexts

from opscore.api import create_app
from opscore.client import AsyncClient, Client
from opscore.config import Settings

NOT_API = {
    ("GET", "/docs"): "the Swagger UI page, for browsers",
    ("GET", "/redoc"): "the ReDoc page, for browsers",
}
"""Routes that are pages for people, not operations of the API."""

STREAMS = {"/v1/opscore/audit/stream", "/metrics"}
"""Routes a client needs even when the OpenAPI document leaves them out."""


def app_routes() -> dict[tuple[str, str], bool]:
    """(method, path) -> whether it takes ``Idempotency-Key``, for every operation of the app."""
    app = create_app(Settings(api_key="route-walk-key-0123456789", database_url="memory://"))
    document = app.openapi()
    found: dict[tuple[str, str], bool] = {}
    for ctx in iter_route_contexts(app.routes):  # FastAPI 0.165 keeps included routers as routers
        if not ctx.methods:
            continue  # mounts of static files
        if not ctx.include_in_schema and ctx.path not in STREAMS:
            continue  # the console's pages, redirects, /docs and /openapi.json's own route
        for method in set(ctx.methods) - {"HEAD", "OPTIONS"}:
            operation = document["paths"].get(ctx.path, {}).get(method.lower(), {})
            names = {p.get("name", "").lower() for p in operation.get("parameters", [])}
            found[(method, ctx.path)] = "idempotency-key" in names
    found[("GET", "/openapi.json")] = False  # served by FastAPI itself, outside the schema
    return {key: value for key, value in found.items() if key not in NOT_API}


def client_routes(client: Any) -> dict[tuple[str, str], tuple[str, bool]]:
    """(method, path) -> (the method's name, transition?) over the client and its resources."""
    owners = [client, *(v for v in vars(client).values() if type(v).__module__.startswith("opscore.client"))]
    found: dict[tuple[str, str], tuple[str, bool]] = {}
    for owner in owners:
        for name, member in inspect.getmembers(type(owner), inspect.isfunction):
            mark = getattr(member, "__opscore_route__", None)
            if mark is not None:
                method, path, transition = mark
                assert (method, path) not in found, f"two methods for {method} {path}"
                found[(method, path)] = (f"{type(owner).__name__}.{name}", transition)
    return found


@pytest.mark.parametrize("kind", [Client, AsyncClient], ids=["Client", "AsyncClient"])
def test_every_route_has_a_client_method_and_every_method_a_route(kind: type) -> None:
    client = kind("http://opscore.test", "key")
    routes = app_routes()
    methods = client_routes(client)
    missing = sorted(set(routes) - set(methods))
    assert not missing, f"routes without a client method (add one in opscore/client/_async.py): {missing}"
    invented = sorted((k, methods[k][0]) for k in set(methods) - set(routes) if k[1] not in STREAMS)
    assert not invented, f"client methods for routes the app does not have: {invented}"


def test_transition_calls_are_exactly_the_routes_taking_an_idempotency_key() -> None:
    routes = app_routes()
    methods = client_routes(Client("http://opscore.test", "key"))
    wrong = {key: (methods[key], takes) for key, takes in routes.items() if methods[key][1] != takes}
    assert not wrong, f"transition=... disagrees with the route's Idempotency-Key header: {wrong}"
    assert sum(routes.values()) == 3  # state report, agent trigger, run transition


def test_every_route_method_has_a_docstring_showing_a_call_or_its_answer() -> None:
    client = Client("http://opscore.test", "key")
    owners = [client, *(v for v in vars(client).values() if type(v).__module__.startswith("opscore.client"))]
    for owner in owners:
        for name, member in inspect.getmembers(type(owner), inspect.isfunction):
            if hasattr(member, "__opscore_route__"):
                doc = inspect.getdoc(member) or ""
                shows = ">>>" in doc or "``" in doc  # a call and its answer, or the answer's shape
                assert shows, f"{type(owner).__name__}.{name}: no docstring showing a call or an answer"
