"""Keys and scopes from the outside (DESIGN §9): every route against every kind of key.

The expected scope of each route is written here independently of the code (DESIGN §9's
words), and the test walks the app's own route list: a new route without a declared
permission, or with another one than this table expects, fails.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.routing import APIRoute, iter_route_contexts

from opscore.api.openapi import permission
from opscore.keys import Scope
from tests.inproc import InProcess
from tests.sse import stream_status

V1 = "/v1/opscore"
SECRETS = {
    "reader": "reader-secret-0123456789",
    "operator": "operator-secret-0123456789",
    "summariser": "summariser-secret-0123456789",
    "summariser-reader": "summariser-reader-0123456789",
    "anyreporter": "anyreporter-secret-0123456789",
}
ADMIN = "admin:admin-secret-0123456789"
ENTRIES = [
    {"name": "reader", "scopes": ["read"]},
    {"name": "operator", "scopes": ["operate"]},
    {"name": "summariser", "scopes": ["report"], "agents": ["summariser-*"]},
    {"name": "summariser-reader", "scopes": ["report", "read"], "agents": ["summariser-*"]},
    {"name": "anyreporter", "scopes": ["report"]},
]

# DESIGN §9, route by route: what each needs. ("read", True) = read, or report for this agent.
EXPECTED: dict[tuple[str, str], tuple[str, bool]] = {
    ("POST", f"{V1}/agents"): ("report", False),
    ("GET", f"{V1}/agents"): ("read", False),
    ("GET", f"{V1}/agent/{{agent_id}}"): ("read", True),
    ("POST", f"{V1}/agent/{{agent_id}}/state"): ("report", True),
    ("GET", f"{V1}/agent/{{agent_id}}/state"): ("read", True),
    ("POST", f"{V1}/agent/{{agent_id}}/transitions"): ("operate", False),
    ("POST", f"{V1}/state-reports"): ("report", False),
    ("GET", f"{V1}/agent/{{agent_id}}/audit"): ("read", True),
    ("GET", f"{V1}/audit"): ("read", False),
    ("GET", f"{V1}/audit/verify"): ("read", False),
    ("GET", f"{V1}/machines"): ("read", False),
    ("GET", f"{V1}/machines/{{name}}"): ("read", False),
    ("GET", f"{V1}/machines/{{name}}/diagram"): ("read", False),
    ("GET", f"{V1}/agent/{{agent_id}}/diagram"): ("read", True),
    ("GET", f"{V1}/workflows/{{session_id}}/diagram"): ("read", False),
    ("GET", f"{V1}/workflows/{{session_id}}/tasks/{{task_id}}/diagram"): ("read", False),
    ("POST", f"{V1}/workflow-definitions"): ("operate", False),
    ("GET", f"{V1}/workflow-definitions"): ("read", False),
    ("GET", f"{V1}/workflow-definitions/{{definition_id}}"): ("read", False),
    ("POST", f"{V1}/agent/{{agent_id}}/workflow"): ("operate", False),
    ("GET", f"{V1}/workflows"): ("read", False),
    ("GET", f"{V1}/workflows/{{session_id}}"): ("read", False),
    ("POST", f"{V1}/workflows/{{session_id}}/transitions"): ("operate", False),
    ("GET", f"{V1}/workflows/{{session_id}}/audit"): ("read", False),
    ("GET", f"{V1}/audit/stream"): ("read", False),
    ("GET", f"{V1}/audit/checkpoints"): ("read", False),
    ("GET", f"{V1}/audit/heads"): ("read", False),
}
OPEN = {("POST", f"{V1}/internal/agent/notify")}  # HMAC-signed by AgentKit, no key


def keys_file(tmp_path: Path) -> str:
    entries = [{**e, "sha256": hashlib.sha256(SECRETS[str(e["name"])].encode()).hexdigest()} for e in ENTRIES]
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(entries), encoding="utf-8")
    return str(path)


@pytest.fixture
def server(store_url: str, tmp_path: Path) -> Iterator[InProcess]:
    app = InProcess(store_url, api_key=ADMIN, keys_file=keys_file(tmp_path)).start()
    yield app
    app.stop()


def as_key(server: InProcess, name: str) -> httpx.Client:
    secret = ADMIN.split(":", 1)[1] if name == "admin" else SECRETS[name]
    return server.anonymous(headers={"Authorization": f"Bearer {secret}"})


def stamp(seconds: int = 0) -> str:
    return (datetime.now(UTC) - timedelta(minutes=5) + timedelta(seconds=seconds)).isoformat()


def v1_routes(server: InProcess) -> list[APIRoute]:
    """Every keyed route the app serves, walked as FastAPI's own OpenAPI code walks them."""
    return [
        ctx.route
        for ctx in iter_route_contexts(server.app.routes)
        if isinstance(ctx.route, APIRoute)
        and ctx.path.startswith(V1)
        and not any((m, ctx.path) in OPEN for m in ctx.methods)
    ]


def test_every_route_declares_the_scope_design_9_gives_it(server: InProcess) -> None:
    seen = set()
    for route in v1_routes(server):
        for method in route.methods:
            declared = permission(route)
            assert declared is not None, f"{method} {route.path} declares no permission"
            expected = EXPECTED.get((method, route.path))
            assert expected is not None, f"{method} {route.path}: add it to EXPECTED with its DESIGN §9 scope"
            assert (declared.scope.value, declared.agent is not None) == expected, (method, route.path, declared)
            seen.add((method, route.path))
    pending = {f"{V1}/audit/checkpoints"}  # routes landing in other changes
    missing = {k for k in EXPECTED if k not in seen and k[1] not in pending}
    assert not missing, f"routes expected but not served: {missing}"


def fill(path: str, agent: str) -> str:
    return (
        path.replace("{agent_id}", agent)
        .replace("{name}", "agent")
        .replace("{session_id}", "no-such-run")
        .replace("{task_id}", "t1")
        .replace("{definition_id}", "no-such-definition")
    )


def body_for(method: str, path: str, agent: str) -> Any:
    if method != "POST":
        return None
    if path.endswith("/state"):
        return {"timestamp": stamp(), "state": "idle"}
    if path.endswith("/state-reports"):
        return {"reports": [{"agentId": agent, "timestamp": stamp(), "state": "idle"}]}
    if path.endswith("/agents"):
        return {"agentId": agent, "capabilities": ["x"]}
    if path.endswith("/transitions"):
        return {"trigger": "pause" if "/workflows/" in path else "fail"}
    if path.endswith("/workflow"):
        return {"workflowDefinitionId": "no-such-definition"}
    if path.endswith("/workflow-definitions"):
        return {"id": "d", "version": "1", "tasks": [{"taskId": "t", "agentCapability": "x"}]}
    raise AssertionError(path)


def allowed(key: str, scope: str, per_agent: bool, agent: str) -> bool:
    """The expected decision, from DESIGN §9 alone."""
    entry = {"admin": {"scopes": ["admin"]}}.get(key) or next(e for e in ENTRIES if e["name"] == key)
    scopes = set(entry["scopes"])
    if "admin" in scopes:
        return True
    if "operate" in scopes:
        scopes.add("read")
    globs = entry.get("agents")
    reports_for_agent = "report" in scopes and (globs is None or agent.startswith("summariser-"))
    if scope == "report":
        return reports_for_agent
    if scope == "read":
        return "read" in scopes or (per_agent and reports_for_agent)
    return scope in scopes


def counts(server: InProcess) -> tuple[int, int]:
    """(audit records, agents): what a refused request must leave as it was."""
    with as_key(server, "admin") as client:
        records = client.get(f"{V1}/audit", params={"limit": 1000}).json()["items"]
        agents = client.get(f"{V1}/agents", params={"limit": 1000}).json()["items"]
    return len(records), len(agents)


@pytest.mark.parametrize("key", ["admin", "reader", "operator", "summariser", "summariser-reader", "anyreporter"])
def test_each_key_against_each_route(server: InProcess, key: str, caplog: pytest.LogCaptureFixture) -> None:
    with as_key(server, "admin") as admin:  # both agents exist, so a refusal would be the only change
        for agent in ("summariser-1", "reviewer-1"):
            assert (
                admin.post(f"{V1}/agent/{agent}/state", json={"timestamp": stamp(), "state": "idle"}).status_code == 200
            )
    mistakes = []
    for route in v1_routes(server):
        for method in route.methods:
            scope, per_agent = EXPECTED[(method, route.path)]
            for agent in ("summariser-1", "reviewer-1"):
                before = counts(server)
                path = fill(route.path, agent)
                if route.path == f"{V1}/audit/stream" and allowed(key, scope, per_agent, agent):
                    # a stream that is let in never ends: open it, see it answer 200, close it
                    secret = ADMIN.split(":", 1)[1] if key == "admin" else SECRETS[key]
                    status = server.run(stream_status(server.app, {"Authorization": f"Bearer {secret}"}))
                    if status != 200:
                        mistakes.append(f"{key} {method} {path}: {status}, should be allowed")
                    continue
                with as_key(server, key) as client, caplog.at_level(logging.WARNING, logger="opscore.api"):
                    caplog.clear()
                    answer = client.request(method, path, json=body_for(method, route.path, agent))
                is_json = answer.headers.get("content-type", "").startswith("application/json")
                payload = answer.json() if is_json else {}
                results = payload.get("results") if route.path.endswith("/state-reports") else None
                status = results[0]["status"] if results and answer.status_code == 200 else answer.status_code
                body = results[0]["body"] if results and answer.status_code == 200 else payload
                expect = allowed(key, scope, per_agent, agent)
                if expect and status == 403:
                    mistakes.append(f"{key} {method} {path}: refused, should be allowed")
                elif not expect:
                    if status != 403 or body.get("code") != "forbidden" or not body.get("detail"):
                        mistakes.append(f"{key} {method} {path}: {status} {body}, should be 403 forbidden")
                        continue
                    if counts(server) != before:
                        mistakes.append(f"{key} {method} {path}: refused but something changed")
                    lines = [r for r in caplog.records if r.getMessage() == "forbidden"]
                    if not lines or getattr(lines[0], "keyName", None) != key:
                        mistakes.append(f"{key} {method} {path}: no 'forbidden' log line naming the key")
                    text = json.dumps(body)
                    if any(secret in text for secret in SECRETS.values()) or "sha256" in text:
                        mistakes.append(f"{key} {method} {path}: the 403 shows a secret or a hash")
    assert not mistakes, "\n".join(mistakes)


def test_a_summariser_key_stays_in_its_lane(server: InProcess) -> None:
    with as_key(server, "admin") as admin:
        admin.post(f"{V1}/agent/reviewer-1/state", json={"timestamp": stamp(), "state": "idle"})
        admin.post(
            f"{V1}/workflow-definitions",
            json={"id": "d", "version": "1", "tasks": [{"taskId": "t", "agentCapability": "x"}]},
        )
        run = admin.post(f"{V1}/agent/reviewer-1/workflow", json={"workflowDefinitionId": "d"}).json()["sessionId"]
    with as_key(server, "summariser") as client:
        assert (
            client.post(f"{V1}/agent/summariser-1/state", json={"timestamp": stamp(), "state": "idle"}).status_code
            == 200
        )
        refused = client.post(f"{V1}/agent/reviewer-1/state", json={"timestamp": stamp(1), "state": "active"})
        assert refused.status_code == 403 and refused.json()["code"] == "forbidden"
        assert "reviewer-1" in refused.json()["detail"]
        assert client.post(f"{V1}/agent/summariser-1/workflow", json={"workflowDefinitionId": "d"}).status_code == 403
        assert client.post(f"{V1}/workflows/{run}/transitions", json={"trigger": "cancel"}).status_code == 403
        assert client.get(f"{V1}/agent/reviewer-1/audit").status_code == 403
        own = client.get(f"{V1}/agent/summariser-1/audit")
        assert own.status_code == 200 and len(own.json()["items"]) == 1
        assert client.post(f"{V1}/agents", json={"agentId": "reviewer-2"}).status_code == 403
        assert client.post(f"{V1}/agents", json={"agentId": "summariser-2"}).status_code == 201
    with as_key(server, "summariser-reader") as client:
        assert client.get(f"{V1}/agent/reviewer-1/audit").status_code == 200
    with as_key(server, "admin") as admin:
        reviewer = admin.get(f"{V1}/agent/reviewer-1").json()
        assert (reviewer["state"], reviewer["revision"]) == ("idle", 1)  # the refused report changed nothing
        assert admin.get(f"{V1}/workflows/{run}").json()["state"] != "cancelled"
        assert admin.get(f"{V1}/agent/reviewer-2").status_code == 404


def test_batch_items_outside_the_globs_answer_403_one_by_one(server: InProcess) -> None:
    reports = [
        {"agentId": "summariser-1", "timestamp": stamp(), "state": "idle"},
        {"agentId": "reviewer-1", "timestamp": stamp(), "state": "idle"},
        {"agentId": "summariser-2", "timestamp": stamp(), "state": "idle"},
    ]
    with as_key(server, "summariser") as client:
        answer = client.post(f"{V1}/state-reports", json={"reports": reports})
    assert answer.status_code == 200
    statuses = [(r["status"], r["body"].get("code")) for r in answer.json()["results"]]
    assert statuses == [(200, None), (403, "forbidden"), (200, None)]
    with as_key(server, "admin") as admin:
        assert admin.get(f"{V1}/agent/reviewer-1").status_code == 404


def test_no_secret_hash_or_authorization_header_reaches_a_log_line_or_a_record(
    server: InProcess, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG):
        for name in SECRETS:
            with as_key(server, name) as client:
                client.post(f"{V1}/agent/summariser-9/state", json={"timestamp": stamp(), "state": "idle"})
                client.post(f"{V1}/agent/reviewer-9/state", json={"timestamp": stamp(), "state": "idle"})
                client.get(f"{V1}/audit")
        with server.anonymous(headers={"Authorization": "Bearer not-a-key-0123456789"}) as stranger:
            assert stranger.get(f"{V1}/agents").status_code == 401
    text = "\n".join(r.getMessage() + json.dumps(r.__dict__, default=str) for r in caplog.records)
    with as_key(server, "admin") as admin:
        text += admin.get(f"{V1}/audit", params={"limit": 1000}).text
    for secret in [*SECRETS.values(), ADMIN.split(":", 1)[1], "not-a-key-0123456789"]:
        assert secret not in text
        assert hashlib.sha256(secret.encode()).hexdigest() not in text
    assert "Bearer" not in text
    assert '"actor":"key:summariser"' in text  # the records name keys, by name only


def test_a_bad_keys_file_refuses_to_start_with_the_entry_named(tmp_path: Path) -> None:
    from opscore.keys import InvalidKeysFile

    bad = tmp_path / "keys.yaml"
    bad.write_text("- name: ok\n  sha256: '" + "0" * 64 + "'\n  scopes: [fly]\n", encoding="utf-8")
    with pytest.raises(InvalidKeysFile, match="key 'ok': unknown scope"):
        InProcess("memory://", keys_file=str(bad)).start()
    bad.write_text("- name: ok\n  sha256: " + "1" * 64 + "\n  scopes: [read]\n", encoding="utf-8")
    with pytest.raises(InvalidKeysFile, match="must be quoted"):
        InProcess("memory://", keys_file=str(bad)).start()


def test_scope_implications() -> None:
    from opscore.keys import IMPLIED

    assert IMPLIED[Scope.OPERATE] == {Scope.OPERATE, Scope.READ}
    assert IMPLIED[Scope.ADMIN] == set(Scope)
