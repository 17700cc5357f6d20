"""Ops-Core's Python client: ``Client`` (blocking) and ``AsyncClient`` (asyncio), one method per route.

An agent reports its state; an operator reads what happened to it::

    from opscore.client import Client, IllegalTransition

    with Client("http://127.0.0.1:8000", api_key) as ops:
        ops.agents.report("agent-7", "idle")                 # StateReportAnswer(state='idle', changed=True, ...)
        for record in ops.agents.audit("agent-7"):           # every page, oldest first
            print(record.seq, record.event, record.source, "->", record.dest, record.outcome)
        try:
            ops.agents.report("agent-7", "registered")
        except IllegalTransition as refused:
            print(refused.allowed)                           # ['initializing', 'active', 'error', ...]

Answers are the pydantic models the server declares (:mod:`opscore.wire`); errors are the
:mod:`opscore.errors` classes of their ``code``, with their fields; a server that cannot be
reached raises :class:`ServerUnreachable`. ``Client.from_settings()`` reads ``OPSCORE_API_URL``
and ``OPSCORE_API_KEY`` (environment, then ``.env``) as the CLI does.

Importing this package imports httpx and pydantic, never the server (FastAPI, the storage
drivers): ``tests/client/test_imports.py`` keeps it so.
"""

from __future__ import annotations

from opscore.client._async import AsyncAgents, AsyncAudit, AsyncAuditStream, AsyncClient, AsyncDefinitions, AsyncRuns
from opscore.client._base import Retry, ServerUnreachable, UnexpectedResponse, settings_of
from opscore.client._sync import Agents, Audit, AuditStream, Client, Definitions, Runs
from opscore.errors import (
    Conflict,
    IdempotencyKeyInUse,
    IdempotencyKeyReused,
    IllegalTransition,
    Invalid,
    InvalidDefinition,
    NotFound,
    NotYetCreated,
    OpsCoreError,
    PreconditionFailed,
    Refused,
    RendererMissing,
    StaleReport,
    TimestampInFuture,
    Unauthorized,
    Unavailable,
    UnknownEntity,
    UnknownMachine,
    UnknownState,
    UnknownTrigger,
)

__all__ = [
    "Agents",
    "AsyncAgents",
    "AsyncAudit",
    "AsyncAuditStream",
    "AsyncClient",
    "AsyncDefinitions",
    "AsyncRuns",
    "Audit",
    "AuditStream",
    "Client",
    "Conflict",
    "Definitions",
    "IdempotencyKeyInUse",
    "IdempotencyKeyReused",
    "IllegalTransition",
    "Invalid",
    "InvalidDefinition",
    "NotFound",
    "NotYetCreated",
    "OpsCoreError",
    "PreconditionFailed",
    "Refused",
    "RendererMissing",
    "Retry",
    "Runs",
    "ServerUnreachable",
    "StaleReport",
    "TimestampInFuture",
    "Unauthorized",
    "Unavailable",
    "UnexpectedResponse",
    "UnknownEntity",
    "UnknownMachine",
    "UnknownState",
    "UnknownTrigger",
    "settings_of",
]
