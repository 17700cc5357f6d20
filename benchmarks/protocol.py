"""What ``opscore.api.server.Protocol`` adds to a request over uvicorn's: ``python -m benchmarks.protocol``.

One keep-alive connection on an in-memory transport: each round feeds a state-report-sized
request (eight headers, a 120-byte body) to ``data_received`` and lets the event loop run the
ASGI task (an app that answers at once) to the end of the response. That is the protocol's
whole per-request path, parse to keep-alive timer, without sockets, the app or other processes.
uvicorn's ``HttpToolsProtocol`` and ours are measured interleaved; CPU µs of this thread per
request, medians. Prints a ``RESULT {json}`` line.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from opscore.api import server

BODY = json.dumps(
    {"agentId": "agent-0001", "timestamp": "2026-11-30T13:22:01.123456+00:00", "state": "idle", "details": {}}
).encode()
REQUEST = (
    b"POST /v1/opscore/agent/agent-0001/state HTTP/1.1\r\n"
    b"Host: 127.0.0.1:8000\r\n"
    b"User-Agent: wrk\r\n"
    b"Accept: */*\r\n"
    b"Authorization: Bearer 0123456789abcdef0123456789abcdef\r\n"
    b"Content-Type: application/json\r\n"
    b"X-Bench: 1\r\n"
    b"Connection: keep-alive\r\n"
    b"Content-Length: " + str(len(BODY)).encode() + b"\r\n\r\n" + BODY
)


class Transport(asyncio.Transport):
    """Enough of a transport for uvicorn's protocol: writes are counted and dropped."""

    def __init__(self) -> None:
        super().__init__()
        self.written = 0
        self.closing = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 8000) if name in ("sockname", "peername") else default

    def write(self, data: Any) -> None:
        self.written += len(data)

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def app(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    await receive()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"{}"})


def measure(cls: type[asyncio.Protocol], requests: int) -> float:
    """CPU µs of this thread per request through ``cls`` on one keep-alive connection."""
    loop = asyncio.new_event_loop()
    try:
        limits = server.Limits(max_header_bytes=65536, read_timeout=10.0, max_connections=1000)
        config = server.Config(app, limits=limits, http=cls, log_config=None, access_log=False, lifespan="off")
        config.load()
        protocol = cls(config=config, server_state=ServerState(), app_state={}, _loop=loop)  # type: ignore[call-arg]
        transport = Transport()
        protocol.connection_made(transport)

        async def drive() -> float:
            start = time.thread_time()
            for _ in range(requests):
                protocol.data_received(REQUEST)
                await asyncio.sleep(0)  # the ASGI task runs to the end of its response
                await asyncio.sleep(0)
            return (time.thread_time() - start) / requests * 1e6

        result = loop.run_until_complete(drive())
        assert not transport.closing and transport.written > 0
        return result
    finally:
        loop.close()


def main() -> None:
    requests = int(sys.argv[1]) if len(sys.argv) > 1 else 20_000
    rounds = 7
    theirs, ours = [], []
    for _ in range(rounds):
        theirs.append(measure(HttpToolsProtocol, requests))
        ours.append(measure(server.Protocol, requests))
    result = {
        "uvicorn_us": round(statistics.median(theirs), 2),
        "opscore_us": round(statistics.median(ours), 2),
        "added_us": round(statistics.median(o - t for o, t in zip(ours, theirs, strict=True)), 2),
        "requests": requests,
        "rounds": rounds,
        "uvicorn": uvicorn.__version__,
    }
    for name, value in result.items():
        print(f"{name:12} {value}", file=sys.stderr)
    print("RESULT " + json.dumps(result), file=sys.stderr)


if __name__ == "__main__":
    main()
