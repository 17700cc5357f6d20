"""Wire models only: what clients send and what they get, as DESIGN §2 and §5 fix them."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import Path
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictFloat, StringConstraints, model_validator
from pydantic.json_schema import SkipJsonSchema
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


class Checkpoint(BaseModel):
    """One signed checkpoint line (DESIGN §12), exactly as in ``OPSCORE_CHECKPOINT_FILE``."""

    v: int
    n: int = Field(description="line number, from 1")
    position: str = Field(description="the live stream's position of the last record covered")
    at: str = Field(description="when it was signed (UTC ISO-8601)")
    records: int = Field(description="records covered since the stream's start")
    full: bool = Field(description="true on the first line: it holds every head; later lines the heads that moved")
    heads: dict[str, dict[str, tuple[int, str]]] = Field(description="{entityType: {entityId: [seq, hash]}}")
    prev: str = Field(description="SHA-256 of the previous line's canonical JSON (64 zeros for the first)")
    keyId: str = Field(description="SHA-256 of the raw Ed25519 public key")
    sig: str = Field(description="base64 Ed25519 signature of the line's canonical JSON without sig")


class CheckpointPage(BaseModel):
    items: list[Checkpoint]
    nextCursor: str | None
    keyId: str | None = Field(description="the signing key's id; null when this server signs no checkpoints")
    halted: str | None = Field(description="why this server stopped checkpointing, or null")


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
    """Every error answer: ``detail`` for people, ``code`` for programs, and per code a few fields.

    For example ``illegal_transition`` adds ``from``, ``to`` and ``allowed``;
    ``validation_error`` adds ``errors`` (``loc``, ``msg``, ``type`` each); ``invalid_definition``
    adds ``problems``; ``unknown_state`` and ``unknown_trigger`` add ``valid``.
    """

    detail: str
    code: str


class AgentStateAtView(AgentStateView):
    """``GET /agent/{id}/state``; the fields below are present only with ``?at=``."""

    at: str | None = Field(default=None, description="the moment asked about (UTC)")
    seq: int | None = Field(default=None, description="seq of the chain's last record at that moment (0: none)")
    asOfRecordId: int | None = Field(default=None, description="id of that record")
    since: str | None = Field(default=None, description="recordedAt of the transition into this state")
    previousState: str | None = Field(default=None, description="the state before that transition")


# -- answers without a model until now (each 2xx of /openapi.json has a typed schema) -----------


class HealthAnswer(BaseModel):
    """``GET /health`` while the store answers."""

    status: Literal["ok"]
    version: str
    store: str = Field(description="the storage backend: sqlite, postgresql or memory")


class HealthUnavailable(ErrorBody):
    """``GET /health`` (503) while the store does not answer: the error shape plus ``status``/``store``."""

    status: Literal["unavailable"]
    store: str


class ReadyAnswer(BaseModel):
    """``GET /ready`` while a write commits."""

    status: Literal["ready"]
    version: str
    store: str


class MachineList(BaseModel):
    items: list[MachineView]


class WebhookRegistered(BaseModel):
    """A REGISTER webhook: the agent as it now is (a known agent keeps its state)."""

    status: Literal["success"]
    event: Literal["REGISTER"]
    created: bool
    agent: AgentView


class WebhookDeregistered(BaseModel):
    status: Literal["success"]
    event: Literal["DEREGISTER"]
    agentId: str
    state: str


def _no_default(schema: dict[str, Any]) -> None:
    """Hide the ``None`` default of an optional field whose JSON form is never ``null``."""
    schema.pop("default", None)


class TaskDefinition(BaseModel):
    """One task of a workflow definition (``opscore/workflows/definitions.py`` validates it).

    ``agentCapability`` picks any idle agent with that capability, ``agentId`` pins one agent;
    at least one of them is needed. ``nextTaskId`` runs after success, ``fallbackTaskId``
    after the retries are spent.
    """

    model_config = ConfigDict(extra="allow")

    taskId: str = Field(
        min_length=1, max_length=200, pattern=r"^[^:/]*[^\s:/][^:/]*$", description="unique in the definition"
    )
    name: str | SkipJsonSchema[None] = Field(
        default=None, description="default: the taskId", json_schema_extra=_no_default
    )
    agentCapability: str | None = Field(default=None, min_length=1, description="a capability an agent declares")
    agentId: str | None = Field(default=None, min_length=1, description="run on this agent only")
    parameters: dict[str, Any] | None = Field(default=None, description="sent to the agent as task_parameters")
    nextTaskId: str | None = Field(default=None, min_length=1, description="the task after this one succeeds")
    fallbackTaskId: str | None = Field(
        default=None, min_length=1, description="the task to run when this one fails for good"
    )
    maxRetries: int = Field(default=3, ge=0, le=100, description="attempts after the first failure")
    timeoutSeconds: float = Field(
        default=300,
        gt=0,
        le=7 * 86400,
        description="an attempt fails when the agent has not finished by then (default OPSCORE_TASK_TIMEOUT_SECONDS)",
    )
    retryBackoffSeconds: float = Field(
        default=1, ge=0, le=86400, description="wait before a retry, doubled at each further one"
    )


class WorkflowDefinition(BaseModel):
    """A workflow definition as published (JSON or YAML) and as stored.

    Besides this schema, the tasks must form one chain or tree along `nextTaskId` and
    `fallbackTaskId`: every reference resolves, exactly one start task (one no other task
    points to), every task reachable from it, no cycle. A 422 `invalid_definition` lists
    every problem at once. `id` and `version` may be written as numbers (YAML `version: 1.0`);
    they are stored as text.
    """

    model_config = ConfigDict(extra="allow")

    id: Annotated[str, StringConstraints(max_length=200, pattern=r"^[^/]*[^\s/][^/]*$")] | StrictFloat = Field(
        union_mode="left_to_right", description="no '/'"
    )
    version: Annotated[str, StringConstraints(pattern=r"\S")] | StrictFloat = Field(
        union_mode="left_to_right", description="id + version is immutable once stored"
    )
    name: str | None = Field(default=None, description="default: the id")
    description: str | None = None
    tasks: list[TaskDefinition] = Field(min_length=1, max_length=1000)


class DefinitionList(BaseModel):
    items: list[WorkflowDefinition] = Field(description="oldest first")
    nextCursor: str | None


class RunStarted(BaseModel):
    sessionId: str
    workflowId: str
    version: str
    state: str


class TaskView(BaseModel):
    """One task of a run: its state and its attempts (``taskEntityId`` is ``<sessionId>:<taskId>``)."""

    taskId: str | None
    taskEntityId: str
    name: str | None
    state: str
    revision: int
    agentCapability: str | None
    agentId: str | None = Field(description="the agent of the current or last attempt")
    pinnedAgentId: str | None
    attempt: int
    failures: int
    maxRetries: int | None
    timeoutSeconds: float | None
    attempts: list[dict[str, Any]] = Field(
        description='`{"attempt", "agentId", "dispatchedAt", "outcome", "error"}` per attempt'
    )
    result: Any = Field(description="what the agent reported on success")
    error: Any = Field(description="why the last attempt failed")
    deadlineAt: str | None
    retryAt: str | None
    nextTaskId: str | None
    fallbackTaskId: str | None
    updatedAt: str


class RunSummary(BaseModel):
    sessionId: str
    workflowId: str | None
    workflowVersion: str | None
    workflowName: str | None
    state: str
    revision: int
    agentId: str | None = Field(description="the agent that started the run")
    currentTaskId: str | None
    path: list[str] = Field(description="the task ids in the order the run reached them")
    reason: str | None
    createdAt: str
    updatedAt: str


class RunView(RunSummary):
    initialPayload: dict[str, Any]
    results: dict[str, Any] = Field(description="each finished task's result, by taskId")
    tasks: list[TaskView]


class RunPage(BaseModel):
    items: list[RunSummary]
    nextCursor: str | None


# -- examples: valid requests, shown by /docs and /redoc; tests/api/test_openapi.py sends each ---
# (no ``None`` in them: FastAPI drops null values when it writes the OpenAPI document)

EXAMPLE_AGENT_ID = "agent-7"
EXAMPLE_TIME = "2026-11-23T10:00:00Z"

AGENT_DETAILS_EXAMPLE: dict[str, Any] = {
    "agentId": EXAMPLE_AGENT_ID,
    "agentName": "Summariser",
    "version": "1.0",
    "capabilities": ["summarise_text"],
    "contactEndpoint": "http://127.0.0.1:9000/agent",
    "metadata": {"team": "docs"},
}
WEBHOOK_EXAMPLE: dict[str, Any] = {"event_type": "REGISTER", "agent_details": AGENT_DETAILS_EXAMPLE}
STATE_REPORT_EXAMPLE: dict[str, Any] = {
    "agentId": EXAMPLE_AGENT_ID,
    "timestamp": EXAMPLE_TIME,
    "state": "idle",
    "details": {},
}
STATE_REPORT_BATCH_EXAMPLE: dict[str, Any] = {
    "reports": [
        STATE_REPORT_EXAMPLE,
        {"agentId": "agent-8", "timestamp": EXAMPLE_TIME, "state": "initializing", "details": {}},
    ]
}
TRIGGER_EXAMPLE: dict[str, Any] = {"trigger": "begin_task", "details": {"note": "asked by an operator"}}
DEFINITION_EXAMPLE: dict[str, Any] = {
    "id": "summarise-and-review",
    "name": "Summarise a document, then review the summary",
    "description": "Two tasks run one after the other; the second starts when the first succeeds.",
    "version": "1.0",
    "tasks": [
        {
            "taskId": "summarise",
            "name": "Summarise",
            "agentCapability": "summarise_text",
            "parameters": {"max_words": 120},
            "nextTaskId": "review",
            "maxRetries": 2,
            "timeoutSeconds": 120,
        },
        {
            "taskId": "review",
            "name": "Review",
            "agentCapability": "review_text",
            "parameters": {"strict": True},
        },
    ],
}
START_RUN_EXAMPLE: dict[str, Any] = {
    "workflowDefinitionId": "summarise-and-review",
    "initialPayload": {"document": "Ops-Core keeps a fleet of AI agents honest."},
}
RUN_TRIGGER_EXAMPLE: dict[str, Any] = {"trigger": "pause"}
