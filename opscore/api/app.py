"""``create_app(settings)``: the FastAPI app, its lifespan and its ASGI middleware."""

from __future__ import annotations

import asyncio
import gc
import itertools
import logging
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from opscore import __version__, console
from opscore.api import errors as api_errors
from opscore.api import openapi
from opscore.api.deps import document_transition_headers
from opscore.api.fastroute import ANSWERED, FastRoutes
from opscore.api.routes import (
    agents,
    audit,
    batch,
    checkpoints,
    diagrams,
    health,
    machines,
    stream,
    webhooks,
    workflows,
)
from opscore.api.routes import metrics as metrics_route
from opscore.api.sessions import Sessions
from opscore.api.streams import Hub
from opscore.config import InvalidApiKeys, Settings
from opscore.engine import Engine
from opscore.errors import NoApiKey
from opscore.logs import access_line, access_log, configure
from opscore.metrics import Metrics
from opscore.storage import open_store
from opscore.workflows.dispatch import AgentKitClient, DispatchResult
from opscore.workflows.runs import Runs
from opscore.workflows.scheduler import Scheduler

log = logging.getLogger("opscore")

DESCRIPTION = """\
Ops-Core keeps a fleet of AI agents honest: every agent and workflow run is an explicit
finite-state machine, and every transition, applied or refused, leaves a hash-chained audit
record. All `/v1/opscore/*` paths need `Authorization: Bearer <OPSCORE_API_KEY>` except the
AgentKit webhook, which is HMAC-signed. Every error answers `{"detail", "code"}`.
"""


GC_THRESHOLDS = (50_000, 50, 100)


def tune_gc() -> None:
    """Make the cyclic garbage collector run rarely and skip what start-up built.

    With the defaults (700, 10, 10) it ran every few requests and its full passes walked
    every cached entity: a sixth of a state report's CPU under load and most of its p99
    (docs/performance.md, "Micro-costs"). Reference counting frees nearly everything here; the rare
    cycles (exceptions with tracebacks) wait for 50,000 allocations instead of 700.
    ``gc.freeze()`` moves modules, schemas and the machines out of every future pass.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def request_ids() -> itertools.count[int]:
    """A per-process counter under a random 64-bit prefix: 32 hex digits, unique like uuid4.

    ``uuid4()`` reads ``os.urandom`` per request (a visible share of the samples under load);
    a counter behind a random prefix is as unique and costs an addition.
    """
    return itertools.count(int.from_bytes(os.urandom(8)) << 64)


@dataclass(slots=True)
class GuardSettings:
    """What :class:`Guard` enforces and logs, set by the lifespan from the one ``Settings``.

    The middleware is built before the lifespan runs (Starlette builds its stack on the first
    ASGI call, the lifespan's own), so it cannot take the settings as arguments: it holds this
    object, which ``create_app`` also puts in ``app.state.guard`` for the lifespan to fill.
    Until then the defaults hold.
    """

    max_body_bytes: int = Settings.model_fields["max_body_bytes"].default
    access_log: bool = Settings.model_fields["access_log"].default
    metrics: Metrics | None = None
    """Where each answered request is counted (``opscore_http_*``), beside its access line."""

    def load(self, settings: Settings) -> None:
        self.max_body_bytes = settings.max_body_bytes
        self.access_log = settings.access_log


class Guard:
    """Pure ASGI middleware: request ids, 413 for bodies over the limit, one access line per request.

    A declared ``Content-Length`` over the limit is refused before reading; a chunked body is
    counted as it arrives and refused as soon as it passes the limit. The access line
    (``opscore.logs.access_line``) names the route template the router matched
    (``scope["route"]``), never the raw path, and the key name ``caller`` left in the scope.
    """

    def __init__(self, app: ASGIApp, settings: GuardSettings) -> None:
        self.app = app
        self.settings = settings
        self._ids = request_ids()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await self.serve(scope, receive, send, self.app)

    async def serve(self, scope: Scope, receive: Receive, send: Send, app: ASGIApp) -> None:
        """Guard one HTTP request answered by ``app`` (the rest of the stack, or a hot route's twin)."""
        started = time.perf_counter()
        settings = self.settings
        limit = settings.max_body_bytes
        request_id = None
        declared = too_large = False
        for name, value in scope["headers"]:
            if name == b"content-length":
                # more digits than any limit has: too large without int() (which refuses 4,300+ digits)
                too_large = value.isdigit() and (len(value) > 18 or int(value) > limit)
                declared = True
            elif name == b"x-request-id":
                request_id = value.decode("latin-1")[:200]
        # Ours always names the request (and its audit records); a client's is kept beside it.
        scope["opscore.request_id"] = f"{next(self._ids):032x}"
        scope["opscore.client_request_id"] = request_id
        if too_large:
            await _too_large(send, limit, scope["opscore.request_id"].encode("latin-1"))
            if settings.access_log and access_log.isEnabledFor(logging.INFO):
                self._log(scope, 413, started)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    # An HTTPException, not an OpsCoreError: FastAPI turns any other exception raised
                    # while it reads the body into "400 There was an error parsing the body".
                    raise HTTPException(413, f"request body is over the limit of {limit} bytes")
            return message

        rid = scope["opscore.request_id"].encode("latin-1")
        client_rid = scope["opscore.client_request_id"]
        echo = [] if client_rid is None else [(b"x-client-request-id", client_rid.encode("latin-1"))]
        status = 500  # what the client gets when the app raises before answering

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid), *echo]
            await send(message)

        try:
            # the server never hands over more than a declared Content-Length: count only chunked bodies
            await app(scope, receive if declared else counted, send_with_id)
        finally:
            metrics = settings.metrics
            if metrics is not None:
                metrics.request(
                    scope["method"], getattr(scope.get("route"), "path", None), status, time.perf_counter() - started
                )
            if settings.access_log and access_log.isEnabledFor(logging.INFO):
                self._log(scope, status, started)

    @staticmethod
    def _log(scope: Scope, status: int, started: float) -> None:
        route = scope.get("route")
        access_line(
            scope["method"],
            getattr(route, "path", None),
            status,
            time.perf_counter() - started,
            scope["opscore.request_id"],
            scope["opscore.client_request_id"],
            scope.get("opscore.key"),
        )


class OpsCoreApp(FastAPI):
    """FastAPI, with the hot routes' twins answered in front of its middleware stack (``api/fastroute.py``).

    A request a twin matches goes through a :class:`Guard` of its own (same settings: request
    id, body limit, access line, metrics) straight to the twin: FastAPI's per-request telemetry
    check, Starlette's error and exception middlewares and the routing walk are skipped. An
    unexpected exception is answered as ``ServerErrorMiddleware`` answers it (the app's
    ``Exception`` handler, sent outside the guard) and re-raised for the server to log.
    FastAPI's native telemetry does not see these requests; the access line and the metrics do.
    """

    twins: FastRoutes | None = None
    twin_guard: Guard | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        twins = self.twins
        if twins is not None and scope["type"] == "http":
            if self.root_path:
                scope["root_path"] = self.root_path
            answer = twins.match(scope)
            if answer is not None:
                scope["app"] = self
                assert self.twin_guard is not None
                try:
                    await self.twin_guard.serve(scope, receive, send, answer)
                except Exception as exc:
                    if not scope.get(ANSWERED):
                        response = await twins.server_error(scope, exc)
                        await response(scope, receive, send)
                    raise
                return
        await super().__call__(scope, receive, send)


async def _too_large(send: Send, limit: int, request_id: bytes) -> None:
    body = (
        b'{"detail":"request body is over the limit of ' + str(limit).encode() + b' bytes","code":"payload_too_large"}'
    )
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"x-request-id", request_id),
    ]
    await send({"type": "http.response.start", "status": 413, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class CountedAgentKit(AgentKitClient):
    """The AgentKit client, counting each dispatch's outcome (``opscore_dispatches_total``)."""

    def __init__(self, base_url: str, metrics: Metrics) -> None:
        super().__init__(base_url)
        self.metrics = metrics

    async def run(self, agent_id: str, body: dict[str, Any]) -> DispatchResult:
        result = await super().run(agent_id, body)
        self.metrics.dispatched(result.outcome)
        return result


def start_streams(app: FastAPI) -> Hub:
    """The live stream's hub: poked by every local commit, polling for the other replicas'."""
    conf: Settings = app.state.settings
    hub = Hub(
        max_per_key=conf.max_streams_per_key,
        poll_seconds=conf.stream_poll_seconds,
        ping_seconds=conf.stream_ping_seconds,
        send_timeout_seconds=conf.stream_send_timeout_seconds,
        max_seconds=conf.stream_max_seconds,
    )
    app.state.engine.listeners.append(hub.poke)
    app.state.streams = hub
    return hub


async def start_workflows(app: FastAPI) -> None:
    """Runs, their AgentKit client and the scheduler; the engine tells runs about agent reports."""
    conf: Settings = app.state.settings
    engine: Engine = app.state.engine
    client = CountedAgentKit(conf.agentkit_api_url, app.state.metrics)
    runs = Runs(engine, client, default_timeout=conf.task_timeout_seconds)
    engine.listeners.append(runs.listener)
    scheduler = Scheduler(runs, agent_timeout=conf.agent_timeout_seconds)
    app.state.runs = runs
    app.state.agentkit = client
    app.state.scheduler = scheduler
    await scheduler.start()


async def stop_workflows(app: FastAPI) -> None:
    await app.state.scheduler.stop()
    await app.state.runs.cancel_background()
    await app.state.agentkit.close()


def create_app(settings: Settings | None = None, *, fast_routes: bool = True) -> FastAPI:
    """The Ops-Core app. ``settings`` default to the environment, read at start-up, not import.

    ``fast_routes=False`` answers the hot routes through FastAPI too (their twins off,
    ``api/fastroute.py``): what the equivalence tests compare the twins against.
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        conf = settings if settings is not None else Settings()
        configure(conf.log_level)
        try:
            keys = conf.api_keys
        except InvalidApiKeys as exc:
            log.critical("refusing to start", extra={"detail": str(exc), "code": "invalid_api_key"})
            raise
        if not keys:
            raise NoApiKey(
                "OPSCORE_API_KEY is not set: set it (or run `opscore serve --generate-key`); "
                "Ops-Core never falls back to a known key",
            )
        log.info("api keys", extra={"keyNames": [key.name for key in keys]})
        guard.load(conf)
        store = open_store(
            conf.database_url,
            pool_min=conf.pg_pool_min,
            pool_max=conf.pg_pool_max,
            pool_timeout=conf.pg_pool_timeout,
            pooler=conf.pg_pooler,
        )
        await store.open()
        engine = Engine(store, max_clock_skew=conf.max_clock_skew_seconds)
        engine.listeners.append(metrics.transition)
        engine.commit_timer = metrics.commit
        app.state.settings = conf
        app.state.api_keys = keys
        app.state.engine = engine
        app.state.sessions = Sessions.from_settings(conf, keys)
        start_streams(app)
        app.state.extensions = {}
        for hook in startup_hooks:
            await hook(app)
        tune_gc()
        loop = type(asyncio.get_running_loop()).__module__  # "uvloop" when uvicorn picked it
        log.info("started", extra={"store": store.backend, "version": __version__, "loop": loop})
        try:
            yield
        finally:
            app.state.streams.close()
            for hook in reversed(shutdown_hooks):
                await hook(app)
            await store.close()

    app = OpsCoreApp(
        title="Ops-Core",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,  # FastAPI's pages load their scripts from a CDN: openapi.install serves ours
        redoc_url=None,
    )
    metrics = app.state.metrics = Metrics()
    startup_hooks: list[Any] = [start_workflows, checkpoints.start]
    shutdown_hooks: list[Any] = [checkpoints.stop, stop_workflows]  # run in reverse: checkpoints sign last
    app.state.startup_hooks = startup_hooks
    app.state.shutdown_hooks = shutdown_hooks
    api_errors.install(app)
    modules = (
        health,
        agents,
        batch,
        stream,
        audit,
        checkpoints,
        machines,
        diagrams,
        webhooks,
        workflows,
        metrics_route,
    )
    for module in modules:
        document_transition_headers(module.router)
        app.include_router(module.router)
    openapi.install(app)
    console.install(app)
    guard = GuardSettings(metrics=metrics)
    if settings is not None:
        guard.load(settings)
    app.state.guard = guard
    app.add_middleware(Guard, settings=guard)
    if fast_routes:
        app.twins = FastRoutes.of(app, [module.router for module in modules])
        app.twin_guard = Guard(app, guard)  # only its serve() is used: with the twin's answer
    app.state.fast_routes = app.twins
    return app
