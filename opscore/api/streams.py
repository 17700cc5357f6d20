"""The live audit stream's machinery (DESIGN §10): one :class:`Hub` per app, one :class:`EventStream` per client.

A stream holds no queue of records. Each one keeps only its position and reads the store
through the storage port (``Store.stream_page``) from there, a page at a time, at the pace
its client takes them; so a slow client costs the server one page and the socket's buffer,
however far behind it falls, and what it receives is exactly what the store's order says
(the port keeps the promise: every record after a position, once, in one order). What the
process adds is only *when* to look:

- a commit in this process pokes the hub (an engine listener), and every waiting stream
  reads at once;
- commits of other replicas are found by polling at ``OPSCORE_STREAM_POLL_SECONDS``;
- a stream reads at most every :data:`MIN_READ_GAP` seconds, so a busy writer costs each
  stream a bounded number of queries, whatever the commit rate.

A client that does not take what is sent within ``OPSCORE_STREAM_SEND_TIMEOUT_SECONDS`` is
ended with ``event: end`` (reason ``slow_consumer``) and the connection closed; it resumes
with ``Last-Event-ID`` where it stopped. A shutdown ends every stream the same way (reason
``shutdown``), and so does ``OPSCORE_STREAM_MAX_SECONDS`` of age (reason ``max_age``): a
long-lived connection is re-balanced across replicas now and then, and one opened by a
console session that has since ended does not outlive it by more than that.
Each key may hold ``OPSCORE_MAX_STREAMS_PER_KEY`` open streams per replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from dataclasses import replace
from typing import Any

from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from opscore.errors import TooManyStreams
from opscore.models import AuditQuery
from opscore.storage.base import Store

log = logging.getLogger("opscore.stream")

PAGE = 500
"""Records read (and sent as one write) at a time."""
MIN_READ_GAP = 0.05
"""Seconds between two reads of one stream when commits keep poking it."""
END_GRACE = 1.0
"""Seconds the final ``end`` event may take to leave before the connection is closed anyway."""
HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache, no-store"),
    (b"x-accel-buffering", b"no"),  # nginx: pass events through as they come
]


def frame(position: str, text: str) -> bytes:
    """One record as one event; the stored JSON text never holds a line break."""
    return f"id: {position}\nevent: audit\ndata: {text}\n\n".encode()


def end_frame(reason: str, detail: str, position: str) -> bytes:
    data = json.dumps({"reason": reason, "detail": detail, "lastEventId": position}, separators=(",", ":"))
    return f"event: end\ndata: {data}\n\n".encode()


class Hub:
    """What every stream of one app shares: the wake-up on local commits, the per-key counts, closing."""

    def __init__(
        self,
        *,
        max_per_key: int,
        poll_seconds: float,
        ping_seconds: float,
        send_timeout_seconds: float,
        max_seconds: float = 3600.0,
    ) -> None:
        self.max_per_key = max_per_key
        self.poll_seconds = poll_seconds
        self.ping_seconds = ping_seconds
        self.send_timeout_seconds = send_timeout_seconds
        self.max_seconds = max_seconds
        self.commits = 0
        """Counts local commits: a stream that saw it move while it read reads again without waiting."""
        self._changed: asyncio.Event | None = None
        self._open: dict[str, int] = {}
        self.closing = asyncio.Event()
        self.ended: dict[str, int] = {}
        """How many streams ended for each reason (slow_consumer, shutdown, ...): for tests and logs."""

    # an engine listener: called for every committed record, on the event loop; O(1)
    def poke(self, record: dict[str, Any] | None = None, entity: Any = None) -> None:
        self.commits += 1
        changed = self._changed
        if changed is not None:
            self._changed = None
            changed.set()

    def changed(self) -> asyncio.Event:
        """An event set by the next local commit."""
        if self._changed is None:
            self._changed = asyncio.Event()
        return self._changed

    def open_streams(self, key: str) -> int:
        return self._open.get(key, 0)

    def acquire(self, key: str) -> None:
        """Take one of ``key``'s stream slots; 429 ``too_many_streams`` when it holds them all."""
        held = self._open.get(key, 0)
        if held >= self.max_per_key:
            raise TooManyStreams(
                f"this key already holds {held} open audit streams on this server, the most it may "
                f"(OPSCORE_MAX_STREAMS_PER_KEY); close one or retry later",
                limit=self.max_per_key,
            )
        self._open[key] = held + 1

    def release(self, key: str) -> None:
        left = self._open.get(key, 0) - 1
        if left > 0:
            self._open[key] = left
        else:
            self._open.pop(key, None)

    def close(self) -> None:
        """End every open stream (the server is shutting down): each sends ``end`` and closes."""
        self.closing.set()


class EventStream(Response):
    """One client's stream, as a response that decides itself when to write and when to stop.

    Built by the route after :meth:`Hub.acquire` took the key's slot; released when it ends.
    """

    def __init__(self, hub: Hub, store: Store, query: AuditQuery, start: str, key: str) -> None:
        super().__init__(status_code=200)
        self.hub = hub
        self.store = store
        self.query = replace(query, limit=PAGE)
        self.position = start
        self.key = key
        self.sent = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        hub = self.hub
        try:
            gone = asyncio.Event()
            watcher = asyncio.create_task(self._watch(receive, gone))
            try:
                await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
                reason = await self._run(send, gone)
            finally:
                watcher.cancel()
        finally:
            hub.release(self.key)
        if reason is None:  # the client left
            return
        hub.ended[reason] = hub.ended.get(reason, 0) + 1
        detail = {
            "slow_consumer": "the client did not take events fast enough; resume with Last-Event-ID",
            "shutdown": "the server is shutting down; resume with Last-Event-ID (on another replica)",
            "max_age": "this stream has been open OPSCORE_STREAM_MAX_SECONDS; resume with Last-Event-ID",
        }[reason]
        log.info("stream ended", extra={"reason": reason, "keyName": self.key, "position": self.position})
        last = {"type": "http.response.body", "body": end_frame(reason, detail, self.position), "more_body": False}
        with contextlib.suppress(TimeoutError):
            # a client that takes nothing takes this neither: then the server closes the connection
            await asyncio.wait_for(send(last), END_GRACE)

    @staticmethod
    async def _watch(receive: Receive, gone: asyncio.Event) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                gone.set()
                return

    async def _write(self, send: Send, body: bytes) -> bool:
        """Send ``body``; ``False`` when the client did not take it within the send timeout."""
        message: Message = {"type": "http.response.body", "body": body, "more_body": True}
        try:
            await asyncio.wait_for(send(message), self.hub.send_timeout_seconds)
        except TimeoutError:
            return False
        return True

    async def _run(self, send: Send, gone: asyncio.Event) -> str | None:
        """Read and send until the client leaves (``None``), is too slow, or the server closes (the reason)."""
        hub, store, query = self.hub, self.store, self.query
        loop = asyncio.get_running_loop()
        if not await self._write(send, b"retry: 2000\n: stream open\n\n"):
            return "slow_consumer"
        last_write = last_read = opened = loop.time()
        while not gone.is_set():
            if hub.closing.is_set():
                return "shutdown"
            if loop.time() - opened >= hub.max_seconds:
                return "max_age"
            seen = hub.commits
            page = await store.stream_page(self.position, query)
            last_read = loop.time()
            if page:
                if not await self._write(send, b"".join(frame(p, t) for p, t in page)):
                    return "slow_consumer"
                self.position = page[-1][0]
                self.sent += len(page)
                last_write = loop.time()
                if len(page) == PAGE:
                    continue  # more is waiting: read on without sleeping
            if hub.commits == seen:  # nothing committed here since that read: wait to be poked or to poll
                now = loop.time()
                timeout = min(
                    hub.poll_seconds, max(0.0, min(last_write + hub.ping_seconds, opened + hub.max_seconds) - now)
                )
                await _first(hub.changed(), gone, hub.closing, seconds=timeout)
            gap = last_read + MIN_READ_GAP - loop.time()
            if gap > 0 and not gone.is_set():
                await asyncio.sleep(gap)
            if loop.time() - last_write >= hub.ping_seconds and not gone.is_set():
                if not await self._write(send, b": ping\n\n"):
                    return "slow_consumer"
                last_write = loop.time()
        return None


async def _first(*events: asyncio.Event, seconds: float) -> None:
    """Wait until one of ``events`` is set, or ``seconds``."""
    if any(e.is_set() for e in events):
        return
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
