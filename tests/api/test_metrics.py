"""``GET /metrics`` (DESIGN §11): scraped and parsed with prometheus_client's own parser.

Each counter is read before and after the event it counts, so every test names the event
that moves it; the labels are checked to stay bounded (route templates, never a raw path).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families

from opscore.machines import MACHINES
from tests.inproc import serve

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
Body = Callable[[FastAPI, httpx.AsyncClient], Awaitable[None]]


def run(store_url: str, body: Body, **settings: Any) -> None:
    async def main() -> None:
        async with serve(store_url, **settings) as (app, client):
            await body(app, client)

    asyncio.run(main())


async def scrape(client: httpx.AsyncClient) -> Samples:
    answer = await client.get("/metrics")
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/plain; version=")
    samples: Samples = {}
    for family in text_string_to_metric_families(answer.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def report(client: httpx.AsyncClient, agent_id: str, state: str) -> httpx.Response:
    body = {"agentId": agent_id, "timestamp": datetime.now(UTC).isoformat(), "state": state, "details": {}}
    return await client.post(f"/v1/opscore/agent/{agent_id}/state", json=body)


def test_transitions_requests_durations_commits_and_entities_move(store_url: str) -> None:
    async def body(app: FastAPI, client: httpx.AsyncClient) -> None:
        before = await scrape(client)
        assert (await report(client, "m-1", "idle")).status_code == 200
        assert (await report(client, "m-1", "registered")).status_code == 409  # refused, recorded
        assert (await report(client, "m-2", "idle")).status_code == 200
        after = await scrape(client)

        def moved(name: str, **labels: str) -> float:
            return value(after, name, **labels) - value(before, name, **labels)

        assert moved("opscore_transitions_total", machine="agent", event="ready", outcome="applied") == 2
        assert moved("opscore_transitions_total", machine="agent", event="none", outcome="rejected") == 1
        route = "/v1/opscore/agent/{agent_id}/state"
        assert moved("opscore_http_requests_total", method="POST", route=route, status="200") == 2
        assert moved("opscore_http_requests_total", method="POST", route=route, status="409") == 1
        assert moved("opscore_http_request_duration_seconds_count", method="POST", route=route) == 3
        assert moved("opscore_http_request_duration_seconds_sum", method="POST", route=route) > 0
        # the scrape before was answered too, and counted under its own template
        assert value(after, "opscore_http_requests_total", method="GET", route="/metrics", status="200") >= 1
        assert moved("opscore_store_commit_seconds_count") >= 3
        # the gauge comes from the store: every declared state listed, 0 when empty
        assert value(after, "opscore_entities", machine="agent", state="idle") == 2
        for machine, decl in MACHINES.items():
            for state in decl["states"]:
                assert ("opscore_entities", (("machine", machine), ("state", state))) in after

    run(store_url, body)


def test_store_batches_count_what_the_group_commit_and_the_reads_carried(store_url: str) -> None:
    """Operators see the mean batch (items / batches): the SQL stores count group commits, PostgreSQL reads too."""

    async def body(app: FastAPI, client: httpx.AsyncClient) -> None:
        before = await scrape(client)
        answers = await asyncio.gather(*(report(client, f"batch-{n}", "idle") for n in range(20)))
        assert [a.status_code for a in answers] == [200] * 20
        assert (await report(client, "batch-0", "registered")).status_code == 409  # refused: committed too
        after = await scrape(client)

        def moved(name: str, kind: str) -> float:
            return value(after, name, kind=kind) - value(before, name, kind=kind)

        kinds = {dict(labels)["kind"] for (name, labels) in after if name == "opscore_store_batches_total"}
        if store_url.startswith("memory"):
            assert kinds == set()  # nothing batches: no made-up zeros
            return
        committed = moved("opscore_store_batch_items_total", "commit")
        assert 1 <= moved("opscore_store_batches_total", "commit") <= committed
        if store_url.startswith("postgresql"):
            assert committed == 21  # 20 reports and a refusal: the group writer takes plain changes only
            assert kinds == {"commit", "read"}
            assert moved("opscore_store_batch_items_total", "read") >= 21  # each decision read its agent
            assert 1 <= moved("opscore_store_batches_total", "read") <= moved("opscore_store_batch_items_total", "read")
        else:
            assert kinds == {"commit"}
            assert committed >= 21  # and whatever else the writer thread wrote meanwhile (timer claims)

    run(store_url, body)


def test_no_label_takes_a_raw_path_or_a_client_value(store_url: str) -> None:
    async def body(app: FastAPI, client: httpx.AsyncClient) -> None:
        for n in range(5):
            await report(client, f"secret-agent-{n}", "idle")
            await client.get(f"/no/such/path/{n}")
        await client.request("PURGE", "/v1/opscore/agents")
        text = (await client.get("/metrics")).text
        assert "secret-agent" not in text and "/no/such/path" not in text
        samples = await scrape(client)
        routes = {dict(labels).get("route") for (name, labels) in samples if name == "opscore_http_requests_total"}
        assert "unmatched" in routes
        assert all(r == "unmatched" or r.startswith("/") for r in routes if r)
        methods = {dict(labels)["method"] for (name, labels) in samples if name == "opscore_http_requests_total"}
        assert methods <= {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "OTHER"}
        assert "OTHER" in methods

    run(store_url, body)


def test_auth_denied_counts_each_reason(store_url: str) -> None:
    async def body(app: FastAPI, client: httpx.AsyncClient) -> None:
        before = await scrape(client)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as anonymous:
            assert (await anonymous.get("/v1/opscore/agents")).status_code == 401
            bad = {"Authorization": "Bearer not-a-key"}
            assert (await anonymous.get("/v1/opscore/agents", headers=bad)).status_code == 401
            basic = {"Authorization": "Basic eDp5"}
            assert (await anonymous.get("/v1/opscore/agents", headers=basic)).status_code == 401
            cookie = {"Cookie": "opscore_session=forged.value"}
            assert (await anonymous.get("/v1/opscore/agents", headers=cookie)).status_code == 401
            signed = {"X-AgentKit-Timestamp": "1", "X-AgentKit-Signature": "00"}
            assert (
                await anonymous.post("/v1/opscore/internal/agent/notify", content=b"{}", headers=signed)
            ).status_code == 401
        after = await scrape(client)
        for reason in ("missing_key", "invalid_key", "malformed_header", "invalid_session", "stale_timestamp"):
            moved = value(after, "opscore_auth_denied_total", reason=reason) - value(
                before, "opscore_auth_denied_total", reason=reason
            )
            assert moved == 1, (reason, moved)

    run(store_url, body)


def test_metrics_need_a_key_unless_public(store_url: str) -> None:
    async def closed(app: FastAPI, client: httpx.AsyncClient) -> None:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as anonymous:
            answer = await anonymous.get("/metrics")
        assert answer.status_code == 401 and answer.json()["code"] == "unauthorized"

    async def public(app: FastAPI, client: httpx.AsyncClient) -> None:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as anonymous:
            answer = await anonymous.get("/metrics")
        assert answer.status_code == 200 and "opscore_entities" in answer.text

    run(store_url, closed)
    run(store_url, public, metrics_public=True)


@asynccontextmanager
async def fake_agentkit(status: int) -> AsyncIterator[str]:
    """A stand-in AgentKit answering every request with ``status``, on a free local port."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            (int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")), 0
        )
        await reader.readexactly(length)
        writer.write(f"HTTP/1.1 {status} X\r\ncontent-length: 2\r\ncontent-type: application/json\r\n\r\n{{}}".encode())
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()


@pytest.mark.parametrize("status, outcome", [(202, "accepted"), (404, "unknown_agent")])
def test_dispatches_count_each_outcome(store_url: str, status: int, outcome: str) -> None:
    async def main() -> None:
        async with fake_agentkit(status) as url, serve(store_url, agentkit_api_url=url) as (_app, client):
            before = await scrape(client)
            assert (
                await client.post("/v1/opscore/agents", json={"agentId": "w-1", "capabilities": ["cap"]})
            ).is_success
            assert (await report(client, "w-1", "idle")).status_code == 200
            definition = {
                "id": "wf",
                "name": "wf",
                "version": "1",
                "tasks": [{"taskId": "t", "agentCapability": "cap"}],
            }
            started = await client.post("/v1/opscore/agent/w-1/workflow", json={"workflowDefinition": definition})
            assert started.status_code == 202, started.text
            for _ in range(100):
                after = await scrape(client)
                moved = value(after, "opscore_dispatches_total", outcome=outcome) - value(
                    before, "opscore_dispatches_total", outcome=outcome
                )
                if moved:
                    break
                await asyncio.sleep(0.05)
            assert moved == 1

    asyncio.run(main())


def test_metrics_need_scope_read_and_a_refusal_is_counted_as_forbidden(store_url: str, tmp_path: Path) -> None:
    secret = "reporter-secret-0123456789"
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps([{"name": "reporter", "sha256": hashlib.sha256(secret.encode()).hexdigest(),
                                 "scopes": ["report"]}]))  # fmt: skip

    async def body(app: FastAPI, client: httpx.AsyncClient) -> None:
        before = await scrape(client)
        answer = await client.get("/metrics", headers={"Authorization": f"Bearer {secret}"})
        assert answer.status_code == 403, answer.text
        assert answer.json()["code"] == "forbidden" and "read" in answer.json()["detail"]
        after = await scrape(client)
        moved = value(after, "opscore_auth_denied_total", reason="forbidden") - value(
            before, "opscore_auth_denied_total", reason="forbidden"
        )
        assert moved == 1

    run(store_url, body, keys_file=str(keys))
