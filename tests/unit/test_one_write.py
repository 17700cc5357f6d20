"""A response's head and body leave in ONE write (``opscore.api.server.OneWrite``).

The real protocol ``opscore serve`` runs and real Starlette responses; only the socket is a
transport that records what was written, because the point is how many writes there are.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from uvicorn.server import ServerState

from opscore.api.server import COALESCE_BYTES, Config, Limits, Protocol

GATE = "gate"


class Recording(asyncio.Transport):
    """A socket's transport that keeps each write as one item."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: Any) -> None:
        assert not self.closed, "written after close"
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 50000), "sockname": ("127.0.0.1", 8000)}.get(name, default)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def app(gate: asyncio.Event) -> Starlette:
    async def small(request: Request) -> Response:
        return JSONResponse({"state": "idle"}, headers={"x-request-id": "r-1"})

    async def big(request: Request) -> Response:
        return Response(b"x" * (COALESCE_BYTES + 1), media_type="application/octet-stream")

    async def stream(request: Request) -> Response:
        async def events() -> AsyncIterator[bytes]:
            await gate.wait()
            yield b"data: first\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return Starlette(
        routes=[Route("/small", small, methods=["GET", "HEAD"]), Route("/big", big), Route("/stream", stream)]
    )


async def exchange(request: bytes, *, until: int = 1, gate: asyncio.Event | None = None) -> Recording:
    """Feed ``request`` to a fresh connection; wait (a few turns at most) until ``until`` writes were made."""
    config = Config(app(gate or asyncio.Event()), limits=Limits(65536, 30.0, 100), log_config=None, lifespan="off")
    config.load()
    protocol = Protocol(config, ServerState(), {}, asyncio.get_running_loop())
    transport = Recording()
    protocol.connection_made(transport)
    protocol.data_received(request)
    for _ in range(200):
        if len(transport.writes) >= until and (protocol.cycle is None or protocol.cycle.response_complete):
            break
        await asyncio.sleep(0.005)
    return transport


def test_a_response_is_one_write_of_head_and_body() -> None:
    async def main() -> None:
        transport = await exchange(b"GET /small HTTP/1.1\r\nhost: t\r\n\r\n")
        assert len(transport.writes) == 1
        (raw,) = transport.writes
        assert raw.startswith(b"HTTP/1.1 200 OK\r\n")
        assert b"\r\nx-request-id: r-1\r\n" in raw
        assert raw.endswith(b'\r\n\r\n{"state":"idle"}')

    asyncio.run(main())


def test_two_requests_on_one_connection_are_two_writes_in_order() -> None:
    async def main() -> None:
        request = b"GET /small HTTP/1.1\r\nhost: t\r\n\r\n"
        transport = await exchange(request + request, until=2)
        assert len(transport.writes) == 2
        assert all(w.startswith(b"HTTP/1.1 200 OK") and w.endswith(b'{"state":"idle"}') for w in transport.writes)

    asyncio.run(main())


def test_a_head_request_gets_its_head_without_a_body() -> None:
    async def main() -> None:
        transport = await exchange(b"HEAD /small HTTP/1.1\r\nhost: t\r\n\r\n")
        assert len(transport.writes) == 1
        assert transport.writes[0].startswith(b"HTTP/1.1 200 OK") and transport.writes[0].endswith(b"\r\n\r\n")

    asyncio.run(main())


def test_a_large_body_is_written_after_its_head_not_copied_onto_it() -> None:
    async def main() -> None:
        transport = await exchange(b"GET /big HTTP/1.1\r\nhost: t\r\n\r\n", until=2)
        head, body = transport.writes
        assert head.startswith(b"HTTP/1.1 200 OK") and head.endswith(b"\r\n\r\n")
        assert body == b"x" * (COALESCE_BYTES + 1)

    asyncio.run(main())


def test_a_stream_gets_its_head_before_its_first_event() -> None:
    """A head is held for one turn of the loop only: a subscriber sees 200 while no event has come yet."""

    async def main() -> None:
        gate = asyncio.Event()
        transport = await exchange(b"GET /stream HTTP/1.1\r\nhost: t\r\n\r\n", gate=gate)
        assert len(transport.writes) == 1  # the head alone, while the stream waits
        assert transport.writes[0].startswith(b"HTTP/1.1 200 OK") and b"text/event-stream" in transport.writes[0]
        gate.set()
        for _ in range(200):
            if any(b"data: first" in w for w in transport.writes[1:]):
                break
            await asyncio.sleep(0.005)
        assert b"".join(transport.writes[1:]).startswith(b"d\r\ndata: first\n\n\r\n")

    asyncio.run(main())
