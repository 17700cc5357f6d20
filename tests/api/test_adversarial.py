"""What a hostile or careless client sends, route by route, on SQLite and PostgreSQL.

Every case here was once a 500, a victim's failed write, a record that no longer hashed to
its ``hash``, or a permanent lock-out (issue 9). Each must now get a clear 4xx with a ``code``
naming the problem, change nothing it should not, and leave every stored record readable.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from opscore import audit
from opscore.engine import Context
from opscore.models import Entity
from tests.api.helpers import sign
from tests.inproc import WEBHOOK_SECRET, serve

V1 = "/v1/opscore"
NOW = datetime.now(UTC)


def stamp(seconds: float = 0.0) -> str:
    return (NOW - timedelta(minutes=10) + timedelta(seconds=seconds)).isoformat()


def run(database_url: str, scenario: Callable[[Any, httpx.AsyncClient], Awaitable[None]]) -> None:
    async def main() -> None:
        async with serve(database_url) as (app, client):
            await scenario(app, client)

    asyncio.run(main())


def nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(depth):
        value = {"a": value}
    return value


# Raw JSON texts (what the wire carries): each is refused with the code beside it.
POISONS = [
    pytest.param('{"x": NaN}', "non_finite_number", id="nan"),
    pytest.param('{"x": Infinity}', "non_finite_number", id="infinity"),
    pytest.param('{"x": -Infinity}', "non_finite_number", id="minus-infinity"),
    pytest.param('{"x": 1e400}', "non_finite_number", id="1e400"),
    pytest.param('{"x": "\\udfff"}', "lone_surrogate", id="lone-surrogate"),
    pytest.param('{"\\ud800": 1}', "lone_surrogate", id="lone-surrogate-key"),
    pytest.param('{"x": "a\\u0000b"}', "nul_character", id="nul"),
    pytest.param(json.dumps(nested(300)), "too_deep", id="300-deep"),
]


def assert_refused(answer: httpx.Response, status: int, code: str) -> None:
    assert answer.status_code == status, answer.text
    body = answer.json()
    assert body["code"] == code, body
    assert isinstance(body["detail"], str) and body["detail"]


async def all_records(client: httpx.AsyncClient, path: str = f"{V1}/audit") -> list[dict[str, Any]]:
    """Every record a listing serves; each must hash to its own ``hash``."""
    items: list[dict[str, Any]] = []
    cursor = None
    while True:
        answer = await client.get(path, params={"limit": 1000, **({"cursor": cursor} if cursor else {})})
        assert answer.status_code == 200, answer.text
        page = json.loads(answer.text)  # Python's parser: what the hash was computed over
        for record in page["items"]:
            assert audit.digest(record) == record["hash"], record
        items.extend(page["items"])
        cursor = page["nextCursor"]
        if cursor is None:
            return items


async def verified(client: httpx.AsyncClient) -> None:
    answer = await client.get(f"{V1}/audit/verify")
    assert answer.status_code == 200, answer.text
    assert answer.json()["ok"], answer.json()["problems"][:5]


DEFINITION = {
    "id": "adv",
    "name": "adversarial",
    "version": "1",
    "tasks": [{"taskId": "t1", "name": "one", "agentCapability": "x", "parameters": {}, "nextTaskId": None}],
}


async def storing_routes(client: httpx.AsyncClient, poison: str) -> dict[str, httpx.Response]:
    """The poison, spliced into the client data of every route that stores some."""
    await client.post(f"{V1}/agent/host/state", json={"timestamp": stamp(), "state": "idle"})
    await client.post(f"{V1}/workflow-definitions", json=DEFINITION)
    started = await client.post(f"{V1}/agent/host/workflow", json={"workflowDefinitionId": "adv"})
    assert started.status_code == 202, started.text
    session = started.json()["sessionId"]
    hook_body = (
        '{"event_type": "REGISTER", "agent_details": {"agentId": "hooked", "metadata": ' + poison + "}}"
    ).encode()
    hook_time = str(int(time.time()))
    headers = {"content-type": "application/json"}
    definition = json.dumps({**DEFINITION, "id": "adv2"})[:-1] + ', "extra": ' + poison + "}"
    return {
        "state report": await client.post(
            f"{V1}/agent/a1/state",
            content=f'{{"timestamp": "{stamp()}", "state": "idle", "details": {poison}}}',
            headers=headers,
        ),
        "registration": await client.post(
            f"{V1}/agents", content=f'{{"agentId": "r1", "metadata": {poison}}}', headers=headers
        ),
        "operator trigger": await client.post(
            f"{V1}/agent/host/transitions", content=f'{{"trigger": "fail", "details": {poison}}}', headers=headers
        ),
        "run trigger": await client.post(
            f"{V1}/workflows/{session}/transitions",
            content=f'{{"trigger": "pause", "details": {poison}}}',
            headers=headers,
        ),
        "initialPayload": await client.post(
            f"{V1}/agent/host/workflow",
            content=f'{{"workflowDefinitionId": "adv", "initialPayload": {poison}}}',
            headers=headers,
        ),
        "definition": await client.post(f"{V1}/workflow-definitions", content=definition, headers=headers),
        "webhook": await client.post(
            f"{V1}/internal/agent/notify",
            content=hook_body,
            headers={
                **headers,
                "X-AgentKit-Timestamp": hook_time,
                "X-AgentKit-Signature": sign(WEBHOOK_SECRET, hook_time, hook_body),
            },
        ),
    }


@pytest.mark.parametrize(("poison", "code"), POISONS)
def test_every_storing_route_refuses_what_json_cannot_carry(database_url: str, poison: str, code: str) -> None:
    async def scenario(app: Any, client: httpx.AsyncClient) -> None:
        answers = await storing_routes(client, poison)
        for route, answer in answers.items():
            assert answer.status_code == 422, (route, answer.status_code, answer.text)
            assert answer.json()["code"] == code, (route, answer.json())
        batch = await client.post(
            f"{V1}/state-reports",
            content=(
                '{"reports": [{"agentId": "b1", "timestamp": "' + stamp() + '", "state": "idle"}, '
                '{"agentId": "b2", "timestamp": "' + stamp() + '", "state": "idle", "details": ' + poison + "}]}"
            ),
            headers={"content-type": "application/json"},
        )
        assert batch.status_code == 200, batch.text
        first, second = batch.json()["results"]
        assert first["status"] == 200 and second["status"] == 422 and second["body"]["code"] == code
        for agent in ("a1", "r1", "hooked", "b2"):
            assert (await client.get(f"{V1}/agent/{agent}")).status_code == 404, agent
        await all_records(client)
        await verified(client)

    run(database_url, scenario)


BAD_IDS = [
    pytest.param("n%00", id="nul"),
    pytest.param("a%0D%0Ab", id="cr-lf"),
    pytest.param("tab%09", id="tab"),
    pytest.param("del%7F", id="del"),
    pytest.param("c1%C2%85", id="c1-next-line"),
    pytest.param("%FF", id="not-utf8-ff"),
    pytest.param("%FE", id="not-utf8-fe"),
    pytest.param("x" * 257, id="too-long"),
]


@pytest.mark.parametrize("agent_id", BAD_IDS)
def test_ids_in_the_path_follow_the_rule_of_ids_in_bodies(database_url: str, agent_id: str) -> None:
    async def scenario(app: Any, client: httpx.AsyncClient) -> None:
        paths = [
            ("POST", f"{V1}/agent/{agent_id}/state", {"timestamp": stamp(), "state": "idle"}),
            ("POST", f"{V1}/agent/{agent_id}/transitions", {"trigger": "ready"}),
            ("GET", f"{V1}/agent/{agent_id}", None),
            ("GET", f"{V1}/agent/{agent_id}/audit", None),
            ("GET", f"{V1}/agent/{agent_id}/state", None),
            ("POST", f"{V1}/agent/{agent_id}/workflow", {"workflowDefinitionId": "x"}),
        ]
        for method, path, body in paths:
            answer = await client.request(method, path, json=body)
            assert_refused(answer, 422, "invalid_id")
        listed = await client.get(f"{V1}/agents")
        assert listed.json()["items"] == []

    run(database_url, scenario)


def test_an_agent_list_walks_every_page_of_odd_but_valid_ids(database_url: str) -> None:
    odd = ["a b", "ä", "日本", "x.y", "-", "~", "💥", "Z", "q?", "#h"]

    async def scenario(app: Any, client: httpx.AsyncClient) -> None:
        for n, agent in enumerate(odd):
            path = f"{V1}/agent/{quote(agent, safe='')}/state"
            answer = await client.post(path, json={"timestamp": stamp(n), "state": "idle"})
            assert answer.status_code == 200, (agent, answer.text)
            assert answer.json()["agentId"] == agent
        seen: list[str] = []
        cursor = None
        while True:
            page = await client.get(f"{V1}/agents", params={"limit": 1, **({"cursor": cursor} if cursor else {})})
            assert page.status_code == 200, page.text
            seen.extend(item["agentId"] for item in page.json()["items"])
            cursor = page.json()["nextCursor"]
            if cursor is None:
                break
        assert sorted(seen) == sorted(odd)

    run(database_url, scenario)


def test_a_future_timestamp_is_refused_recorded_and_locks_nobody_out(database_url: str) -> None:
    async def scenario(app: Any, client: httpx.AsyncClient) -> None:
        path = f"{V1}/agent/clock/state"
        assert (await client.post(path, json={"timestamp": stamp(), "state": "idle"})).status_code == 200
        future = await client.post(path, json={"timestamp": "2099-01-01T00:00:00+00:00", "state": "active"})
        assert_refused(future, 422, "timestamp_in_future")
        assert future.json()["auditId"] is not None
        real = await client.post(path, json={"timestamp": stamp(1), "state": "active"})
        assert real.status_code == 200 and real.json()["state"] == "active", real.text
        heartbeat = await client.post(path, json={"timestamp": stamp(2), "state": "active"})
        assert heartbeat.status_code == 200 and heartbeat.json()["changed"] is False
        records = await all_records(client, f"{V1}/agent/clock/audit")
        refused = [r for r in records if r["outcome"] == "rejected"]
        assert [r["reason"] for r in refused] == ["timestamp_in_future"]
        agent = (await client.get(f"{V1}/agent/clock")).json()
        assert agent["lastReportAt"] < "2099"
        batch = await client.post(
            f"{V1}/state-reports",
            json={"reports": [{"agentId": "clock", "timestamp": "2099-01-01T00:00:00Z", "state": "idle"}]},
        )
        assert batch.json()["results"][0]["status"] == 422
        assert batch.json()["results"][0]["body"]["code"] == "timestamp_in_future"

    run(database_url, scenario)


def test_a_stored_future_report_time_no_longer_makes_real_reports_stale(database_url: str) -> None:
    """A database written before the rule may already hold a newest report from 2099."""

    async def scenario(app: Any, client: httpx.AsyncClient) -> None:
        engine = app.state.engine
        engine.max_clock_skew = 10.0**10  # the old behaviour, to write the poison
        seed = Entity("agent", "locked", "registered")
        ctx = Context(actor="key:old")
        await engine.report("agent", "locked", "idle", ctx=ctx, reported_at="2099-01-01T00:00:00+00:00", create=seed)
        engine.max_clock_skew = 300.0
        real = await client.post(f"{V1}/agent/locked/state", json={"timestamp": stamp(), "state": "active"})
        assert real.status_code == 200, real.text

    run(database_url, scenario)


YAML_ATTACKS = [
    pytest.param(
        b'a: &a ["x","x","x","x","x","x","x","x","x"]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\n'
        b"c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\nd: [*c,*c,*c,*c,*c,*c,*c,*c,*c]\n",
        id="nested-aliases",
    ),
    pytest.param(b"id: x\nversion: 2024-01-01\ntasks: []\n", id="date"),
    pytest.param(b"id: x\nversion: !!binary aGVsbG8=\ntasks: []\n", id="binary"),
    pytest.param(b"id: x\nversion: '1'\ntasks: !!set {a, b}\n", id="set"),
    pytest.param(b"id: x\nversion: '1'\n1: one\ntasks: []\n", id="int-key"),
    pytest.param(b"id: x\nversion: '1'\nname: .nan\ntasks: []\n", id="nan"),
    pytest.param(b"id: x\nversion: '1'\nname: " + b"y" * 300_000 + b"\ntasks: []\n", id="too-big"),
    pytest.param(b"id: !!python/object/apply:os.system ['true']\n", id="python-tag"),
]


@pytest.mark.parametrize("text", YAML_ATTACKS)
def test_yaml_definitions_say_no_more_than_json(database_url: str, text: bytes) -> None:
    async def scenario(app: Any, client: httpx.AsyncClient) -> None:
        started = time.monotonic()
        answer = await client.post(
            f"{V1}/workflow-definitions", content=text, headers={"content-type": "application/yaml"}
        )
        assert answer.status_code == 422, answer.text
        assert answer.json()["code"] in ("invalid_definition", "non_finite_number"), answer.json()
        assert time.monotonic() - started < 5
        listed = await client.get(f"{V1}/workflow-definitions")
        assert listed.status_code == 200 and listed.json()["items"] == []

    run(database_url, scenario)


def test_registration_cannot_write_the_workflow_claim_and_changes_are_audited(database_url: str) -> None:
    async def scenario(app: Any, client: httpx.AsyncClient) -> None:
        body = {"agentId": "claimed", "capabilities": ["x"], "opscoreClaim": "forged", "opscoreTask": "t"}
        assert (await client.post(f"{V1}/agents", json=body)).status_code == 201
        entity = await app.state.engine.store.get("agent", "claimed")
        assert "opscoreClaim" not in entity.data and "opscoreTask" not in entity.data
        changed = await client.post(
            f"{V1}/agents", json={"agentId": "claimed", "capabilities": ["x", "y"], "contactEndpoint": "http://e"}
        )
        assert changed.status_code == 200 and changed.json()["state"] == "registered"
        (record,) = await all_records(client, f"{V1}/agent/claimed/audit")
        assert record["event"] == "update_metadata" and record["source"] == record["dest"] == "registered"
        assert record["details"]["changed"]["capabilities"] == {"old": ["x"], "new": ["x", "y"]}
        assert record["details"]["changed"]["contactEndpoint"] == {"old": None, "new": "http://e"}

    run(database_url, scenario)


def test_a_poisoned_change_fails_alone_in_the_shared_commit(database_url: str) -> None:
    """Bypassing the boundary on purpose: the store itself must isolate what it cannot store."""

    async def scenario(app: Any, client: httpx.AsyncClient) -> None:
        engine = app.state.engine
        ctx = Context(actor="key:test")
        for n in range(20):
            await client.post(f"{V1}/agent/victim-{n}/state", json={"timestamp": stamp(), "state": "idle"})

        async def victim(n: int, round_: int) -> int:
            state = "active" if round_ % 2 == 0 else "idle"
            answer = await client.post(
                f"{V1}/agent/victim-{n}/state", json={"timestamp": stamp(1 + round_), "state": state}
            )
            return answer.status_code

        async def poison(n: int) -> str:
            try:
                await engine.upsert("agent", f"poison-{n}", {"metadata": {"x": "\udfff"}}, ctx=ctx)
            except Exception as exc:
                return type(exc).__name__
            return "stored"

        for round_ in range(6):
            results = await asyncio.gather(
                *(victim(n, round_) for n in range(20)), *(poison(round_ * 10 + k) for k in range(5))
            )
            assert results[:20] == [200] * 20, results
            assert all(r != "stored" for r in results[20:]), results
        await all_records(client)
        await verified(client)

    run(database_url, scenario)


def test_legacy_records_no_serialiser_can_handle_still_list_export_and_verify(database_url: str) -> None:
    """Written as an older Ops-Core let them in: 300-deep details, and a NaN."""

    async def scenario(app: Any, client: httpx.AsyncClient) -> None:
        engine = app.state.engine
        ctx = Context(actor="key:old")
        seed = Entity("agent", "legacy", "registered")
        await engine.report("agent", "legacy", "idle", ctx=ctx, reported_at=stamp(), details=nested(300), create=seed)
        await engine.report("agent", "legacy", "active", ctx=ctx, reported_at=stamp(1), details={"score": float("nan")})
        for order in ("asc", "desc"):
            page = await client.get(f"{V1}/audit", params={"order": order})
            assert page.status_code == 200, page.text
        records = await all_records(client)
        assert len(records) == 2
        assert len(await all_records(client, f"{V1}/agent/legacy/audit")) == 2
        await verified(client)
        now = datetime.now(UTC).isoformat()
        assert (await client.get(f"{V1}/agent/legacy/state", params={"at": now})).status_code == 200
        await engine.upsert("agent", "legacy-meta", {"metadata": {"deep": nested(300), "nan": float("nan")}}, ctx=ctx)
        for path in (f"{V1}/agents", f"{V1}/agent/legacy-meta", f"{V1}/agent/legacy/state", f"{V1}/agent/legacy"):
            answer = await client.get(path)
            assert answer.status_code == 200, (path, answer.text)
            assert not any(token in answer.text for token in ("NaN", "Infinity")), (path, answer.text[:200])
            json.loads(answer.text)

    run(database_url, scenario)


def test_concurrent_verifications_share_one_run(database_url: str) -> None:
    async def scenario(app: Any, client: httpx.AsyncClient) -> None:
        for n in range(50):
            await client.post(f"{V1}/agent/v-{n}/state", json={"timestamp": stamp(), "state": "idle"})
        store = app.state.engine.store
        calls = 0
        real = store.verify

        async def counting(verifier: Any = None) -> Any:
            nonlocal calls
            calls += 1
            await asyncio.sleep(0.2)
            return await real(verifier)

        store.verify = counting
        answers = await asyncio.gather(*(client.get(f"{V1}/audit/verify") for _ in range(8)))
        assert {a.status_code for a in answers} == {200}
        assert all(a.json()["ok"] for a in answers)
        assert calls == 1

    run(database_url, scenario)


def test_an_idempotency_key_reused_with_another_if_match_is_another_request(database_url: str) -> None:
    async def scenario(app: Any, client: httpx.AsyncClient) -> None:
        await client.post(f"{V1}/agent/idem/state", json={"timestamp": stamp(), "state": "idle"})
        first = await client.post(
            f"{V1}/agent/idem/transitions",
            json={"trigger": "fail"},
            headers={"Idempotency-Key": "k1", "If-Match": '"1"'},
        )
        assert first.status_code == 200, first.text
        other = await client.post(
            f"{V1}/agent/idem/transitions",
            json={"trigger": "fail"},
            headers={"Idempotency-Key": "k1", "If-Match": '"7"'},
        )
        assert_refused(other, 422, "idempotency_key_reused")

    run(database_url, scenario)
