"""``stream_audit``: server-sent events parsed as the standard says, resumed after every drop.

The resumption is tested against a stand-in stream server (a real HTTP server in a thread)
that drops the connection every few events, as a proxy or a restarted replica would, and
resumes from ``Last-Event-ID`` as DESIGN §10 says Ops-Core does.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from opscore.client import AsyncClient, Client, Retry
from opscore.client._base import EventDecoder
from opscore.errors import Unauthorized
from tests.servers import free_port


def test_the_decoder_follows_the_standard() -> None:
    decoder = EventDecoder()
    lines = [": ping", "id: 7", "event: audit", 'data: {"a":', "data: 1}", "", "retry: 2500", "id: 9", ""]
    events = [e for e in (decoder.feed(line) for line in lines) if e is not None]
    assert [(e.event, e.data, e.id) for e in events] == [("audit", '{"a":\n1}', "7")]
    assert decoder.last_id == "9"  # an id without data still moves the position
    assert decoder.retry_ms == 2500
    assert EventDecoder().feed("data:x") is None  # no space after the colon is fine too
    cut = EventDecoder("p1")
    for line in ["id: p2", "event: audit", "data: {}"]:  # the connection breaks before the blank line
        cut.feed(line)
    cut.reset()
    assert cut.last_id == "p1" and cut.feed("") is None  # that event never happened


def record(n: int) -> dict[str, Any]:
    return {
        "id": n,
        "entityType": "agent",
        "entityId": f"a{n % 3}",
        "seq": n,
        "event": "ready",
        "source": "registered",
        "dest": "idle",
        "outcome": "applied",
        "reason": None,
        "actor": "key:test",
        "requestId": None,
        "details": {},
        "reportedAt": None,
        "recordedAt": "2026-11-23T10:00:00+00:00",
        "prevHash": "0" * 64,
        "hash": f"{n:064x}",
    }


class Stand:
    """A stream server: records 1..total at positions "p1".."pN", dropping after ``burst`` events."""

    def __init__(self, total: int, burst: int) -> None:
        self.total = total
        self.burst = burst
        self.asked: list[str | None] = []
        self.port = free_port()

        async def stream(request: Request) -> Any:
            if request.headers.get("authorization") != "Bearer good":
                return JSONResponse({"detail": "invalid API key", "code": "unauthorized"}, status_code=401)
            last = request.headers.get("last-event-id")
            self.asked.append(last)
            start = 0 if last is None else int(last.removeprefix("p"))

            async def events() -> AsyncIterator[str]:
                yield ": ping\n\n"
                if last is None:
                    yield f"id: p{start}\n\n"  # where "now" is, so a drop before any record loses nothing
                for n in range(start + 1, min(start + self.burst, self.total) + 1):
                    yield f"id: p{n}\nevent: audit\ndata: {json.dumps(record(n))}\n\n"
                    await asyncio.sleep(0.001)
                if start + self.burst < self.total:
                    return  # the connection ends: the client resumes
                while True:  # caught up: keep the stream open, pinging
                    await asyncio.sleep(0.05)
                    yield ": ping\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")

        app = Starlette(routes=[Route("/v1/opscore/audit/stream", stream)])
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_config=None, access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Stand:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "the stand-in stream server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture
def stand() -> Iterator[Stand]:
    with Stand(total=25, burst=4) as server:
        yield server


def test_a_dropped_stream_resumes_without_losing_or_repeating_a_record(stand: Stand) -> None:
    with Client(stand.url, "good") as client:
        stream = client.stream_audit(after=0)
        ids = []
        for r in stream:
            ids.append(r.id)
            if len(ids) == 25:
                break
        stream.close()
    assert ids == list(range(1, 26))
    assert stream.position == "p25"
    assert stand.asked[:3] == ["0", "p4", "p8"]  # every reconnection names the last record received
    assert len(stand.asked) == 7


def test_no_position_means_from_now_and_a_drop_resumes_from_the_head(stand: Stand) -> None:
    with Client(stand.url, "good") as client, client.stream_audit() as stream:
        first = next(iter(stream))
    assert first.id == 1 and stand.asked[0] is None


def test_async_stream_resumes_too(stand: Stand) -> None:
    async def scenario() -> list[int]:
        async with AsyncClient(stand.url, "good") as client:
            ids: list[int] = []
            async with client.stream_audit(after="p10") as stream:
                async for r in stream:
                    ids.append(r.id)
                    if len(ids) == 15:
                        break
            return ids

    assert asyncio.run(scenario()) == list(range(11, 26))


def test_a_refused_stream_raises_at_once(stand: Stand) -> None:
    with Client(stand.url, "bad") as client, pytest.raises(Unauthorized):
        next(iter(client.stream_audit()))


def test_a_stream_to_nowhere_gives_up_after_its_retries() -> None:
    from opscore.client import ServerUnreachable

    nowhere = f"http://127.0.0.1:{free_port()}"
    with Client(nowhere, "good", retry=Retry(attempts=1, backoff=0.01)) as client, pytest.raises(ServerUnreachable):
        next(iter(client.stream_audit()))
