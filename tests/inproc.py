"""The real app in this process: ``create_app(Settings(...))`` under its lifespan, over ASGI.

HTTP behaviour is tested this way (STYLE 20): the same routes, middleware, error handlers and
store as a served process, without a process per test. Real processes are kept for what is
about processes (signals, kill -9, replicas, the CLI).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import AsyncIterator, Coroutine
from typing import Any, TypeVar

import httpx
from fastapi import FastAPI

from opscore.api import create_app
from opscore.config import Settings

T = TypeVar("T")

API_KEY = "inproc-test-key-0123456789"
WEBHOOK_SECRET = "inproc-webhook-secret"


@contextlib.asynccontextmanager
async def serve(database_url: str, **settings: Any) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """The app on ``database_url``, started, and a client holding a valid key."""
    conf = Settings(
        database_url=database_url,
        api_key=settings.pop("api_key", API_KEY),
        webhook_secret=settings.pop("webhook_secret", WEBHOOK_SECRET),
        agentkit_api_url=settings.pop("agentkit_api_url", "http://127.0.0.1:9"),
        **settings,
    )
    app = create_app(conf)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        headers = {"Authorization": f"Bearer {API_KEY}"}
        async with httpx.AsyncClient(
            transport=transport, base_url="http://opscore.test", headers=headers, timeout=60
        ) as client:
            yield app, client


class _Loop:
    """An event loop in a thread of its own: where a synchronously tested app lives."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="inproc-app", daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 120) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class _Bridge(httpx.BaseTransport):
    """A synchronous transport to an ASGI app running on :class:`_Loop`'s loop."""

    def __init__(self, app: FastAPI, loop: _Loop) -> None:
        self.inner = httpx.ASGITransport(app=app)
        self.loop = loop

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        body = request.read()
        if "content-length" in request.headers:
            forwarded = httpx.Request(request.method, request.url, headers=request.headers, content=body)
        else:  # sent chunked: the app must see it arrive without a declared length too

            async def chunks() -> AsyncIterator[bytes]:
                yield body

            forwarded = httpx.Request(request.method, request.url, headers=request.headers, content=chunks())

        async def call() -> tuple[int, list[tuple[bytes, bytes]], bytes]:
            answer = await self.inner.handle_async_request(forwarded)
            content = await answer.aread()
            return answer.status_code, answer.headers.raw, content

        status, headers, content = self.loop.run(call())
        return httpx.Response(status, headers=headers, content=content, request=request)


class InProcess:
    """The app on ``database_url`` in this process, used like a server (:class:`tests.servers.Server`).

    ``client()`` holds a valid key, ``anonymous()`` none; both talk to the same running app
    (its lifespan started once, in a thread with its own event loop), so a test reads as it
    would against a real server, without a process.
    """

    url = "http://opscore.test"

    def __init__(self, database_url: str, **settings: Any) -> None:
        self.database_url = database_url
        self.api_key = settings.pop("api_key", API_KEY)
        self.webhook_secret = settings.pop("webhook_secret", WEBHOOK_SECRET)
        self.settings = Settings(
            database_url=database_url,
            api_key=self.api_key,
            webhook_secret=self.webhook_secret,
            agentkit_api_url=settings.pop("agentkit_api_url", "http://127.0.0.1:9"),
            **settings,
        )
        self.app = create_app(self.settings)
        self._loop: _Loop | None = None
        self._stop: asyncio.Event | None = None
        self._lifespan: concurrent.futures.Future[None] | None = None

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    def start(self) -> InProcess:
        loop = self._loop = _Loop()
        started = threading.Event()

        async def live() -> None:
            self._stop = asyncio.Event()
            async with self.app.router.lifespan_context(self.app):
                started.set()
                await self._stop.wait()

        self._lifespan = asyncio.run_coroutine_threadsafe(live(), loop.loop)
        while not started.wait(0.05):
            if self._lifespan.done():
                try:
                    self._lifespan.result()  # raises what the start-up raised
                finally:
                    loop.close()
                    self._loop = None
        return self

    def stop(self) -> None:
        if self._loop is None:
            return
        if self._stop is not None:
            self._loop.loop.call_soon_threadsafe(self._stop.set)
        if self._lifespan is not None:
            self._lifespan.result(30)
        self._loop.close()
        self._loop = None

    def client(self, **kwargs: Any) -> httpx.Client:
        headers = {**self.headers, **kwargs.pop("headers", {})}
        return self.anonymous(headers=headers, **kwargs)

    def anonymous(self, **kwargs: Any) -> httpx.Client:
        assert self._loop is not None, "start() first"
        return httpx.Client(transport=_Bridge(self.app, self._loop), base_url=self.url, timeout=60, **kwargs)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the app's loop (to reach the engine or the store directly)."""
        assert self._loop is not None
        return self._loop.run(coro)
