"""``GET /v1/opscore/audit/stream`` in process, on every store (DESIGN §10).

The app runs under its lifespan in this process; :func:`tests.sse.open_stream` reads the
stream as it is sent (httpx's ASGI transport would wait for a stream to end). What is about
processes (a dropped TCP connection, SIGTERM, a client that stops reading a socket) is in
``tests/e2e/test_stream_process.py``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from opscore import audit
from tests.inproc import API_KEY, serve
from tests.sse import open_stream

AUTH = {"Authorization": f"Bearer {API_KEY}"}

Body = Callable[[FastAPI, httpx.AsyncClient], Awaitable[None]]


def run(store_url: str, body: Body, **settings: Any) -> None:
    async def main() -> None:
        async with serve(store_url, **settings) as (app, client):
            await body(app, client)

    asyncio.run(main())


async def report(client: httpx.AsyncClient, agent_id: str, state: str, status: int = 200) -> dict[str, Any]:
    body = {"agentId": agent_id, "timestamp": datetime.now(UTC).isoformat(), "state": state, "details": {}}
    answer = await client.post(f"/v1/opscore/agent/{agent_id}/state", json=body)
    assert answer.status_code == status, answer.text
    return dict(answer.json())


async def stored(client: httpx.AsyncClient, **params: Any) -> list[dict[str, Any]]:
    answer = await client.get("/v1/opscore/audit", params={"limit": 1000, **params})
    assert answer.status_code == 200, answer.text
    return list(answer.json()["items"])


def test_from_the_start_every_record_once_in_order_then_live(store_url: str) -> None:
    async def body(app: FastAPI, client: httpx.AsyncClient) -> None:
        for n in range(3):
            await report(client, f"a{n}", "idle")
            await report(client, f"a{n}", "active")
        records = await stored(client)
        async with open_stream(app, params={"after": "0"}, headers=AUTH) as stream:
            assert stream.status == 200
            assert stream.headers["content-type"].startswith("text/event-stream")
            assert stream.headers["cache-control"].startswith("no-cache")
            got = await stream.records(6)
            assert [e.json for e in got] == records
            # the data line is the stored text: it hashes to the record's own hash
            for event in got:
                assert event.event == "audit" and event.id
                assert audit.text_of(json.loads(event.data)) == event.data
            assert len({e.id for e in got}) == 6
            # live: a report now arrives without waiting for the poll (poked by the commit)
            started = time.monotonic()
            await report(client, "a0", "idle")
            (live,) = await stream.records(1, timeout=5)
            assert live.json["entityId"] == "a0" and live.json["dest"] == "idle"
            assert time.monotonic() - started < 2.0
            assert live.id not in {e.id for e in got}

    run(store_url, body, stream_poll_seconds=30)


def test_without_a_position_only_what_commits_from_now_on(store_url: str) -> None:
    async def body(app: FastAPI, client: httpx.AsyncClient) -> None:
        await report(client, "old", "idle")
        async with open_stream(app, headers=AUTH) as stream:
            await report(client, "new", "idle")
            (event,) = await stream.records(1)
            assert event.json["entityId"] == "new"
            assert stream.events.empty()

    run(store_url, body)


def test_resume_by_last_event_id_or_after_gives_the_rest_exactly_once(store_url: str) -> None:
    async def body(app: FastAPI, client: httpx.AsyncClient) -> None:
        for n in range(5):
            await report(client, f"r{n}", "idle")
        async with open_stream(app, params={"after": "0"}, headers=AUTH) as stream:
            first = await stream.records(2)
        resume_at = first[-1].id
        assert resume_at is not None
        # Last-Event-ID wins over ?after (a browser reconnects to the same URL with the header)
        headers = {**AUTH, "Last-Event-ID": resume_at}
        async with open_stream(app, params={"after": "0"}, headers=headers) as stream:
            rest = await stream.records(3)
            await asyncio.sleep(0.3)
            assert stream.events.empty() or (await stream.next(0.1, comments=True)).event == "comment"  # type: ignore[union-attr]
        async with open_stream(app, params={"after": resume_at}, headers=AUTH) as stream:
            again = await stream.records(3)
        ids = [e.json["entityId"] for e in first + rest]
        assert ids == [f"r{n}" for n in range(5)]
        assert [e.id for e in again] == [e.id for e in rest]

    run(store_url, body)


def test_filters_entity_type_entity_id_and_outcome(store_url: str) -> None:
    async def body(app: FastAPI, client: httpx.AsyncClient) -> None:
        await report(client, "f1", "idle")
        await report(client, "f2", "idle")
        await report(client, "f1", "registered", status=409)  # refused: recorded as rejected
        await report(client, "f2", "active")
        cases: list[tuple[dict[str, str], list[tuple[str, str]]]] = [
            ({"entityId": "f1"}, [("f1", "applied"), ("f1", "rejected")]),
            ({"outcome": "rejected"}, [("f1", "rejected")]),
            ({"entityType": "agent", "entityId": "f2"}, [("f2", "applied"), ("f2", "applied")]),
        ]
        for params, expected in cases:
            async with open_stream(app, params={"after": "0", **params}, headers=AUTH) as stream:
                got = await stream.records(len(expected))
                assert [(e.json["entityId"], e.json["outcome"]) for e in got] == expected, params
        async with open_stream(app, params={"after": "0", "entityType": "workflow"}, headers=AUTH) as stream:
            await report(client, "f1", "registered", status=409)
            with pytest.raises(TimeoutError):
                await stream.records(1, timeout=0.5)

    run(store_url, body)


def test_bad_positions_and_filters_answer_422_and_no_key_401(store_url: str) -> None:
    async def body(app: FastAPI, client: httpx.AsyncClient) -> None:
        for bad in ["abc", "-1", "1" * 40, "١٢"]:
            answer = await client.get("/v1/opscore/audit/stream", params={"after": bad})
            assert answer.status_code == 422, (bad, answer.text)
            assert answer.json()["code"] == "invalid_position"
        answer = await client.get("/v1/opscore/audit/stream", headers={"Last-Event-ID": "x"})
        assert answer.status_code == 422 and answer.json()["code"] == "invalid_position"
        answer = await client.get("/v1/opscore/audit/stream", params={"outcome": "maybe"})
        assert answer.status_code == 422 and answer.json()["code"] == "validation_error"
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as anonymous:
            answer = await anonymous.get("/v1/opscore/audit/stream")
        assert answer.status_code == 401 and answer.headers["www-authenticate"] == "Bearer"

    run(store_url, body)


def test_an_idle_stream_pings(store_url: str) -> None:
    async def body(app: FastAPI, client: httpx.AsyncClient) -> None:
        async with open_stream(app, headers=AUTH) as stream:
            started = time.monotonic()
            seen: list[str] = []
            while len([c for c in seen if c == "ping"]) < 2:
                event = await stream.next(2.0, comments=True)
                assert event is not None
                if event.comment is not None:
                    seen.append(event.comment)
            assert time.monotonic() - started < 1.5

    run(store_url, body, stream_ping_seconds=0.3)


def test_streams_per_key_are_bounded_with_a_clear_429(store_url: str) -> None:
    async def body(app: FastAPI, client: httpx.AsyncClient) -> None:
        async with open_stream(app, headers=AUTH), open_stream(app, headers=AUTH):
            assert app.state.streams.open_streams("anon-" + app.state.api_keys[0].name[5:]) == 2
            answer = await client.get("/v1/opscore/audit/stream")
            assert answer.status_code == 429, answer.text
            problem = answer.json()
            assert problem["code"] == "too_many_streams" and problem["limit"] == 2
            assert "OPSCORE_MAX_STREAMS_PER_KEY" in problem["detail"]
        # both closed: the slots are free again
        await asyncio.sleep(0.05)
        assert app.state.streams.open_streams(app.state.api_keys[0].name) == 0
        async with open_stream(app, headers=AUTH) as stream:
            assert stream.status == 200

    run(store_url, body, max_streams_per_key=2)


def test_a_slow_client_is_ended_with_a_reason_and_resumes_where_it_stopped(store_url: str) -> None:
    async def body(app: FastAPI, client: httpx.AsyncClient) -> None:
        for n in range(3):
            await report(client, f"s{n}", "idle")
        async with open_stream(app, params={"after": "0"}, headers=AUTH) as stream:
            taken = await stream.records(3)
            stream.paused = asyncio.Event()  # the client stops taking anything
            for n in range(3):
                await report(client, f"s{n}", "active")
            await asyncio.sleep(0.6)  # past the send timeout: the server gave up on this write
            stream.paused.set()  # the final event can leave now
            end = await stream.next(5)
            assert end is not None and end.event == "end", end
            assert end.json["reason"] == "slow_consumer" and "Last-Event-ID" in end.json["detail"]
            assert end.json["lastEventId"] == taken[-1].id
            assert await stream.next(5) is None  # and the stream is over
        assert app.state.streams.ended.get("slow_consumer") == 1
        async with open_stream(app, headers={**AUTH, "Last-Event-ID": taken[-1].id or ""}) as stream:
            rest = await stream.records(3)
        assert [(e.json["entityId"], e.json["dest"]) for e in rest] == [(f"s{n}", "active") for n in range(3)]

    run(store_url, body, stream_send_timeout_seconds=0.3)


def test_local_commits_wake_streams_and_polling_finds_the_others(store_url: str) -> None:
    """Without the engine's poke (as for another replica's commit), the poll still finds it."""

    async def body(app: FastAPI, client: httpx.AsyncClient) -> None:
        engine = app.state.engine
        hub = app.state.streams
        async with open_stream(app, headers=AUTH) as stream:
            engine.listeners.remove(hub.poke)
            opened = await stream.next(2, comments=True)
            assert opened is not None and opened.comment == "stream open"
            await asyncio.sleep(0.1)  # the stream has read once and waits now
            try:
                started = time.monotonic()
                await report(client, "p1", "idle")
                (event,) = await stream.records(1, timeout=5)
                waited = time.monotonic() - started
                assert event.json["entityId"] == "p1"
                assert 0.15 <= waited < 2, waited  # not woken: found by the poll
            finally:
                engine.listeners.append(hub.poke)

    run(store_url, body, stream_poll_seconds=0.4)


def test_closing_the_hub_ends_every_stream_with_shutdown(store_url: str) -> None:
    async def body(app: FastAPI, client: httpx.AsyncClient) -> None:
        async with open_stream(app, headers=AUTH) as one, open_stream(app, headers=AUTH) as two:
            app.state.streams.close()
            for stream in (one, two):
                end = await stream.next(5)
                assert end is not None and end.event == "end" and end.json["reason"] == "shutdown"

    run(store_url, body)


def test_a_stream_is_ended_at_its_maximum_age_and_resumes(store_url: str) -> None:
    async def body(app: FastAPI, client: httpx.AsyncClient) -> None:
        await report(client, "aged", "idle")
        async with open_stream(app, params={"after": "0"}, headers=AUTH) as stream:
            (first,) = await stream.records(1)
            end = await stream.next(5)
            assert end is not None and end.event == "end" and end.json["reason"] == "max_age"
            assert end.json["lastEventId"] == first.id

    run(store_url, body, stream_max_seconds=0.5)
