"""The HTTP server ``opscore serve`` runs: uvicorn, with the limits a public-facing service needs.

uvicorn (0.54, httptools parser) on its own, measured against Ops-Core before this module:

- buffers request headers without bound: a 100 MiB header on the open ``/health`` was
  accepted and the process grew from 65 to 270 MB;
- holds a connection that sends half a request for ever: it has a keep-alive timeout between
  requests, none while one is being read, so 50 trickling clients were held 40 s and 300 of
  them took ``/health`` down;
- answers its ``limit_concurrency`` with a ``text/plain`` 503 (clients read ``detail``);
- re-raises SIGTERM after its graceful shutdown, so the process died by the signal (status
  143) before the last log lines (``Application shutdown complete``) were written.

:class:`Protocol` (a small subclass of uvicorn's httptools protocol) and :class:`Server` fix
these with the settings ``OPSCORE_MAX_HEADER_BYTES``, ``OPSCORE_READ_TIMEOUT_SECONDS`` and
``OPSCORE_MAX_CONNECTIONS``; each refusal is a JSON body ``{"detail", "code"}`` and the
connection is closed. What a request costs in this protocol is in ``docs/performance.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from collections import Counter
from collections.abc import Generator
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from opscore.config import Settings

log = logging.getLogger("opscore.server")

STARTUP_FAILURE = 3
"""uvicorn's exit status when the app's start-up failed."""

SWEEP_TICKS = 5
"""uvicorn's main loop ticks every 0.1 s: look for overdue requests every 0.5 s."""


@dataclass(frozen=True, slots=True)
class Limits:
    """What the protocol enforces on every connection, from :class:`~opscore.config.Settings`."""

    max_header_bytes: int
    read_timeout: float
    max_connections: int

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        return cls(settings.max_header_bytes, settings.read_timeout_seconds, settings.max_connections)


class Config(uvicorn.Config):
    """uvicorn's ``Config`` carrying :class:`Limits` to every protocol instance, and refusal counts."""

    def __init__(self, app: Any, *, limits: Limits, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.limits = limits
        self.refusals: Counter[str] = Counter()


def _response(status: int, detail: str, code: str, default_headers: list[tuple[bytes, bytes]]) -> bytes:
    """A whole HTTP/1.1 response with a JSON error body that closes the connection."""
    body = json.dumps({"detail": detail, "code": code}).encode()
    head = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n".encode()]
    head += [name + b": " + value + b"\r\n" for name, value in default_headers]
    head.append(b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % len(body))
    return b"".join(head) + body


async def _busy(scope: Any, receive: Any, send: Any) -> None:
    """The answer over ``OPSCORE_MAX_CONNECTIONS``: uvicorn's 503 with a JSON body and Retry-After."""
    body = json.dumps(
        {"detail": "the server is at its connection limit; retry shortly", "code": "too_many_connections"}
    ).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"retry-after", b"1"),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


COALESCE_BYTES = 65536
"""A body chunk up to this size is joined to the head held before it (a copy); a larger one is written after it."""


class OneWrite:
    """The transport a response cycle writes through: a response's head leaves with its body, in one write.

    uvicorn writes the status line and headers, then the body, in two ``transport.write``
    calls: two ``send`` syscalls and two TCP segments, each waking the client. Starlette (and
    the hot routes' twins) send the body in the same turn of the event loop as the head, so
    the first write is held and joined to the next one. A head whose body does not follow in
    that turn (a stream waiting for its first event) goes out at the next turn of the loop,
    and ``close`` writes what is held first: nothing is reordered or kept back.
    """

    __slots__ = ("_held", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: bytes | None = None

    def write(self, data: bytes) -> None:
        held = self._held
        if held is None:
            self._held = bytes(data)
            self._loop.call_soon(self.flush)
            return
        self._held = None
        if len(data) <= COALESCE_BYTES:
            self._transport.write(held + data)
        else:
            self._transport.write(held)
            self._transport.write(data)

    def flush(self) -> None:
        held, self._held = self._held, None
        if held is not None and not self._transport.is_closing():
            self._transport.write(held)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)


class Protocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a header size limit, a read deadline and a JSON 503.

    - **Header size**: bytes received while a request's headers are incomplete are counted
      before the parser buffers them; past ``max_header_bytes`` the client gets 431 and the
      connection is closed, so memory grows by at most the limit plus one read.
    - **Read deadline**: a request must arrive whole (headers and body) within ``read_timeout``
      of its first byte (of the connection, for the first request); :class:`Server` sweeps
      overdue connections twice a second and answers 408 (or just closes when a response has
      begun). Between requests uvicorn's keep-alive timeout applies as before.
    - **Connections**: over ``max_connections`` open connections a request is answered 503
      with a JSON body (uvicorn's ``limit_concurrency`` check, same place, same counts).
    - **One write per response**: each request's cycle writes through :class:`OneWrite`.
    """

    def __init__(
        self,
        config: uvicorn.Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        limits: Limits = getattr(config, "limits", None) or Limits.from_settings(Settings.model_construct())
        refusals: Counter[str] | None = getattr(config, "refusals", None)
        self.refusals = refusals if refusals is not None else Counter()
        self.max_header_bytes = limits.max_header_bytes
        self.read_timeout = limits.read_timeout
        self.max_connections = limits.max_connections
        self.read_deadline: float | None = None
        self.header_bytes = 0
        self.awaiting_headers = True
        self.refused = False
        self.one_write: OneWrite | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.read_deadline = self.loop.time() + self.read_timeout
        self.one_write = OneWrite(transport, self.loop)

    def data_received(self, data: bytes) -> None:
        if self.refused:
            return
        if self.awaiting_headers:
            self.header_bytes += len(data)
        super().data_received(data)
        if self.awaiting_headers and self.header_bytes > self.max_header_bytes and not self.refused:
            self.refuse(
                431, f"request headers are over the limit of {self.max_header_bytes} bytes", "headers_too_large"
            )

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self.read_deadline is None:
            self.read_deadline = self.loop.time() + self.read_timeout

    def on_headers_complete(self) -> None:
        if self.refused:
            return
        self.awaiting_headers = False
        if self.header_bytes > self.max_header_bytes and self._header_size() > self.max_header_bytes:
            # the whole header block arrived in one read: the raw count could include a body
            self.refuse(
                431, f"request headers are over the limit of {self.max_header_bytes} bytes", "headers_too_large"
            )
            return
        if len(self.connections) > self.max_connections or len(self.tasks) >= self.max_connections:
            self.refusals["too_many_connections"] += 1
            app, self.app = self.app, _busy
            try:
                super().on_headers_complete()
            finally:
                self.app = app
            return
        super().on_headers_complete()
        self.cycle.transport = self.one_write  # type: ignore[assignment]

    # After a refusal the parser finishes the chunk it was fed; the callbacks that would start
    # or feed a request are cut off (url and headers may still be collected: one chunk at most).
    def on_body(self, body: bytes) -> None:
        if not self.refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self.refused:
            return
        self.read_deadline = None
        self.header_bytes = 0
        self.awaiting_headers = True
        super().on_message_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self.read_deadline = None
        super().connection_lost(exc)

    def _header_size(self) -> int:
        return len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)

    def refuse(self, status: int, detail: str, code: str) -> None:
        """Answer ``status`` with a JSON error unless a response has begun, and close the connection."""
        self.refused = True
        self.read_deadline = None
        self.refusals[code] += 1
        if self.transport.is_closing():
            return
        cycle = self.cycle
        answering = cycle is not None and not cycle.response_complete and not self.awaiting_headers
        if not (answering and cycle.response_started):
            self.transport.write(_response(status, detail, code, self.server_state.default_headers))
        if answering:
            cycle.keep_alive = False
        self.transport.close()

    def read_timed_out(self) -> None:
        """Called by :class:`Server` when the request did not arrive whole in time."""
        self.refuse(408, f"the request did not arrive whole within {self.read_timeout:g} s", "read_timeout")


class Server(uvicorn.Server):
    """uvicorn's server that exits 0 after a graceful SIGTERM and sweeps overdue requests."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        """uvicorn's handlers, without re-raising the signal once the graceful shutdown is done.

        uvicorn re-raises a captured SIGTERM after restoring the default handler, which kills the
        process (status 143) before ``atexit`` and ``opscore serve`` flush the last log lines. A
        shutdown asked for by a signal and completed is a clean exit: status 0.
        """
        with super().capture_signals():
            try:
                yield
            finally:
                self._captured_signals.clear()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """End the open audit streams first (each says ``event: end``): uvicorn waits for open responses."""
        hub = getattr(getattr(self.config.app, "state", None), "streams", None)
        if hub is not None:
            hub.close()
        await super().shutdown(sockets)

    async def on_tick(self, counter: int) -> bool:
        if counter % SWEEP_TICKS == 0:
            self.sweep()
        return await super().on_tick(counter)

    def sweep(self) -> None:
        """Drop connections whose request is overdue; log the refusals since the last sweep (one line)."""
        now = asyncio.get_running_loop().time()
        for connection in list(self.server_state.connections):
            if isinstance(connection, Protocol) and now >= (connection.read_deadline or now + 1):
                connection.read_timed_out()
        refusals: Counter[str] | None = getattr(self.config, "refusals", None)
        if refusals:
            log.warning(
                "refused requests",
                extra={"refusals": dict(refusals), "connections": len(self.server_state.connections)},
            )
            refusals.clear()


def run(app: Any, settings: Settings) -> int:
    """Serve ``app`` until SIGTERM/SIGINT with the limits of ``settings``; the exit status.

    Logging must already be configured (``opscore.logs.configure``) so that uvicorn's first
    lines are JSON too; uvicorn's own access log stays off (``Guard`` writes one per request).
    """
    config = Config(
        app,
        host=settings.host,
        port=settings.port,
        http=Protocol,
        log_config=None,
        access_log=False,
        timeout_keep_alive=settings.keep_alive_seconds,
        timeout_graceful_shutdown=10,
        limits=Limits.from_settings(settings),
    )
    server = Server(config)
    server.run()
    return 0 if server.started else STARTUP_FAILURE
