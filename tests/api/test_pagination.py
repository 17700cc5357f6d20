"""Paging through audit records and agents: limits, opaque cursors, filters, order, no gaps."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta, timezone

import httpx

from tests.api.helpers import all_pages, report, trigger
from tests.servers import Server

V1 = "/v1/opscore"
CYCLE = ["initializing", "idle", "active", "idle", "active", "error", "active"]  # the last one is refused


def populate(client: httpx.Client, agents: list[str], rounds: int) -> None:
    for _ in range(rounds):
        for agent in agents:
            for state in CYCLE:
                answer = report(client, agent, state)
                assert answer.status_code in (200, 409), answer.text
            assert trigger(client, agent, "restart").status_code == 200


def test_agent_audit_pages_have_no_duplicates_or_gaps(server: Server) -> None:
    with server.client() as client:
        populate(client, ["p1", "p2"], rounds=3)
        full = client.get(f"{V1}/agent/p1/audit", params={"limit": 1000}).json()
        assert full["nextCursor"] is None
        everything = full["items"]
        assert [r["seq"] for r in everything] == list(range(1, len(everything) + 1))
        assert {r["entityId"] for r in everything} == {"p1"}
        for limit in (1, 3, 7, len(everything), len(everything) + 1):
            items, pages = all_pages(client, f"{V1}/agent/p1/audit", limit=limit)
            assert items == everything, limit
            assert pages == max(1, -(-len(everything) // limit)), limit
        descending, _ = all_pages(client, f"{V1}/agent/p1/audit", limit=4, order="desc")
        assert descending == everything[::-1]
        applied, _ = all_pages(client, f"{V1}/agent/p1/audit", limit=2, outcome="applied")
        rejected, _ = all_pages(client, f"{V1}/agent/p1/audit", limit=2, outcome="rejected")
        assert {r["outcome"] for r in applied} == {"applied"} and {r["outcome"] for r in rejected} == {"rejected"}
        assert sorted(applied + rejected, key=lambda r: r["id"]) == everything
        assert len(rejected) == 3
        assert client.get(f"{V1}/agent/p1").json()["revision"] == len(applied)
        assert client.get(f"{V1}/agent/nobody/audit").status_code == 404


def test_cursors_are_opaque_and_bound_to_their_order(server: Server) -> None:
    with server.client() as client:
        populate(client, ["c1"], rounds=1)
        page = client.get(f"{V1}/agent/c1/audit", params={"limit": 2}).json()
        cursor = page["nextCursor"]
        assert isinstance(cursor, str) and cursor and "id" not in cursor
        wrong = client.get(f"{V1}/agent/c1/audit", params={"limit": 2, "cursor": cursor, "order": "desc"})
        assert wrong.status_code == 422 and wrong.json()["code"] == "invalid_cursor"


def test_global_audit_pages_filters_and_time_window(server: Server) -> None:
    with server.client() as client:
        populate(client, ["g1", "g2", "g3"], rounds=1)
        time.sleep(0.05)
        middle = datetime.now(UTC)
        time.sleep(0.05)
        populate(client, ["g1"], rounds=1)
        everything, _ = all_pages(client, f"{V1}/audit", limit=1000)
        ids = [r["id"] for r in everything]
        assert ids == sorted(ids) and len(set(ids)) == len(ids)
        for limit in (1, 5, 13):
            assert all_pages(client, f"{V1}/audit", limit=limit)[0] == everything
        assert all_pages(client, f"{V1}/audit", limit=6, order="desc")[0] == everything[::-1]
        agents_only, _ = all_pages(client, f"{V1}/audit", limit=5, entityType="agent")
        assert agents_only == everything
        assert all_pages(client, f"{V1}/audit", entityType="workflow")[0] == []

        since = [r for r in everything if r["recordedAt"] >= middle.isoformat()]
        until = [r for r in everything if r["recordedAt"] <= middle.isoformat()]
        assert since and until and len(since) + len(until) == len(everything)
        assert all_pages(client, f"{V1}/audit", limit=3, since=middle.isoformat())[0] == since
        assert all_pages(client, f"{V1}/audit", limit=3, until=middle.isoformat())[0] == until
        assert {r["entityId"] for r in since} == {"g1"}
        # another zone, the same moment
        local = middle.astimezone(timezone(timedelta(hours=5))).isoformat()
        assert all_pages(client, f"{V1}/audit", since=local)[0] == since
        window = all_pages(
            client,
            f"{V1}/agent/g1/audit",
            since=(middle - timedelta(days=1)).isoformat(),
            until=middle.isoformat(),
            outcome="applied",
        )[0]
        assert window == [r for r in until if r["entityId"] == "g1" and r["outcome"] == "applied"]


def test_agents_list_filters_and_pages(server: Server) -> None:
    with server.client() as client:
        for i in range(7):
            capabilities = ["summarise"] if i % 2 == 0 else ["translate", "summarise"] if i % 3 == 0 else ["translate"]
            answer = client.post(f"{V1}/agents", json={"agentId": f"ag-{i}", "capabilities": capabilities})
            assert answer.status_code == 201
        for i in (1, 2, 3):
            assert report(client, f"ag-{i}", "idle").status_code == 200
        assert report(client, "ag-3", "active").status_code == 200
        everyone, pages = all_pages(client, f"{V1}/agents", limit=2)
        assert [a["agentId"] for a in everyone] == [f"ag-{i}" for i in range(7)] and pages == 4
        assert all_pages(client, f"{V1}/agents", limit=1000)[0] == everyone
        idle, _ = all_pages(client, f"{V1}/agents", limit=1, state="idle")
        assert [a["agentId"] for a in idle] == ["ag-1", "ag-2"]
        translate, _ = all_pages(client, f"{V1}/agents", limit=2, capability="translate")
        assert [a["agentId"] for a in translate] == ["ag-1", "ag-3", "ag-5"]
        both, _ = all_pages(client, f"{V1}/agents", capability="summarise", state="registered")
        assert [a["agentId"] for a in both] == ["ag-0", "ag-4", "ag-6"]
        assert all_pages(client, f"{V1}/agents", state="deregistered")[0] == []
