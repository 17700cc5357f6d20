"""POST /v1/opscore/state-reports: one answer per report, the one it would get alone."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.servers import Server

T0 = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)


def at(seconds: int) -> str:
    return (T0 + timedelta(seconds=seconds)).isoformat()


def mixed(prefix: str) -> list[dict[str, Any]]:
    """Legal, illegal, unknown state, stale and malformed reports, two of one agent in order."""
    return [
        {"agentId": f"{prefix}1", "timestamp": at(1), "state": "idle", "details": {}},
        {"agentId": f"{prefix}2", "timestamp": at(1), "state": "active", "details": {}},  # registered -> active
        {"agentId": f"{prefix}1", "timestamp": at(2), "state": "active", "details": {"opscore_task_id": "t"}},
        {"agentId": f"{prefix}3", "timestamp": at(1), "state": "flying", "details": {}},
        {"agentId": f"{prefix}1", "timestamp": at(0), "state": "idle", "details": {}},  # older than at(2)
        {"agentId": f"{prefix}4", "timestamp": at(1), "state": "idle"},
        {"agentId": f"{prefix}1", "timestamp": at(3), "state": "active", "details": {}},  # heartbeat
        {"agentId": f"{prefix}5", "state": "idle"},  # no timestamp
    ]


def comparable(status: int, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """Status and body without what differs between agents ``a*`` and ``b*`` (ids, audit ids)."""
    body = {k: v for k, v in body.items() if k not in {"auditId", "agentId", "detail"}}
    return status, body


def test_each_report_gets_the_answer_it_would_get_alone(server: Server) -> None:
    with server.client() as client:
        answer = client.post("/v1/opscore/state-reports", json={"reports": mixed("a")})
        assert answer.status_code == 200, answer.text
        batched = answer.json()["results"]
        alone = []
        for report in mixed("b"):
            r = client.post(f"/v1/opscore/agent/{report['agentId']}/state", json=report)
            alone.append(comparable(r.status_code, r.json()))
        assert [comparable(r["status"], r["body"]) for r in batched] == alone
        statuses = [r["status"] for r in batched]
        codes = [r["body"].get("code") for r in batched]
        assert statuses == [200, 409, 200, 422, 409, 200, 200, 422]
        assert codes[1] == "illegal_transition" and codes[3] == "unknown_state" and codes[4] == "stale_report"
        assert all("detail" in r["body"] for r in batched if r["status"] >= 400)
        assert batched[2]["body"]["state"] == "active" and batched[6]["body"]["changed"] is False
        agent = client.get("/v1/opscore/agent/a1").json()
        assert agent["state"] == "active" and agent["revision"] == 2
        assert client.get("/v1/opscore/audit/verify").json()["ok"] is True


def test_more_than_1000_reports_are_refused_whole(server: Server) -> None:
    reports = [{"agentId": f"x{i}", "timestamp": at(1), "state": "idle"} for i in range(1001)]
    with server.client() as client:
        answer = client.post("/v1/opscore/state-reports", json={"reports": reports})
        assert answer.status_code == 422
        assert answer.json()["code"] == "validation_error"
        assert client.get("/v1/opscore/agents", params={"limit": 10}).json()["items"] == []
        ok = client.post("/v1/opscore/state-reports", json={"reports": reports[:1000]})
        assert ok.status_code == 200 and {r["status"] for r in ok.json()["results"]} == {200}


def test_batch_needs_the_key_and_refuses_per_transition_headers(server: Server) -> None:
    with server.client() as client:
        body = {"reports": [{"agentId": "k1", "timestamp": at(1), "state": "idle"}]}
        assert (
            client.post("/v1/opscore/state-reports", json=body, headers={"Authorization": "Bearer nope"}).status_code
            == 401
        )
        refused = client.post("/v1/opscore/state-reports", json=body, headers={"Idempotency-Key": "k"})
        assert refused.status_code == 422 and refused.json()["code"] == "unsupported_header"


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b"not json", id="not-json"),
        pytest.param(b"[]", id="not-an-object"),
        pytest.param(b"{}", id="no-reports"),
        pytest.param(b'{"reports": {"agentId": "a"}}', id="reports-not-a-list"),
    ],
)
def test_a_malformed_batch_is_one_422_in_the_one_error_shape(server: Server, content: bytes) -> None:
    with server.client() as client:
        answer = client.post("/v1/opscore/state-reports", content=content, headers={"Content-Type": "application/json"})
        assert answer.status_code == 422
        body = answer.json()
        assert body["code"] == "validation_error" and isinstance(body["detail"], str) and body["errors"]


def test_huge_integers_in_details_keep_their_exact_value(server: Server) -> None:
    big = 123456789012345678901234567890
    report = {"agentId": "big", "timestamp": at(1), "state": "idle", "details": {"n": big}}
    with server.client() as client:
        answer = client.post("/v1/opscore/state-reports", json={"reports": [report]})
        assert answer.status_code == 200 and answer.json()["results"][0]["status"] == 200
        assert client.get("/v1/opscore/agent/big/state").json()["details"] == {"n": big}
