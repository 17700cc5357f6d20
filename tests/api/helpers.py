"""Small helpers for talking to a real server the way AgentKit and operators do."""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

_clock = itertools.count()
_T0 = datetime.now(UTC).replace(microsecond=0)


def ts() -> str:
    """A strictly increasing ISO-8601 timestamp (one millisecond apart), so no report is stale."""
    return (_T0 + timedelta(milliseconds=next(_clock))).isoformat()


def report(client: httpx.Client, agent_id: str, state: str, **extra: Any) -> httpx.Response:
    body = {"agentId": agent_id, "timestamp": ts(), "state": state, "details": {}, **extra}
    return client.post(f"/v1/opscore/agent/{agent_id}/state", json=body)


def trigger(client: httpx.Client, agent_id: str, name: str, **headers: str) -> httpx.Response:
    return client.post(f"/v1/opscore/agent/{agent_id}/transitions", json={"trigger": name}, headers=headers)


def all_pages(client: httpx.Client, path: str, **params: Any) -> tuple[list[dict[str, Any]], int]:
    """Every item of a paged listing, and how many pages it took."""
    items: list[dict[str, Any]] = []
    cursor = None
    pages = 0
    while True:
        query = {**params, **({"cursor": cursor} if cursor else {})}
        answer = client.get(path, params=query)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        pages += 1
        items.extend(body["items"])
        cursor = body["nextCursor"]
        if cursor is None:
            return items, pages
        assert pages < 10_000


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """DESIGN §2: hex HMAC-SHA256(secret, timestamp bytes + b"." + raw body)."""
    return hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


def webhook_body(event: str, agent_id: str, **details: Any) -> bytes:
    agent = {
        "agentId": agent_id,
        "agentName": details.pop("agentName", f"Agent {agent_id}"),
        "version": "1.0",
        "capabilities": details.pop("capabilities", ["summarise"]),
        "contactEndpoint": "http://127.0.0.1:9/agent",
        "metadata": details.pop("metadata", {"team": "ops"}),
    }
    return json.dumps({"event_type": event, "agent_details": agent}).encode()


def post_webhook(
    target: Any, body: bytes, *, secret: str, timestamp: str | None = None, signature: str | None = None
) -> httpx.Response:
    """Sign ``body`` as AgentKit does and post it to the webhook of ``target`` (a server, or a base URL)."""
    stamp = timestamp if timestamp is not None else str(int(time.time()))
    sig = signature if signature is not None else sign(secret, stamp, body)
    headers = {
        "X-AgentKit-Timestamp": stamp.encode(),
        "X-AgentKit-Signature": sig.encode(),  # bytes: lets a test send non-ASCII
        "Content-Type": "application/json",
    }
    client = httpx.Client(base_url=target, timeout=30) if isinstance(target, str) else target.anonymous()
    with client:
        return client.post("/v1/opscore/internal/agent/notify", content=body, headers=headers)
