"""AgentKit's registration webhook, signed exactly as DESIGN §2 says the real AgentKit signs it."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.api.helpers import post_webhook, report, sign, webhook_body
from tests.inproc import InProcess
from tests.servers import Server

V1 = "/v1/opscore"


def test_register_creates_then_updates_metadata(server: Server) -> None:
    secret = server.webhook_secret
    first = post_webhook(server, webhook_body("REGISTER", "w1", capabilities=["a"]), secret=secret)
    assert first.status_code == 200, first.text
    assert first.json()["created"] is True
    with server.client() as client:
        agent = client.get(f"{V1}/agent/w1").json()
        assert (agent["state"], agent["agentName"], agent["capabilities"]) == ("registered", "Agent w1", ["a"])
        assert agent["metadata"] == {"team": "ops"} and agent["contactEndpoint"] == "http://127.0.0.1:9/agent"
        again = post_webhook(
            server, webhook_body("REGISTER", "w1", agentName="Renamed", capabilities=["a", "b"]), secret=secret
        )
        assert again.status_code == 200 and again.json()["created"] is False
        agent = client.get(f"{V1}/agent/w1").json()
        assert (agent["agentName"], agent["capabilities"]) == ("Renamed", ["a", "b"])
        # the change of metadata is audited; it moves no state and no revision
        (record,) = client.get(f"{V1}/agent/w1/audit").json()["items"]
        assert (record["event"], record["source"], record["dest"], record["actor"]) == (
            "update_metadata",
            "registered",
            "registered",
            "agentkit",
        )
        assert record["details"]["changed"] == {
            "agentName": {"old": "Agent w1", "new": "Renamed"},
            "capabilities": {"old": ["a"], "new": ["a", "b"]},
        }
        assert agent["revision"] == 0


def test_register_after_a_state_report_keeps_the_state(server: Server) -> None:
    """The real AgentKit reports before its webhook arrives (DESIGN §2)."""
    with server.client() as client:
        assert report(client, "w2", "initializing").status_code == 200
        assert report(client, "w2", "idle").status_code == 200
        hook = post_webhook(server, webhook_body("REGISTER", "w2"), secret=server.webhook_secret)
        assert hook.status_code == 200 and hook.json()["created"] is False
        agent = client.get(f"{V1}/agent/w2").json()
        assert (agent["state"], agent["revision"], agent["agentName"]) == ("idle", 2, "Agent w2")


def test_deregister(server: Server) -> None:
    secret = server.webhook_secret
    assert post_webhook(server, webhook_body("REGISTER", "w3"), secret=secret).status_code == 200
    with server.client() as client:
        assert report(client, "w3", "idle").status_code == 200
        gone = post_webhook(server, webhook_body("DEREGISTER", "w3"), secret=secret)
        assert gone.status_code == 200 and gone.json()["state"] == "deregistered"
        assert client.get(f"{V1}/agent/w3").json()["state"] == "deregistered"
        last = client.get(f"{V1}/agent/w3/audit").json()["items"][-1]
        assert (last["event"], last["actor"], last["outcome"]) == ("deregister", "agentkit", "applied")
        assert report(client, "w3", "idle").status_code == 409
    unknown = post_webhook(server, webhook_body("DEREGISTER", "never-seen"), secret=secret)
    assert unknown.status_code == 404 and unknown.json()["code"] == "unknown_agent"


def test_iso_timestamps_are_accepted(server: Server) -> None:
    stamp = datetime.now(UTC).isoformat()
    hook = post_webhook(server, webhook_body("REGISTER", "w4"), secret=server.webhook_secret, timestamp=stamp)
    assert hook.status_code == 200, hook.text
    zulu = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    hook = post_webhook(server, webhook_body("REGISTER", "w5"), secret=server.webhook_secret, timestamp=zulu)
    assert hook.status_code == 200, hook.text


@pytest.mark.parametrize(
    ("label", "offset"),
    # int() truncates up to 1 s and the request takes time: "future" needs a few seconds of margin
    [("stale", -301), ("future", 305), ("far past", -86_400)],
)
def test_timestamps_outside_the_window_are_refused(server: Server, label: str, offset: int) -> None:
    stamp = str(int(time.time()) + offset)
    hook = post_webhook(server, webhook_body("REGISTER", "late"), secret=server.webhook_secret, timestamp=stamp)
    assert hook.status_code == 401 and hook.json()["code"] == "stale_timestamp", label


def test_replays_and_bad_signatures_are_refused(server: Server) -> None:
    secret = server.webhook_secret
    body = webhook_body("REGISTER", "w6")
    stamp = str(int(time.time()))
    first = post_webhook(server, body, secret=secret, timestamp=stamp)
    assert first.status_code == 200
    replay = post_webhook(server, body, secret=secret, timestamp=stamp)
    assert replay.status_code == 401 and replay.json()["code"] == "replayed"
    assert replay.headers["content-type"].startswith("application/json")

    cases = {
        "wrong secret": {"signature": sign("not-the-secret", stamp, body)},
        "other body": {"signature": sign(secret, stamp, webhook_body("REGISTER", "w7"))},
        "other timestamp": {"signature": sign(secret, str(int(time.time()) - 1), body)},
        "not hex": {"signature": "zz"},
        "empty": {"signature": ""},
        "non-ascii": {"signature": "é" * 64},
        "NaN timestamp": {"timestamp": "nan"},
        "inf timestamp": {"timestamp": "inf"},
        "garbage timestamp": {"timestamp": "soon"},
        "empty timestamp": {"timestamp": ""},
    }
    for label, overrides in cases.items():
        fresh = webhook_body("REGISTER", "w8", metadata={"case": label})
        kwargs = {"timestamp": overrides.get("timestamp"), "signature": overrides.get("signature")}
        if "timestamp" in overrides and "signature" not in overrides:
            kwargs["signature"] = sign(secret, overrides["timestamp"], fresh)
        answer = post_webhook(server, fresh if "signature" not in overrides else body, secret=secret, **kwargs)
        assert answer.status_code == 401, (label, answer.status_code, answer.text)
        assert isinstance(answer.json()["detail"], str) and answer.json()["code"], label
    with server.client() as client:
        assert client.get(f"{V1}/agent/w8").status_code == 404
        assert client.get(f"{V1}/agent/w7").status_code == 404


def test_signed_but_invalid_bodies_are_422(server: Server) -> None:
    secret = server.webhook_secret
    for body in (
        b"{not json",
        b'{"event_type":"UPDATE","agent_details":{"agentId":"x"}}',
        b'{"event_type":"REGISTER"}',
    ):
        answer = post_webhook(server, body, secret=secret)
        assert answer.status_code == 422, (body, answer.text)
        assert answer.json()["code"] == "validation_error"


def test_no_bearer_key_is_needed_or_enough(server: Server) -> None:
    with server.anonymous() as client:
        answer = client.post(
            f"{V1}/internal/agent/notify", content=webhook_body("REGISTER", "w9"), headers=server.headers
        )
    assert answer.status_code == 401


def test_rotation_accepts_every_configured_secret(sqlite_url: str, tmp_path: Path) -> None:
    server = InProcess(sqlite_url, webhook_secret="old-secret,new-secret")
    server.start()
    try:
        for i, secret in enumerate(("old-secret", "new-secret")):
            hook = post_webhook(server, webhook_body("REGISTER", f"r{i}"), secret=secret)
            assert hook.status_code == 200, (secret, hook.text)
        refused = post_webhook(server, webhook_body("REGISTER", "r9"), secret="old-secret,new-secret")
        assert refused.status_code == 401
    finally:
        server.stop()


def test_without_a_secret_the_webhook_is_disabled(sqlite_url: str, tmp_path: Path) -> None:
    server = InProcess(sqlite_url, webhook_secret="")
    server.start()
    try:
        hook = post_webhook(server, webhook_body("REGISTER", "x"), secret="")
        assert hook.status_code == 401 and hook.json()["code"] == "webhook_disabled"
    finally:
        server.stop()
