"""Wire models only: what clients send and what they get, as DESIGN §2 and §5 fix them."""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

ENTITY_ID = Field(min_length=1, max_length=256, pattern=r"^[^\x00-\x1f/]+$")

MAX_NESTING = 64
"""Deepest nesting accepted in a body: records add a few levels and pydantic stops serialising at 255."""


def check_json_safe(value: Any, depth: int = 0) -> None:
    """Refuse what Python's JSON parsers accept but no JSON output can hold.

    ``json.loads`` (FastAPI) and pydantic's parser accept ``NaN``/``Infinity`` and lone
    surrogates (``"\\ud800"``); stored, they break the canonical bytes of an audit record
    (not UTF-8, not JSON) and every later answer that shows them. Deep nesting is stored
    fine but cannot be served back. All three are bad input: 422 at the door.
    """
    if depth > MAX_NESTING:
        raise ValueError(f"nested deeper than {MAX_NESTING} levels")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("NaN and Infinity are not JSON numbers")
    elif isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError("strings must be valid Unicode (no lone surrogates)") from exc
    elif isinstance(value, dict):
        for key, item in value.items():
            check_json_safe(key, depth + 1)
            check_json_safe(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            check_json_safe(item, depth + 1)


class Wire(BaseModel):
    """Base of every request body: the raw input must be representable as JSON again."""

    @model_validator(mode="before")
    @classmethod
    def _json_safe(cls, data: Any) -> Any:
        check_json_safe(data)
        return data


class AgentDetails(Wire):
    """An agent as AgentKit describes it (the webhook's ``agent_details``)."""

    model_config = ConfigDict(extra="allow")

    agentId: str = ENTITY_ID
    agentName: str | None = None
    version: str | None = None
    capabilities: list[str] = Field(default_factory=list)
    contactEndpoint: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)


class WebhookEvent(Wire):
    """AgentKit's registration webhook body."""

    event_type: Literal["REGISTER", "DEREGISTER"]
    agent_details: AgentDetails


class StateReport(Wire):
    """A state report as AgentKit's SDK sends it."""

    agentId: str | None = Field(default=None, description="must equal the path's agent id when present")
    timestamp: datetime = Field(description="when the agent was in this state (ISO-8601)")
    state: str = Field(min_length=1, max_length=64, description="the state the agent is in now")
    details: dict[str, Any] | None = Field(default=None, description="free-form; may carry opscore_task_id")


MAX_BATCH = 1000


class StateReportBatch(BaseModel):
    """Up to 1000 state reports; each is validated on its own and answered in its place."""

    reports: list[dict[str, Any]] = Field(
        max_length=MAX_BATCH,
        description='each `{"agentId", "timestamp", "state", "details"}` as in a single state report',
    )


class BatchResult(BaseModel):
    status: int
    body: dict[str, Any]


class StateReportBatchAnswer(BaseModel):
    results: list[BatchResult]


class TriggerRequest(Wire):
    """An operator asks for a trigger by name."""

    trigger: str = Field(min_length=1, max_length=64)
    details: dict[str, Any] | None = None


class StateReportAnswer(BaseModel):
    status: Literal["success"]
    agentId: str
    state: str
    previousState: str
    changed: bool
    revision: int
    auditId: int | None


class AgentView(BaseModel):
    agentId: str
    agentName: str | None
    version: str | None
    capabilities: list[str]
    contactEndpoint: str | None
    metadata: dict[str, Any]
    state: str
    revision: int
    lastSeenAt: str | None
    lastReportAt: str | None
    registeredAt: str
    updatedAt: str


class AgentPage(BaseModel):
    items: list[AgentView]
    nextCursor: str | None


class AgentStateView(BaseModel):
    agentId: str
    state: str
    details: dict[str, Any]
    timestamp: str | None
    revision: int


class AuditRecord(BaseModel):
    id: int
    entityType: str
    entityId: str
    seq: int
    event: str | None
    source: str | None
    dest: str | None
    outcome: Literal["applied", "rejected"]
    reason: str | None
    actor: str
    requestId: str | None
    details: dict[str, Any]
    reportedAt: str | None
    recordedAt: str
    prevHash: str
    hash: str


class AuditPage(BaseModel):
    items: list[AuditRecord]
    nextCursor: str | None


class VerifyAnswer(BaseModel):
    ok: bool
    entities: int
    records: int
    problems: list[dict[str, Any]]


class MachineTransition(BaseModel):
    trigger: str
    source: str
    dest: str


class MachineView(BaseModel):
    name: str
    initial: str
    states: list[str]
    terminal: list[str]
    transitions: list[MachineTransition]


class ErrorBody(BaseModel):
    detail: str
    code: str


class AgentStateAtView(AgentStateView):
    """``GET /agent/{id}/state``; the fields below are present only with ``?at=``."""

    at: str | None = Field(default=None, description="the moment asked about (UTC)")
    seq: int | None = Field(default=None, description="seq of the chain's last record at that moment (0: none)")
    asOfRecordId: int | None = Field(default=None, description="id of that record")
    since: str | None = Field(default=None, description="recordedAt of the transition into this state")
    previousState: str | None = Field(default=None, description="the state before that transition")
