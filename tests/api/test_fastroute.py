"""The hot routes' twins (``opscore/api/fastroute.py``) answer exactly as the FastAPI routes they stand for.

Two apps over two fresh stores of the same backend: one with its twins (what ships), one built
with ``create_app(fast_routes=False)`` (every request through FastAPI's routing, solver and body
handling). The same sequence of valid and hostile requests goes to both, one request to each in
turn, and every answer must match: status, the headers that matter, the body (request ids aside).
Afterwards the access lines, the metrics and the audit chains of both must match too, and
``/openapi.json`` must be the same document.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import json
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from opscore.api import create_app
from opscore.api.fastroute import FastRoutes
from opscore.config import Settings
from opscore.keys import ApiKey

V1 = "/v1/opscore"
ADMIN = "admin:admin-secret-0123456789"
SECRETS = {
    "reader": "reader-secret-0123456789",
    "summariser": "summariser-secret-0123456789",
    "anyreporter": "anyreporter-secret-0123456789",
}
ENTRIES = [
    {"name": "reader", "scopes": ["read"]},
    {"name": "summariser", "scopes": ["report"], "agents": ["summariser-*"]},
    {"name": "anyreporter", "scopes": ["report"]},
]
MAX_BODY = 131_072
NOW = datetime.now(UTC)


def stamp(seconds: float = 0.0) -> str:
    return (NOW - timedelta(minutes=10) + timedelta(seconds=seconds)).isoformat()


def bearer(name: str) -> dict[str, str]:
    secret = ADMIN.split(":", 1)[1] if name == "admin" else SECRETS[name]
    return {"Authorization": f"Bearer {secret}"}


def nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(depth):
        value = {"a": value}
    return value


@pytest.fixture(params=["memory", "sqlite"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def keys_file(tmp_path: Path) -> str:
    entries = [{**e, "sha256": hashlib.sha256(SECRETS[str(e["name"])].encode()).hexdigest()} for e in ENTRIES]
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(entries), encoding="utf-8")
    return str(path)


def settings(backend: str, tmp_path: Path, name: str) -> Settings:
    url = "memory://" if backend == "memory" else f"sqlite:///{tmp_path / f'{name}.db'}"
    return Settings(
        database_url=url,
        api_key=ADMIN,
        keys_file=keys_file(tmp_path),
        webhook_secret="fastroute-webhook-secret",
        agentkit_api_url="http://127.0.0.1:9",
        max_body_bytes=MAX_BODY,
    )


class Twins:
    """The two apps, their clients, and how often a twin answered."""

    def __init__(self, fast: FastAPI, slow: FastAPI, fast_client: httpx.AsyncClient, slow_client: httpx.AsyncClient):
        self.fast, self.slow = fast, slow
        self.fast_client, self.slow_client = fast_client, slow_client
        self.twin_calls = 0  # requests a twin answered (FastRoutes.match found one)
        routes: FastRoutes = fast.state.fast_routes
        assert routes is not None and slow.state.fast_routes is None

        match = routes.match

        def counted(scope: Any) -> Any:
            found = match(scope)
            self.twin_calls += found is not None
            return found

        routes.match = counted  # type: ignore[method-assign]
        assert {route.path for route, _ in routes.routes} == {f"{V1}/agent/{{agent_id}}/state", f"{V1}/state-reports"}
        # both take the direct field.validate() way; a body-less request takes FastAPI's functions
        assert all(routes.plain.values()), routes.plain

    async def both(self, method: str, path: str, **kwargs: Any) -> tuple[httpx.Response, httpx.Response]:
        content = kwargs.get("content")
        if callable(content):  # a fresh stream for each app (a chunked body)
            fast = await self.fast_client.request(method, path, **{**kwargs, "content": content()})
            slow = await self.slow_client.request(method, path, **{**kwargs, "content": content()})
        else:
            fast = await self.fast_client.request(method, path, **kwargs)
            slow = await self.slow_client.request(method, path, **kwargs)
        return fast, slow


@asynccontextmanager
async def twins(backend: str, tmp_path: Path) -> AsyncIterator[Twins]:
    fast = create_app(settings(backend, tmp_path, "fast"))
    slow = create_app(settings(backend, tmp_path, "slow"), fast_routes=False)
    async with AsyncExitStack() as stack:
        clients = []
        for app in (fast, slow):
            await stack.enter_async_context(app.router.lifespan_context(app))
            client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://opscore.test")
            clients.append(await stack.enter_async_context(client))
        yield Twins(fast, slow, clients[0], clients[1])


HEADERS_THAT_MATTER = ("content-type", "content-length", "etag", "www-authenticate", "allow", "location")


SERVER_TIMES_AND_IDS = frozenset({"requestId", "latestAccepted"})
"""Keys whose values are this request's own id or the server's clock: each app has its own."""


def without_request_ids(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: without_request_ids(v) for k, v in value.items() if k not in SERVER_TIMES_AND_IDS}
    if isinstance(value, list):
        return [without_request_ids(v) for v in value]
    return value


def assert_same(name: str, fast: httpx.Response, slow: httpx.Response) -> None:
    assert fast.status_code == slow.status_code, (name, fast.status_code, fast.text, slow.status_code, slow.text)
    for header in HEADERS_THAT_MATTER:
        assert fast.headers.get(header) == slow.headers.get(header), (name, header, fast.headers, slow.headers)
    assert sorted(fast.headers.keys()) == sorted(slow.headers.keys()), (name, fast.headers, slow.headers)
    assert fast.headers["x-request-id"] and slow.headers["x-request-id"], name
    assert fast.headers.get("x-client-request-id") == slow.headers.get("x-client-request-id"), name
    if fast.headers.get("content-type", "").startswith("application/json"):
        assert without_request_ids(fast.json()) == without_request_ids(slow.json()), (name, fast.text, slow.text)
        if "requestId" in fast.json():  # a 5xx names its own request, in its own header
            assert fast.json()["requestId"] == fast.headers["x-request-id"]
    else:
        assert fast.content == slow.content, (name, fast.content[:200], slow.content[:200])


JSON = {"content-type": "application/json"}
STATE = f"{V1}/agent/{{}}/state"
BATCH = f"{V1}/state-reports"


def report(state: str, seconds: float, **extra: Any) -> dict[str, Any]:
    return {"timestamp": stamp(seconds), "state": state, **extra}


def raw(text: str | bytes, headers: dict[str, str] | None = None, **kw: Any) -> dict[str, Any]:
    return {"content": text.encode() if isinstance(text, str) else text, "headers": {**JSON, **(headers or {})}, **kw}


POISONS = {
    "nan": '{"x": NaN}',
    "infinity": '{"x": Infinity}',
    "minus-infinity": '{"x": -Infinity}',
    "1e400": '{"x": 1e400}',
    "lone-surrogate": '{"x": "\\udfff"}',
    "lone-surrogate-key": '{"\\ud800": 1}',
    "nul": '{"x": "a\\u0000b"}',
    "300-deep": json.dumps(nested(300)),
    "33-deep": json.dumps(nested(33)),
}


def cases(session_cookie: str, csrf: str) -> Iterator[tuple[str, str, str, dict[str, Any]]]:
    """(name, method, path, httpx arguments), in order: later cases depend on the state earlier ones left."""
    admin = bearer("admin")
    a = STATE.format("eq-1")
    # valid reports, registration on the spot, heartbeats, refusals the engine decides
    yield "first report registers", "POST", a, {"json": report("idle", 1), "headers": admin}
    yield "heartbeat", "POST", a, {"json": report("idle", 2), "headers": admin}
    yield "transition", "POST", a, {"json": report("active", 3, details={"opscore_task_id": "t"}), "headers": admin}
    yield "same agentId in body", "POST", a, {"json": {**report("idle", 4), "agentId": "eq-1"}, "headers": admin}
    yield "agentId mismatch", "POST", a, {"json": {**report("active", 5), "agentId": "eq-2"}, "headers": admin}
    yield "illegal transition", "POST", a, {"json": report("registered", 6), "headers": admin}
    yield "stale report", "POST", a, {"json": report("active", 0.5), "headers": admin}
    yield "unknown state", "POST", a, {"json": report("dancing", 7), "headers": admin}
    future = (datetime.now(UTC) + timedelta(hours=2)).isoformat()
    yield "future timestamp", "POST", a, {"json": {"timestamp": future, "state": "active"}, "headers": admin}
    yield "details null", "POST", a, {"json": report("active", 8, details=None), "headers": admin}
    yield "client request id", "POST", a, {"json": report("idle", 9), "headers": {**admin, "X-Request-Id": "mine-1"}}
    yield "query string ignored", "POST", a + "?x=1", {"json": report("active", 10), "headers": admin}
    # what JSON cannot carry, in details and as the whole body
    for name, poison in POISONS.items():
        body = f'{{"timestamp": "{stamp(11)}", "state": "idle", "details": {poison}}}'
        yield f"poison {name}", "POST", a, raw(body, admin)
    yield "body NaN timestamp", "POST", a, raw('{"timestamp": NaN, "state": "idle"}', admin)
    yield "body agentId with NUL", "POST", a, {"json": {**report("idle", 12), "agentId": "eq\x001"}, "headers": admin}
    yield "body agentId with LF", "POST", a, {"json": {**report("idle", 12), "agentId": "eq\n1"}, "headers": admin}
    yield "state too long", "POST", a, {"json": report("x" * 65, 12), "headers": admin}
    yield "state not a string", "POST", a, {"json": {"timestamp": stamp(12), "state": 3}, "headers": admin}
    yield "timestamp missing", "POST", a, {"json": {"state": "idle"}, "headers": admin}
    yield "timestamp garbage", "POST", a, {"json": {"timestamp": "yesterday", "state": "idle"}, "headers": admin}
    yield "details a list", "POST", a, {"json": {**report("idle", 12), "details": [1]}, "headers": admin}
    yield "extra fields", "POST", a, {"json": {**report("idle", 13), "colour": "red"}, "headers": admin}
    # ids in the path
    for name, agent in {
        "NUL": "%00x",
        "CR": "a%0Db",
        "LF": "a%0Ab",
        "DEL": "a%7F",
        "C1": "a%C2%85",
        "undecodable": "%FF",
        "surrogate bytes": "%ED%A0%80",
        "U+FFFD": "%EF%BF%BD",
        "257 long": "x" * 257,
        "256 long": "y" * 256,
        "unicode": "agent-%C3%A9t%C3%A9",
        "space": "a%20b",
    }.items():
        yield f"path id {name}", "POST", STATE.format(agent), {"json": report("idle", 14), "headers": admin}
    yield "path id invalid and body invalid", "POST", STATE.format("%00"), {"json": {"state": 3}, "headers": admin}
    # bodies that are not JSON objects, or not JSON, or not declared as JSON
    for name, body in {
        "empty": b"",
        "null": b"null",
        "list": b"[]",
        "string": b'"x"',
        "number": b"1",
        "bad JSON": b'{"state": ',
        "trailing garbage": b'{"state": "idle"} x',
        "not UTF-8": b'\xff\xfe{"x": 1}',
        "UTF-16 with BOM": json.dumps(report("idle", 15)).encode("utf-16"),
        "UTF-8 BOM": b"\xef\xbb\xbf" + json.dumps(report("active", 16)).encode(),
        "duplicate keys": f'{{"state": "idle", "timestamp": "{stamp(17)}", "state": "active"}}'.encode(),
        "big integer": f'{{"timestamp": "{stamp(18)}", "state": "idle", "details": {{"n": {10**40}}}}}'.encode(),
    }.items():
        yield f"body {name}", "POST", a, raw(body, admin)
    good = json.dumps(report("idle", 19)).encode()
    for name, content_type in {
        "text/plain": "text/plain",
        "form": "application/x-www-form-urlencoded",
        "json with charset": "application/json; charset=utf-8",
        "+json": "application/merge-patch+json",
        "uppercase": "Application/JSON",
        "garbage": ";;;",
        "json/application": "json/application",
    }.items():
        yield f"content type {name}", "POST", a, {"content": good, "headers": {**admin, "content-type": content_type}}
    yield "no content type", "POST", a, {"content": good, "headers": admin}
    yield "no content type, no body", "POST", a, {"headers": admin}
    # sizes
    big = json.dumps({**report("idle", 20), "details": {"pad": "x" * MAX_BODY}}).encode()
    yield "declared body over the limit", "POST", a, raw(big, admin)

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(big), 1000):
            yield big[i : i + 1000]

    yield "chunked body over the limit", "POST", a, {"content": chunks, "headers": {**admin, **JSON}}

    async def small_chunks() -> AsyncIterator[bytes]:
        body = json.dumps(report("active", 21)).encode()
        yield body[:10]
        yield body[10:]

    yield "chunked body under the limit", "POST", a, {"content": small_chunks, "headers": {**admin, **JSON}}
    # credentials and scopes
    yield "no Authorization", "POST", a, {"json": report("idle", 22)}
    yield "Basic scheme", "POST", a, {"json": report("idle", 22), "headers": {"Authorization": "Basic eDp5"}}
    yield "Bearer without token", "POST", a, {"json": report("idle", 22), "headers": {"Authorization": "Bearer  "}}
    yield "invalid key", "POST", a, {"json": report("idle", 22), "headers": {"Authorization": "Bearer nope"}}
    yield "read-only key", "POST", a, {"json": report("idle", 22), "headers": bearer("reader")}
    yield "key outside its globs", "POST", a, {"json": report("idle", 22), "headers": bearer("summariser")}
    s1 = STATE.format("summariser-1")
    yield "key inside its globs", "POST", s1, {"json": report("idle", 22), "headers": bearer("summariser")}
    yield "no auth and bad JSON", "POST", a, raw(b"{", None)
    yield "no auth and invalid body", "POST", a, {"json": {"state": 3}}
    yield "no auth and invalid path id", "POST", STATE.format("%00"), {"json": report("idle", 22)}
    yield "wrong scope and invalid body", "POST", a, {"json": {"state": 3}, "headers": bearer("reader")}
    yield (
        "wrong scope and bad If-Match",
        "POST",
        a,
        {
            "json": report("idle", 22),
            "headers": {**bearer("reader"), "If-Match": "abc"},
        },
    )
    yield "no auth and bad If-Match", "POST", a, {"json": report("idle", 22), "headers": {"If-Match": "abc"}}
    cookie = {"Cookie": f"opscore_session={session_cookie}"}
    yield "session without CSRF token", "POST", a, {"json": report("active", 23), "headers": cookie}
    yield (
        "session with CSRF token",
        "POST",
        a,
        {
            "json": report("active", 23),
            "headers": {**cookie, "X-CSRF-Token": csrf},
        },
    )
    yield "forged session", "POST", a, {"json": report("idle", 24), "headers": {"Cookie": "opscore_session=x.y"}}
    # idempotency and preconditions
    key = {**admin, "Idempotency-Key": "eq-k1"}
    yield "idempotent first", "POST", a, {"json": report("idle", 25), "headers": key}
    yield "idempotent replay", "POST", a, {"json": report("idle", 25), "headers": key}
    yield "idempotent key, another body", "POST", a, {"json": report("active", 26), "headers": key}
    yield (
        "idempotency key too long",
        "POST",
        a,
        {
            "json": report("active", 26),
            "headers": {**admin, "Idempotency-Key": "k" * 256},
        },
    )
    yield (
        "idempotency key empty",
        "POST",
        a,
        {"json": report("active", 26), "headers": {**admin, "Idempotency-Key": ""}},
    )
    yield "If-Match stale", "POST", a, {"json": report("active", 27), "headers": {**admin, "If-Match": '"1"'}}
    yield "If-Match garbage", "POST", a, {"json": report("active", 27), "headers": {**admin, "If-Match": "abc"}}
    yield (
        "If-Match too many digits",
        "POST",
        a,
        {
            "json": report("active", 27),
            "headers": {**admin, "If-Match": '"' + "9" * 40 + '"'},
        },
    )
    yield "If-Match star", "POST", a, {"json": report("active", 28), "headers": {**admin, "If-Match": "*"}}
    yield "If-Match current (weak)", "POST", a, {"json": report("idle", 29), "headers": {**admin, "If-Match": 'W/"5"'}}
    yield (
        "If-Match and Idempotency-Key",
        "POST",
        a,
        {
            "json": report("active", 30),
            "headers": {**admin, "If-Match": '"99"', "Idempotency-Key": "eq-k2"},
        },
    )
    yield (
        "If-Match and Idempotency-Key replay",
        "POST",
        a,
        {
            "json": report("active", 30),
            "headers": {**admin, "If-Match": '"99"', "Idempotency-Key": "eq-k2"},
        },
    )
    # the same path with other methods and shapes: FastAPI's own answers, through both apps
    yield "GET the state", "GET", a, {"headers": admin}
    yield "PUT the state", "PUT", a, {"json": report("idle", 31), "headers": admin}
    yield "trailing slash", "POST", a + "/", {"json": report("idle", 31), "headers": admin}
    yield "no agent id", "POST", f"{V1}/agent//state", {"json": report("idle", 31), "headers": admin}
    # the batch route
    yield (
        "batch",
        "POST",
        BATCH,
        {
            "json": {
                "reports": [
                    {"agentId": "eq-b1", **report("idle", 40)},
                    {"agentId": "eq-b2", **report("initializing", 40)},
                    {"agentId": "eq-b1", **report("active", 41)},
                    {"agentId": "eq-b1", **report("registered", 42)},
                    {"agentId": "eq-b1", **report("idle", 1)},
                    {"agentId": "eq\x00b", **report("idle", 40)},
                    {"state": "idle"},
                    {"agentId": "eq-b3", "timestamp": stamp(40), "state": "idle", "details": {"x": [[[[1]]]]}},
                    "not an object",
                ]
            },
            "headers": admin,
        },
    )
    yield (
        "batch, globs",
        "POST",
        BATCH,
        {
            "json": {
                "reports": [
                    {"agentId": "summariser-b", **report("idle", 43)},
                    {"agentId": "eq-b9", **report("idle", 43)},
                ]
            },
            "headers": bearer("summariser"),
        },
    )
    yield "batch, poison", "POST", BATCH, raw(f'{{"reports": [{POISONS["nan"]}]}}', admin)
    yield (
        "batch, 1001 reports",
        "POST",
        BATCH,
        {
            "json": {"reports": [{"agentId": f"eq-m{i}", **report("idle", 44)} for i in range(1001)]},
            "headers": admin,
        },
    )
    yield "batch, reports not a list", "POST", BATCH, {"json": {"reports": {}}, "headers": admin}
    yield "batch, empty", "POST", BATCH, {"json": {"reports": []}, "headers": admin}
    yield "batch, no body", "POST", BATCH, {"headers": admin}
    yield "batch, If-Match", "POST", BATCH, {"json": {"reports": []}, "headers": {**admin, "If-Match": '"1"'}}
    yield (
        "batch, Idempotency-Key",
        "POST",
        BATCH,
        {
            "json": {"reports": []},
            "headers": {**admin, "Idempotency-Key": "x"},
        },
    )
    yield "batch, no Authorization", "POST", BATCH, {"json": {"reports": []}}
    yield "batch, read-only key", "POST", BATCH, {"json": {"reports": []}, "headers": bearer("reader")}
    yield "batch, bad JSON", "POST", BATCH, raw(b"[", admin)
    yield (
        "batch, text/plain",
        "POST",
        BATCH,
        {"content": b'{"reports": []}', "headers": {**admin, "content-type": "text/plain"}},
    )
    yield "batch, session without CSRF", "POST", BATCH, {"json": {"reports": []}, "headers": cookie}
    yield "GET the batch path", "GET", BATCH, {"headers": admin}


NOT_TWINNED = [
    "GET the state",
    "PUT the state",
    "trailing slash",
    "no agent id",
    "GET the batch path",
]


def session_for(app: FastAPI) -> tuple[str, str]:
    """A console session cookie of the admin key and its CSRF token (valid on both apps: same secret)."""
    sessions = app.state.sessions
    key: ApiKey = next(k for k in app.state.api_keys if k.name == "admin")
    value, session = sessions.issue(key)
    return value, sessions.csrf_token(session)


def record_view(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k not in ("recordedAt", "requestId", "hash", "prevHash", "id")}


def test_the_twins_answer_as_fastapi_does(backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lines: list[tuple[Any, ...]] = []

    def access_line(method: str, route: str | None, status: int, seconds: float, rid: str, crid: Any, key: Any) -> None:
        lines.append((method, route, status, crid, key))

    monkeypatch.setattr(importlib.import_module("opscore.api.app"), "access_line", access_line)

    async def scenario() -> None:
        async with twins(backend, tmp_path) as t:
            cookie, csrf = session_for(t.fast)
            names = []
            untwinned = []
            for name, method, path, kwargs in cases(cookie, csrf):
                before = t.twin_calls
                fast, slow = await t.both(method, path, **kwargs)
                assert_same(name, fast, slow)
                names.append((name, fast.status_code))
                if t.twin_calls == before:
                    untwinned.append(name)
            statuses = {status for _, status in names}
            assert {200, 307, 401, 403, 405, 409, 412, 413, 422} <= statuses, names
            # every POST to the two routes went to a twin (the declared 413 is then Guard's)
            assert untwinned == NOT_TWINNED
            # the access lines, in order: the same method, route template, status, client id and key
            assert len(lines) == 2 * len(names)
            assert lines[0::2] == lines[1::2]
            # the metrics: requests by route and status, refused credentials, transitions
            fm, sm = t.fast.state.metrics, t.slow.state.metrics
            assert fm.http_requests.values == sm.http_requests.values
            assert fm.auth_denied_total.values == sm.auth_denied_total.values
            assert fm.transitions.values == sm.transitions.values
            # the audit chains: the same records (times, hashes and request ids aside)
            chains = []
            for client in (t.fast_client, t.slow_client):
                answer = await client.get(f"{V1}/audit", params={"limit": 1000}, headers=bearer("admin"))
                assert answer.status_code == 200
                chains.append([record_view(r) for r in answer.json()["items"]])
                verify = await client.get(f"{V1}/audit/verify", headers=bearer("admin"))
                assert verify.json()["ok"], verify.text
            assert chains[0] == chains[1]
            assert len(chains[0]) > 10

    asyncio.run(scenario())


def test_the_openapi_document_is_the_same_with_and_without_twins(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with twins("memory", tmp_path) as t:
            fast, slow = await t.both("GET", "/openapi.json")
            assert fast.status_code == slow.status_code == 200
            assert fast.json() == slow.json()
            paths = fast.json()["paths"]
            assert "post" in paths[f"{V1}/agent/{{agent_id}}/state"] and "post" in paths[BATCH]
            assert t.twin_calls == 0

    asyncio.run(scenario())


def test_a_twin_that_fails_unexpectedly_answers_the_generic_500(tmp_path: Path) -> None:
    """An unexpected exception leaves the twin as it leaves a route: ServerErrorMiddleware's 500."""

    async def scenario() -> None:
        async with twins("memory", tmp_path) as t:
            for app in (t.fast, t.slow):

                async def broken(*args: Any, **kwargs: Any) -> Any:
                    raise RuntimeError("the store fell over")

                app.state.engine.report = broken
            for client in (t.fast_client, t.slow_client):
                client._transport = httpx.ASGITransport(app=client._transport.app, raise_app_exceptions=False)  # type: ignore[attr-defined]
            fast, slow = await t.both("POST", STATE.format("boom"), json=report("idle", 1), headers=bearer("admin"))
            assert fast.status_code == 500
            assert_same("unexpected error", fast, slow)
            assert t.twin_calls == 1

    asyncio.run(scenario())
