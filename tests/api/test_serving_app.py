"""The app's own side of serving, in process: access lines, settings from the lifespan, 5xx bodies, keys.

What needs a real process (signals, stdout, sockets) is in ``tests/e2e/test_serving.py``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from opscore import logs
from opscore.api import create_app
from opscore.config import InvalidApiKeys, Settings, anonymous_name
from opscore.errors import StorageError, Unavailable
from tests.api.helpers import ts

KEY = "agents:secret-key-1"
V1 = "/v1/opscore"


def run(app: FastAPI, scenario: Callable[[httpx.AsyncClient], Awaitable[Any]], bearer: str = "secret-key-1") -> Any:
    """``scenario(client)`` against ``app`` under its lifespan (app exceptions become 500s, as in a server)."""

    async def main() -> Any:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
            headers = {"Authorization": f"Bearer {bearer}"}
            async with httpx.AsyncClient(transport=transport, base_url="http://test", headers=headers) as client:
                return await scenario(client)

    return asyncio.run(main())


def lines(caplog: pytest.LogCaptureFixture, logger: str) -> list[dict[str, Any]]:
    """The JSON lines Ops-Core's formatter makes of the captured records of ``logger``."""
    formatter = logs.JsonLines(
        "{asctime}{levelname}{name}{message}",
        style="{",
        rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
    )
    return [json.loads(formatter.format(r)) for r in caplog.records if r.name == logger]


async def chunks(data: bytes) -> AsyncIterator[bytes]:
    """A body without Content-Length (sent chunked), 1 KB at a time."""
    for start in range(0, len(data), 1024):
        yield data[start : start + 1024]


def state_body(agent_id: str, state: str = "idle") -> dict[str, Any]:
    return {"agentId": agent_id, "timestamp": ts(), "state": state, "details": {}}


def test_one_access_line_per_request_with_the_route_template(caplog: pytest.LogCaptureFixture) -> None:
    app = create_app(Settings(database_url="memory://", api_key=KEY))

    async def scenario(client: httpx.AsyncClient) -> None:
        assert (await client.post(f"{V1}/agent/a-1/state", json=state_body("a-1"))).status_code == 200
        assert (await client.get(f"{V1}/agent/zz/state")).status_code == 404
        assert (await client.get("/nowhere/a-1")).status_code == 404
        assert (await client.get(f"{V1}/agents", headers={"Authorization": "Bearer wrong"})).status_code == 401
        assert (await client.get("/health", headers={"X-Request-Id": b"ops\xe9-7"})).status_code == 200

    with caplog.at_level(logging.INFO):
        run(app, scenario)
    access = lines(caplog, "opscore.access")
    assert [(a["method"], a["route"], a["status"], a["keyName"]) for a in access] == [
        ("POST", f"{V1}/agent/{{agent_id}}/state", 200, "agents"),
        ("GET", f"{V1}/agent/{{agent_id}}/state", 404, "agents"),
        ("GET", None, 404, None),
        ("GET", f"{V1}/agents", 401, None),
        ("GET", "/health", 200, None),
    ]
    assert access[-1]["clientRequestId"] == "ops\u00e9-7"  # beside ours, never instead of it
    assert access[-1]["requestId"] != "ops\u00e9-7" and len(access[-1]["requestId"]) == 32
    assert all(a["message"] == "request" and a["level"] == "INFO" and a["durationMs"] >= 0 for a in access)
    transition = lines(caplog, "opscore.audit")[0]
    assert transition["requestId"] == access[0]["requestId"]


def test_the_access_log_can_be_switched_off_by_the_environment(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)  # no .env
    monkeypatch.setenv("OPSCORE_API_KEY", KEY)
    monkeypatch.setenv("OPSCORE_DATABASE_URL", "memory://")
    monkeypatch.setenv("OPSCORE_ACCESS_LOG", "false")
    app = create_app()  # as `opscore.api:app`: settings read by the lifespan

    async def scenario(client: httpx.AsyncClient) -> None:
        assert (await client.post(f"{V1}/agent/q-1/state", json=state_body("q-1"))).status_code == 200

    with caplog.at_level(logging.INFO):
        run(app, scenario)
    assert lines(caplog, "opscore.access") == []
    assert len(lines(caplog, "opscore.audit")) == 1  # transitions are still logged


def test_max_body_bytes_comes_from_the_settings_the_lifespan_built(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """``create_app()`` builds the middleware before any settings exist; the limit still applies."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text(f"OPSCORE_API_KEY={KEY}\nOPSCORE_MAX_BODY_BYTES=1000\n")
    monkeypatch.setenv("OPSCORE_DATABASE_URL", "memory://")
    monkeypatch.delenv("OPSCORE_API_KEY", raising=False)
    monkeypatch.delenv("OPSCORE_MAX_BODY_BYTES", raising=False)
    app = create_app()
    big = {**state_body("b-1"), "details": {"x": "y" * 5000}}

    async def scenario(client: httpx.AsyncClient) -> tuple[httpx.Response, httpx.Response, httpx.Response]:
        declared = await client.post(f"{V1}/agent/b-1/state", json=big)
        chunked = await client.post(f"{V1}/agent/b-1/state", content=chunks(json.dumps(big).encode()))
        small = await client.post(f"{V1}/agent/b-1/state", json=state_body("b-1"))
        return declared, chunked, small

    declared, chunked, small = run(app, scenario)
    assert declared.status_code == 413 and declared.json()["code"] == "payload_too_large"
    assert "1000 bytes" in declared.json()["detail"]
    assert chunked.status_code == 413 and chunked.json()["code"] == "payload_too_large"
    assert small.status_code == 200


@pytest.mark.parametrize(
    "failure",
    [
        pytest.param(
            StorageError("PostgreSQL failed: FATAL password authentication for user ops@10.1.2.3"), id="storage"
        ),
        pytest.param(RuntimeError("PostgreSQL failed: FATAL password authentication for user ops@10.1.2.3"), id="bug"),
    ],
)
def test_a_500_body_never_shows_the_internal_error(failure: Exception, caplog: pytest.LogCaptureFixture) -> None:
    app = create_app(Settings(database_url="memory://", api_key=KEY))

    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise failure

    async def scenario(client: httpx.AsyncClient) -> httpx.Response:
        app.state.engine.store.list_entities = broken
        return await client.get(f"{V1}/agents")

    with caplog.at_level(logging.INFO):
        answer = run(app, scenario)
    assert answer.status_code == 500
    body = answer.json()
    assert "PostgreSQL" not in answer.text and "10.1.2.3" not in answer.text
    assert set(body) == {"detail", "code", "requestId"}
    assert body["code"] in {"storage_error", "internal_error"}
    assert body["requestId"] == answer.headers["x-request-id"]
    assert body["requestId"] in body["detail"] or "request id" in body["detail"]
    logged = [line for line in lines(caplog, "opscore.api") if line["level"] == "ERROR"]
    assert logged and logged[0]["requestId"] == body["requestId"]
    assert "10.1.2.3" in json.dumps(logged[0])  # the whole story is in the log line
    access = lines(caplog, "opscore.access")
    assert [(a["status"], a["requestId"]) for a in access] == [(500, body["requestId"])]


def test_key_names_are_logged_at_start_and_bad_keys_refuse_to_start(caplog: pytest.LogCaptureFixture) -> None:
    anon = "an-unnamed-secret-key"
    app = create_app(Settings(database_url="memory://", api_key=f"{KEY},{anon}"))

    async def scenario(client: httpx.AsyncClient) -> int:
        return (await client.get(f"{V1}/agents")).status_code

    with caplog.at_level(logging.INFO):
        assert run(app, scenario, bearer=anon) == 200
    started = [line for line in lines(caplog, "opscore") if line["message"] == "api keys"]
    assert started == [{**started[0], "keyNames": ["agents", anonymous_name(anon.encode())]}]
    assert "secret-key-1" not in caplog.text and anon not in caplog.text

    refused = create_app(Settings(database_url="memory://", api_key="Prod2024:xyz"))
    with pytest.raises(InvalidApiKeys, match="name:secret") as raised:
        run(refused, scenario)
    assert "xyz" not in str(raised.value)


def test_no_5xx_answer_shows_internal_text_batch_items_and_health_included(caplog: pytest.LogCaptureFixture) -> None:
    app = create_app(Settings(database_url="memory://", api_key=KEY))
    secret_words = "PostgreSQL failed: could not connect to 10.1.2.3: password authentication failed"

    async def failing_many(*args: Any, **kwargs: Any) -> list[Any]:
        return [StorageError(secret_words), Unavailable(f"PostgreSQL is unreachable: {secret_words}")]

    async def failing_ping() -> None:
        raise Unavailable(f"PostgreSQL is unreachable: {secret_words}")

    async def scenario(client: httpx.AsyncClient) -> tuple[httpx.Response, httpx.Response]:
        app.state.engine.report_many = failing_many
        app.state.engine.store.ping = failing_ping
        reports = [state_body("b-1"), state_body("b-2")]
        batch = await client.post(f"{V1}/state-reports", json={"reports": reports})
        return batch, await client.get("/health")

    with caplog.at_level(logging.INFO):
        batch, health = run(app, scenario)
    assert batch.status_code == 200
    assert [r["status"] for r in batch.json()["results"]] == [500, 503]
    assert [r["body"]["code"] for r in batch.json()["results"]] == ["storage_error", "unavailable"]
    assert health.status_code == 503 and health.json()["code"] == "storage_unavailable"
    for answer in (batch, health):
        assert "10.1.2.3" not in answer.text and "PostgreSQL" not in answer.text
    logged = lines(caplog, "opscore.api")
    assert sum("10.1.2.3" in line.get("detail", "") for line in logged) == 3  # each detail is in the log
