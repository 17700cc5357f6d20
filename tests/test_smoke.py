"""The shortest path a user takes: a real server, one report, its audit record, verification."""

from __future__ import annotations

from datetime import UTC, datetime

from tests.servers import Server


def test_report_is_applied_recorded_and_verifiable(server: Server) -> None:
    with server.client() as client:
        now = datetime.now(UTC).isoformat()
        answer = client.post("/v1/opscore/agent/a1/state", json={"agentId": "a1", "timestamp": now, "state": "idle"})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["state"] == "idle" and body["previousState"] == "registered" and body["changed"] is True
        records = client.get("/v1/opscore/agent/a1/audit").json()["items"]
        assert [(r["event"], r["source"], r["dest"]) for r in records] == [("ready", "registered", "idle")]
        assert client.get("/v1/opscore/audit/verify").json()["ok"] is True
