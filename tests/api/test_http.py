"""HTTP behaviour of a real ``opscore serve``: auth, limits, error shape, bad input, ETags, idempotency."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.api.helpers import report, trigger, ts
from tests.servers import Server

V1 = "/v1/opscore"
MIB = 1024 * 1024


def assert_error(answer: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"].startswith("application/json")
    body = answer.json()
    assert isinstance(body, dict)
    assert isinstance(body.get("detail"), str) and body["detail"]
    assert isinstance(body.get("code"), str) and body["code"]
    if code is not None:
        assert body["code"] == code, body
    return body


# -- authentication -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "authorization",
    [
        pytest.param(None, id="missing"),
        pytest.param("Bearer wrong-key", id="wrong"),
        pytest.param("Basic dXNlcjpwYXNz", id="basic"),
        pytest.param("Bearer", id="bearer-without-key"),
        pytest.param("Token abc", id="other-scheme"),
        pytest.param("bearer-no-space", id="malformed"),
    ],
)
def test_v1_needs_a_valid_bearer_key(server: Server, authorization: str | None) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    for method, path in [("GET", f"{V1}/agents"), ("GET", f"{V1}/audit/verify"), ("POST", f"{V1}/agent/x/state")]:
        with server.anonymous() as anonymous:
            answer = anonymous.request(method, path, headers=headers, json={"state": "idle", "timestamp": ts()})
        assert_error(answer, 401, "unauthorized")
        assert answer.headers["www-authenticate"] == "Bearer"
    with server.client() as client:
        assert client.get(f"{V1}/agent/x").status_code == 404  # nothing was created by the refused report


def test_health_docs_and_openapi_are_open(server: Server) -> None:
    with server.anonymous() as anonymous:
        health = anonymous.get("/health")
        assert health.status_code == 200 and health.json()["status"] == "ok"
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert anonymous.get(path).status_code == 200, path


def test_the_right_key_works_and_is_the_actor(server: Server) -> None:
    with server.client() as client:
        assert report(client, "k1", "idle").status_code == 200
        (record,) = client.get(f"{V1}/agent/k1/audit").json()["items"]
    assert record["actor"].startswith("key:") and server.api_key not in json.dumps(record)


# -- 413 ------------------------------------------------------------------------------------


def test_bodies_over_one_mib_are_413_with_content_length(server: Server) -> None:
    with server.client() as client:
        body = b'{"state":"idle","timestamp":"' + b"x" * MIB + b'"}'
        assert_error(client.post(f"{V1}/agent/big/state", content=body), 413, "payload_too_large")
        assert client.get(f"{V1}/agent/big").status_code == 404


def chunks(total: int, size: int = 64 * 1024) -> Iterator[bytes]:
    yield b'{"state":"idle","timestamp":"2026-01-01T00:00:00Z","details":{"pad":"'
    sent = 0
    while sent < total:
        yield b"x" * size
        sent += size
    yield b'"}}'


@pytest.mark.parametrize("path", [f"{V1}/agent/big/state", f"{V1}/agent/big/transitions", f"{V1}/agents"])
def test_bodies_over_one_mib_are_413_when_chunked(server: Server, path: str) -> None:
    with server.client() as client:
        answer = client.post(path, content=chunks(MIB + 1), headers={"Content-Type": "application/json"})
        assert "content-length" not in answer.request.headers
        assert_error(answer, 413, "payload_too_large")
        hook = server.anonymous().post(f"{V1}/internal/agent/notify", content=chunks(MIB + 1))
        assert_error(hook, 413, "payload_too_large")
        # just under the limit is fine
        small = client.post(f"{V1}/agent/small/state", content=chunks(MIB - 200_000), headers=JSON)
        assert small.status_code == 200, small.text


# -- one error shape for every error status ----------------------------------------------------


def test_every_error_status_has_the_same_shape(server: Server) -> None:
    with server.client() as client:
        assert report(client, "e1", "idle").status_code == 200
        cases = {
            401: (server.anonymous().get(f"{V1}/agents"), "unauthorized"),
            404: (client.get(f"{V1}/agent/nobody"), "unknown_agent"),
            409: (report(client, "e1", "registered"), "illegal_transition"),
            412: (trigger(client, "e1", "begin_task", **{"If-Match": '"7"'}), "revision_mismatch"),
            413: (client.post(f"{V1}/agents", content=b"{" + b" " * MIB + b"}"), "payload_too_large"),
            422: (report(client, "e1", "sleeping"), "unknown_state"),
        }
        for status, (answer, code) in cases.items():
            assert_error(answer, status, code)
        extra = [
            (client.get(f"{V1}/no/such/route"), 404),
            (client.get(f"{V1}/machines/nope"), 404),
            (client.post(f"{V1}/agent/e1/transitions", json={"trigger": "no_such"}), 422),
            (client.post(f"{V1}/agents", json={}), 422),
            (client.delete(f"{V1}/agents"), 405),
            (report(client, "e1", "idle", timestamp="2000-01-01T00:00:00Z"), 409),
        ]
        for answer, status in extra:
            assert_error(answer, status)
        illegal = cases[409][0].json()
        assert (illegal["from"], illegal["to"]) == ("idle", "registered")
        assert illegal["allowed"] == ["initializing", "active", "error", "offline", "deregistered"]
        assert "registered" in cases[422][0].json()["detail"]  # lists the valid states


# -- bad input never answers 5xx ----------------------------------------------------------------

JSON = {"Content-Type": "application/json"}


def cursor_of(obj: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")


MALFORMED: list[tuple[str, str, str, dict[str, Any], int | None]] = [
    ("bad json", "POST", "/agent/m/state", {"content": b"{not json", "headers": JSON}, 422),
    ("json array", "POST", "/agent/m/state", {"json": ["idle"]}, 422),
    ("json string", "POST", "/agent/m/state", {"json": "idle"}, 422),
    ("empty body", "POST", "/agent/m/state", {"content": b"", "headers": JSON}, 422),
    ("text body", "POST", "/agent/m/state", {"content": b"state=idle", "headers": {"Content-Type": "text/plain"}}, 422),
    ("missing state", "POST", "/agent/m/state", {"json": {"timestamp": "2026-01-01T00:00:00Z"}}, 422),
    ("missing timestamp", "POST", "/agent/m/state", {"json": {"state": "idle"}}, 422),
    ("state is a number", "POST", "/agent/m/state", {"json": {"state": 3, "timestamp": "2026-01-01T00:00:00Z"}}, 422),
    ("state is null", "POST", "/agent/m/state", {"json": {"state": None, "timestamp": "2026-01-01T00:00:00Z"}}, 422),
    (
        "details is a list",
        "POST",
        "/agent/m/state",
        {"json": {"state": "idle", "timestamp": "2026-01-01T00:00:00Z", "details": [1]}},
        422,
    ),
    (
        "huge state",
        "POST",
        "/agent/m/state",
        {"json": {"state": "x" * 500_000, "timestamp": "2026-01-01T00:00:00Z"}},
        422,
    ),
    ("invalid timestamp", "POST", "/agent/m/state", {"json": {"state": "idle", "timestamp": "yesterday"}}, 422),
    (
        "timestamp 30 Feb",
        "POST",
        "/agent/m/state",
        {"json": {"state": "idle", "timestamp": "2026-02-30T00:00:00Z"}},
        422,
    ),
    (
        "timestamp year 0",
        "POST",
        "/agent/m/state",
        {"json": {"state": "idle", "timestamp": "0000-01-01T00:00:00Z"}},
        422,
    ),
    (
        "timestamp overflows UTC",
        "POST",
        "/agent/m/state",
        {"json": {"state": "idle", "timestamp": "0001-01-01T00:00:00+05:00"}},
        422,
    ),
    (
        "timestamp overflows UTC (9999)",
        "POST",
        "/agent/m/state",
        {"json": {"state": "idle", "timestamp": "9999-12-31T23:59:59-05:00"}},
        422,
    ),
    ("timestamp huge number", "POST", "/agent/m/state", {"json": {"state": "idle", "timestamp": 1e300}}, 422),
    ("timestamp is a list", "POST", "/agent/m/state", {"json": {"state": "idle", "timestamp": [2026]}}, 422),
    (
        "agentId mismatch",
        "POST",
        "/agent/m/state",
        {"json": {"agentId": "other", "state": "idle", "timestamp": "2026-01-01T00:00:00Z"}},
        422,
    ),
    (
        "NaN in details",
        "POST",
        "/agent/m/state",
        {"content": b'{"state":"idle","timestamp":"2026-01-01T00:00:00Z","details":{"x":NaN}}', "headers": JSON},
        422,
    ),
    (
        "Infinity in details",
        "POST",
        "/agent/m/state",
        {
            "content": b'{"state":"idle","timestamp":"2026-01-01T00:00:00Z","details":{"x":[-Infinity]}}',
            "headers": JSON,
        },
        422,
    ),
    (
        "lone surrogate",
        "POST",
        "/agent/m/state",
        {"content": b'{"state":"idle","timestamp":"2026-01-01T00:00:00Z","details":{"x":"\\ud800"}}', "headers": JSON},
        422,
    ),
    (
        "lone surrogate key",
        "POST",
        "/agent/m/state",
        {"content": b'{"state":"idle","timestamp":"2026-01-01T00:00:00Z","details":{"\\udfff":1}}', "headers": JSON},
        422,
    ),
    (
        "deep nesting",
        "POST",
        "/agent/m/state",
        {
            "content": b'{"state":"idle","timestamp":"2026-01-01T00:00:00Z","details":'
            + b'{"a":' * 300
            + b"1"
            + b"}" * 300
            + b"}",
            "headers": JSON,
        },
        422,
    ),
    (
        "very deep nesting",
        "POST",
        "/agent/m/state",
        {
            "content": b'{"state":"idle","timestamp":"2026-01-01T00:00:00Z","details":'
            + b"[" * 100_000
            + b"]" * 100_000
            + b"}",
            "headers": JSON,
        },
        None,
    ),
    (
        "bad If-Match",
        "POST",
        "/agent/m/state",
        {"json": {"state": "idle", "timestamp": "2026-01-01T00:00:00Z"}, "headers": {"If-Match": "abc"}},
        422,
    ),
    (
        "If-Match huge",
        "POST",
        "/agent/m/state",
        {"json": {"state": "idle", "timestamp": "2026-01-01T00:00:00Z"}, "headers": {"If-Match": '"' + "9" * 50 + '"'}},
        422,  # no revision has more than 18 digits: refused before int() (which fails past 4,300 digits)
    ),
    (
        "If-Match over Python's int digit limit",
        "POST",
        "/agent/m/state",
        {"json": {"state": "idle", "timestamp": "2026-01-01T00:00:00Z"}, "headers": {"If-Match": "9" * 5000}},
        422,
    ),
    (
        "If-Match non-ASCII digits",
        "POST",
        "/agent/m/state",
        {
            "json": {"state": "idle", "timestamp": "2026-01-01T00:00:00Z"},
            "headers": {"If-Match": b"\xb2"},
        },  # latin-1 superscript two: str.isdigit() says yes
        422,
    ),
    (
        "If-Match negative",
        "POST",
        "/agent/m/state",
        {"json": {"state": "idle", "timestamp": "2026-01-01T00:00:00Z"}, "headers": {"If-Match": '"-1"'}},
        422,
    ),
    (
        "empty Idempotency-Key",
        "POST",
        "/agent/m/state",
        {"json": {"state": "idle", "timestamp": "2026-01-01T00:00:00Z"}, "headers": {"Idempotency-Key": ""}},
        422,
    ),
    (
        "long Idempotency-Key",
        "POST",
        "/agent/m/state",
        {"json": {"state": "idle", "timestamp": "2026-01-01T00:00:00Z"}, "headers": {"Idempotency-Key": "k" * 300}},
        422,
    ),
    (
        "agent id too long",
        "POST",
        "/agent/" + "a" * 300 + "/state",
        {"json": {"state": "idle", "timestamp": "2026-01-01T00:00:00Z"}},
        422,
    ),
    ("trigger missing", "POST", "/agent/m/transitions", {"json": {}}, 422),
    ("trigger is a dict", "POST", "/agent/m/transitions", {"json": {"trigger": {"a": 1}}}, 422),
    ("trigger huge", "POST", "/agent/m/transitions", {"json": {"trigger": "t" * 100_000}}, 422),
    ("register without id", "POST", "/agents", {"json": {"agentName": "x"}}, 422),
    ("register id with slash", "POST", "/agents", {"json": {"agentId": "a/b"}}, 422),
    ("register id with newline", "POST", "/agents", {"json": {"agentId": "a\nb"}}, 422),
    ("register capabilities not a list", "POST", "/agents", {"json": {"agentId": "x", "capabilities": "all"}}, 422),
    (
        "register metadata NaN",
        "POST",
        "/agents",
        {"content": b'{"agentId":"x","metadata":{"v":NaN}}', "headers": JSON},
        422,
    ),
    (
        "register extra Infinity",
        "POST",
        "/agents",
        {"content": b'{"agentId":"x","extra":Infinity}', "headers": JSON},
        422,
    ),
    ("limit 0", "GET", "/audit", {"params": {"limit": 0}}, 422),
    ("limit 1001", "GET", "/audit", {"params": {"limit": 1001}}, 422),
    ("limit text", "GET", "/audit", {"params": {"limit": "ten"}}, 422),
    ("limit huge", "GET", "/audit", {"params": {"limit": "9" * 40}}, 422),
    ("agents limit 0", "GET", "/agents", {"params": {"limit": 0}}, 422),
    ("agents limit 1001", "GET", "/agents", {"params": {"limit": 1001}}, 422),
    ("order sideways", "GET", "/audit", {"params": {"order": "sideways"}}, 422),
    ("outcome unknown", "GET", "/audit", {"params": {"outcome": "maybe"}}, 422),
    ("since invalid", "GET", "/audit", {"params": {"since": "last week"}}, 422),
    ("until invalid", "GET", "/audit", {"params": {"until": "2026-13-01"}}, 422),
    ("since overflows UTC", "GET", "/audit", {"params": {"since": "0001-01-01T00:00:00+05:00"}}, 422),
    ("cursor garbage", "GET", "/audit", {"params": {"cursor": "!!!"}}, 422),
    ("cursor not base64 json", "GET", "/audit", {"params": {"cursor": "bm90IGpzb24"}}, 422),
    ("cursor a list", "GET", "/audit", {"params": {"cursor": cursor_of([1, 2])}}, 422),
    ("cursor a string position", "GET", "/audit", {"params": {"cursor": cursor_of({"p": "x", "o": "asc"})}}, 422),
    ("cursor a float position", "GET", "/audit", {"params": {"cursor": cursor_of({"p": 1.5, "o": "asc"})}}, 422),
    ("cursor a bool position", "GET", "/audit", {"params": {"cursor": cursor_of({"p": True, "o": "asc"})}}, 422),
    ("cursor huge position", "GET", "/audit", {"params": {"cursor": cursor_of({"p": 10**30, "o": "asc"})}}, 422),
    ("cursor negative huge", "GET", "/audit", {"params": {"cursor": cursor_of({"p": -(10**30), "o": "asc"})}}, 422),
    ("cursor of the other order", "GET", "/audit", {"params": {"cursor": cursor_of({"p": 1, "o": "desc"})}}, 422),
    ("agent audit bad cursor", "GET", "/agent/m/audit", {"params": {"cursor": "%%%"}}, None),
    ("agents cursor int", "GET", "/agents", {"params": {"cursor": cursor_of({"p": 5, "o": "asc"})}}, 422),
    ("agents cursor garbage", "GET", "/agents", {"params": {"cursor": "@@"}}, 422),
    # no id we hand out holds NUL (PostgreSQL text cannot): refused alike on every backend
    ("agents cursor nul", "GET", "/agents", {"params": {"cursor": cursor_of({"p": "\u0000", "o": "asc"})}}, 422),
    ("unknown machine", "GET", "/machines/../../etc", {}, None),
]


def test_malformed_input_never_answers_5xx(server: Server) -> None:
    failures = []
    with server.client() as client:
        assert report(client, "m", "idle").status_code == 200
        for label, method, path, kwargs, expected in MALFORMED:
            try:
                answer = client.request(method, V1 + path, **kwargs)
            except httpx.HTTPError as exc:  # a dropped connection is a 5xx in disguise
                failures.append(f"{label}: {exc!r}")
                continue
            if answer.status_code >= 500 or (expected is not None and answer.status_code != expected):
                failures.append(f"{label}: {answer.status_code} {answer.text[:200]}")
            elif answer.status_code >= 400:
                try:
                    assert_error(answer, answer.status_code)
                except AssertionError as exc:
                    failures.append(f"{label}: error shape {exc}")
        # nothing above changed the agent or broke the log
        state = client.get(f"{V1}/agent/m/state").json()
        assert (state["state"], state["revision"]) == ("idle", 1)
        assert client.get(f"{V1}/audit/verify").json()["ok"] is True
        assert client.get(f"{V1}/audit").status_code == 200
        assert client.get(f"{V1}/agents").status_code == 200
    assert not failures, "\n".join(failures)


# -- reading agents, ETags, If-Match, Idempotency-Key ----------------------------------------------


def test_get_agent_and_state_carry_the_revision_as_etag(server: Server) -> None:
    with server.client() as client:
        registered = client.post(f"{V1}/agents", json={"agentId": "g1", "agentName": "G", "capabilities": ["c"]})
        assert registered.status_code == 201 and registered.headers["etag"] == '"0"'
        assert report(client, "g1", "initializing", details={"step": 1}).status_code == 200
        answer = report(client, "g1", "idle", details={"step": 2})
        assert answer.status_code == 200 and answer.headers["etag"] == '"2"'
        agent = client.get(f"{V1}/agent/g1")
        assert agent.status_code == 200 and agent.headers["etag"] == '"2"'
        body = agent.json()
        assert (body["agentId"], body["agentName"], body["capabilities"]) == ("g1", "G", ["c"])
        assert (body["state"], body["revision"]) == ("idle", 2)
        assert body["lastSeenAt"] is not None and body["registeredAt"]
        state = client.get(f"{V1}/agent/g1/state")
        assert state.headers["etag"] == '"2"'
        assert state.json() == {
            "agentId": "g1",
            "state": "idle",
            "details": {"step": 2},
            "timestamp": body["lastReportAt"],
            "revision": 2,
        }
        again = client.post(f"{V1}/agents", json={"agentId": "g1", "version": "2"})
        assert again.status_code == 200 and again.json()["state"] == "idle" and again.json()["version"] == "2"


def test_if_match(server: Server) -> None:
    with server.client() as client:
        assert report(client, "im", "idle").status_code == 200
        refused = client.post(
            f"{V1}/agent/im/state", json={"state": "active", "timestamp": ts()}, headers={"If-Match": '"0"'}
        )
        body = assert_error(refused, 412, "revision_mismatch")
        assert body["revision"] == 1 and refused.headers["etag"] == '"1"'
        assert client.get(f"{V1}/agent/im").json()["state"] == "idle"
        for style in ('"{}"', 'W/"{}"', "{}", "*"):
            revision = client.get(f"{V1}/agent/im").json()["revision"]
            ok = trigger(client, "im", "begin_task", **{"If-Match": style.format(revision)})
            assert ok.status_code == 200, (style, ok.text)
            assert ok.json()["revision"] == revision + 1 and ok.headers["etag"] == f'"{revision + 1}"'
            assert trigger(client, "im", "finish_task").status_code == 200
        late = trigger(client, "im", "begin_task", **{"If-Match": '"1"'})
        assert_error(late, 412, "revision_mismatch")
        records = client.get(f"{V1}/agent/im/audit", params={"outcome": "rejected"}).json()["items"]
        assert [r["reason"] for r in records] == ["revision_mismatch", "revision_mismatch"]
        assert client.get(f"{V1}/agent/im").json()["revision"] == 9


def test_idempotency_key_replays_the_first_answer(server: Server) -> None:
    with server.client() as client:
        body = {"agentId": "ik", "state": "idle", "timestamp": ts(), "details": {"n": 1}}
        first = client.post(f"{V1}/agent/ik/state", json=body, headers={"Idempotency-Key": "key-1"})
        second = client.post(f"{V1}/agent/ik/state", json=body, headers={"Idempotency-Key": "key-1"})
        assert first.status_code == second.status_code == 200
        assert first.json() == second.json() and first.json()["changed"] is True
        assert first.json()["auditId"] is not None
        other = dict(body, state="active")
        reused = client.post(f"{V1}/agent/ik/state", json=other, headers={"Idempotency-Key": "key-1"})
        assert_error(reused, 422, "idempotency_key_reused")
        # a refusal is replayed too, and recorded once
        illegal = dict(body, state="registered", timestamp=ts())
        r1 = client.post(f"{V1}/agent/ik/state", json=illegal, headers={"Idempotency-Key": "key-2"})
        r2 = client.post(f"{V1}/agent/ik/state", json=illegal, headers={"Idempotency-Key": "key-2"})
        assert r1.status_code == r2.status_code == 409 and r1.json() == r2.json()
        # triggers too
        t1 = trigger(client, "ik", "begin_task", **{"Idempotency-Key": "key-3"})
        t2 = trigger(client, "ik", "begin_task", **{"Idempotency-Key": "key-3"})
        assert t1.status_code == t2.status_code == 200 and t1.json() == t2.json()
        records = client.get(f"{V1}/agent/ik/audit").json()["items"]
        assert [(r["event"], r["outcome"]) for r in records] == [
            ("ready", "applied"),
            (None, "rejected"),
            ("begin_task", "applied"),
        ]
        assert client.get(f"{V1}/agent/ik").json()["revision"] == 2


# -- machines, OpenAPI ---------------------------------------------------------------------------


def test_machines_are_served_as_declared(server: Server) -> None:
    from opscore.machines import MACHINES, public_view

    with server.client() as client:
        listing = client.get(f"{V1}/machines").json()["items"]
        assert listing == [public_view(d) for d in MACHINES.values()]
        for name, decl in MACHINES.items():
            assert client.get(f"{V1}/machines/{name}").json() == public_view(decl)


def test_every_route_is_described_in_openapi(server: Server) -> None:
    spec = server.anonymous().get("/openapi.json").json()
    operations = [(p, m, op) for p, ops in spec["paths"].items() for m, op in ops.items()]
    assert len(operations) >= 12
    for path, method, op in operations:
        assert op.get("summary"), f"{method.upper()} {path} has no summary"
        assert op.get("description"), f"{method.upper()} {path} has no description"
    paths = set(spec["paths"])
    for required in (
        "/health",
        f"{V1}/agents",
        f"{V1}/agent/{{agent_id}}",
        f"{V1}/agent/{{agent_id}}/state",
        f"{V1}/agent/{{agent_id}}/transitions",
        f"{V1}/agent/{{agent_id}}/audit",
        f"{V1}/audit",
        f"{V1}/audit/verify",
        f"{V1}/machines",
        f"{V1}/machines/{{name}}",
        f"{V1}/internal/agent/notify",
    ):
        assert required in paths, required


# -- one JSON log line per audit record ------------------------------------------------------------


def test_every_audit_record_is_one_json_log_line(process_server: Server) -> None:
    server = process_server
    with server.client() as client:
        report(client, "l1", "idle", details={"note": "café"})
        report(client, "l1", "active")
        report(client, "l1", "registered")  # refused: logged too
        report(client, "l1", "active")  # heartbeat: no record, no line
        trigger(client, "l1", "finish_task")
        records = client.get(f"{V1}/audit").json()["items"]
    server.stop()
    assert server.log_path is not None
    lines = []
    for raw in server.log_path.read_text(encoding="utf-8").splitlines():
        try:
            lines.append(json.loads(raw))
        except ValueError:
            continue  # the banner `serve` prints before logging starts
    transitions = [line for line in lines if line.get("message") == "transition"]
    assert len(transitions) == len(records) == 4
    for record, line in zip(records, transitions, strict=True):
        assert {k: line[k] for k in record} == record
    assert server.api_key not in server.log_path.read_text(encoding="utf-8")
