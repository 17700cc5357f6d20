"""Wire models only: what clients send and what they get, as DESIGN §2 and §5 fix them."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import Path
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from opscore.errors import UnacceptableInput
from opscore.inputs import MAX_ID_LENGTH, check_id, check_json


def _acceptable(data: Any) -> Any:
    """:func:`opscore.inputs.check_json` as a pydantic check: its ``code`` becomes the error type."""
    try:
        check_json(data)
    except UnacceptableInput as exc:
        raise PydanticCustomError(exc.code, exc.detail) from exc
    return data


def _acceptable_id(value: str) -> str:
    try:
        return check_id(value)
    except UnacceptableInput as exc:
        raise PydanticCustomError(exc.code, exc.detail) from exc


ID_SCHEMA: dict[str, Any] = {"minLength": 1, "maxLength": MAX_ID_LENGTH, "pattern": "^[^\\x00-\\x1f\\x7f-\\x9f/]+$"}
"""What :func:`opscore.inputs.check_id` accepts, for the OpenAPI (the check itself is the validator)."""

EntityId = Annotated[str, AfterValidator(_acceptable_id), Field(json_schema_extra=ID_SCHEMA)]
"""An id in a body: the one rule of :func:`opscore.inputs.check_id` (422 ``invalid_id``)."""


_CHECKED_ID = AfterValidator(_acceptable_id)

# Ids in the URL path, checked by the same rule as ids in bodies.
AgentIdPath = Annotated[str, Path(description="the agent's id", json_schema_extra=ID_SCHEMA), _CHECKED_ID]
SessionIdPath = Annotated[str, Path(description="the run's sessionId", json_schema_extra=ID_SCHEMA), _CHECKED_ID]
TaskIdPath = Annotated[str, Path(description="the task's id within its run", json_schema_extra=ID_SCHEMA), _CHECKED_ID]
DefinitionIdPath = Annotated[
    str, Path(description="the workflow definition's id", json_schema_extra=ID_SCHEMA), _CHECKED_ID
]


class Wire(BaseModel):
    """Base of every request body that stores client data: checked by :func:`opscore.inputs.check_json`."""

    @model_validator(mode="before")
    @classmethod
    def _json_safe(cls, data: Any) -> Any:
        return _acceptable(data)


class AgentDetails(Wire):
    """An agent as AgentKit describes it (the webhook's ``agent_details``).

    Fields other than these are ignored: the agent's stored data also holds Ops-Core's own
    bookkeeping (the workflow claim), which no request body may write.
    """

    model_config = ConfigDict(extra="ignore")

    agentId: EntityId
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

    agentId: EntityId | None = Field(default=None, description="must equal the path's agent id when present")
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
