"""Server-Sent Events for tests: a parser, and an in-process stream client over raw ASGI.

``httpx.ASGITransport`` hands back a response only once the app has finished it, which a
live stream never does; :func:`open_stream` calls the app itself, reads the body as it is
sent, and can disconnect (``http.disconnect``) or stop reading (a slow client) at will.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode


@dataclass
class Event:
    """One parsed event (``comment`` for a ``:`` line such as ``: ping``)."""

    event: str = "message"
    id: str | None = None
    data: str = ""
    comment: str | None = None

    @property
    def json(self) -> Any:
        return json.loads(self.data)


class Parser:
    """Feeds bytes, yields complete events (the SSE line format: fields, blank line ends one)."""

    def __init__(self) -> None:
        self.buffer = b""

    def feed(self, chunk: bytes) -> list[Event]:
        self.buffer += chunk
        events: list[Event] = []
        while b"\n\n" in self.buffer:
            block, self.buffer = self.buffer.split(b"\n\n", 1)
            current = Event()
            data: list[str] = []
            fields = False
            for line in block.decode().split("\n"):
                if line.startswith(":"):
                    events.append(Event(event="comment", comment=line[1:].strip()))
                    continue
                name, _, value = line.partition(":")
                value = value[1:] if value.startswith(" ") else value
                fields = True
                if name == "event":
                    current.event = value
                elif name == "id":
                    current.id = value
                elif name == "data":
                    data.append(value)
            if fields and (data or current.id is not None):
                current.data = "\n".join(data)
                events.append(current)
        return events


@dataclass
class Stream:
    """An open in-process stream: its status, headers and the events received so far."""

    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    events: asyncio.Queue[Event | None] = field(default_factory=asyncio.Queue)
    body: bytes = b""
    done: asyncio.Event = field(default_factory=asyncio.Event)
    _disconnect: asyncio.Event = field(default_factory=asyncio.Event)
    paused: asyncio.Event | None = None
    """While set to an unset event, ``send`` blocks: a client that takes nothing."""

    def disconnect(self) -> None:
        self._disconnect.set()

    async def next(self, timeout: float = 5.0, *, comments: bool = False) -> Event | None:
        """The next event (``None`` once the stream ended); comments skipped unless asked for."""
        while True:
            event = await asyncio.wait_for(self.events.get(), timeout)
            if event is None or comments or event.event != "comment":
                return event

    async def records(self, n: int, timeout: float = 10.0) -> list[Event]:
        """The next ``n`` audit events."""
        found: list[Event] = []
        while len(found) < n:
            event = await self.next(timeout)
            assert event is not None, f"the stream ended after {len(found)} of {n} records"
            if event.event == "audit":
                found.append(event)
        return found


@contextlib.asynccontextmanager
async def open_stream(
    app: Any,
    path: str = "/v1/opscore/audit/stream",
    *,
    params: dict[str, str] | None = None,
    headers: dict[str, str] | None = None,
    start_timeout: float = 10.0,
) -> AsyncIterator[Stream]:
    """GET ``path`` on ``app`` (started under its lifespan) and read it as it streams."""
    stream = Stream()
    parser = Parser()
    sent_request = False
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": urlencode(params or {}).encode(),
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()],
        "client": ("127.0.0.1", 50000),
        "server": ("opscore.test", 80),
    }

    async def receive() -> dict[str, Any]:
        nonlocal sent_request
        if not sent_request:
            sent_request = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await stream._disconnect.wait()
        return {"type": "http.disconnect"}

    started = asyncio.Event()

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            stream.status = message["status"]
            stream.headers = {k.decode().lower(): v.decode() for k, v in message.get("headers", [])}
            started.set()
            return
        if stream.paused is not None:
            await stream.paused.wait()
        chunk = message.get("body", b"")
        stream.body += chunk
        if stream.status == 200:
            for event in parser.feed(chunk):
                stream.events.put_nowait(event)

    async def run() -> None:
        try:
            await app(scope, receive, send)
        finally:
            started.set()
            stream.done.set()
            stream.events.put_nowait(None)

    task = asyncio.create_task(run())
    await asyncio.wait_for(started.wait(), start_timeout)
    try:
        yield stream
    finally:
        stream.disconnect()
        if stream.paused is not None:
            stream.paused.set()
        try:
            await asyncio.wait_for(task, 10)
        except TimeoutError:
            task.cancel()
            raise


async def stream_status(app: Any, headers: dict[str, str]) -> int:
    """The status a stream request answers with (the stream, if opened, is closed at once)."""
    async with open_stream(app, headers=headers) as stream:
        return stream.status
