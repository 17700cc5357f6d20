"""The real app in this process: ``create_app(Settings(...))`` under its lifespan, over ASGI.

HTTP behaviour is tested this way (STYLE 20): the same routes, middleware, error handlers and
store as a served process, without a process per test. Real processes are kept for what is
about processes (signals, kill -9, replicas, the CLI).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
from fastapi import FastAPI

from opscore.api import create_app
from opscore.config import Settings

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
