"""The answers of the HTTP API as pydantic models: one definition for the server and its client.

The routes declare them as response models (so ``/openapi.json`` is written from them) and
``opscore.client`` parses every answer into them, so the server, its OpenAPI document and the
client cannot drift apart. This module needs nothing but pydantic: a program that only talks
to Ops-Core imports it without importing the server (``opscore/api/schemas.py`` re-exports
every name for the routes, beside the request bodies, which are checked by the server only).

Unknown fields are ignored (pydantic's default), so an older client keeps reading the answers
of a newer server that added fields.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StringConstraints
from pydantic.json_schema import SkipJsonSchema


class BatchResult(BaseModel):
    status: int
    body: dict[str, Any]


class StateReportBatchAnswer(BaseModel):
    results: list[BatchResult]


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


class EntityHead(BaseModel):
    """Where an entity's audit chain ends, and what the entity holds: one line of an export's trailer."""

    entityType: str
    entityId: str
    seq: int
    hash: str
    state: str
    revision: int


class HeadPage(BaseModel):
    items: list[EntityHead]
    nextCursor: str | None


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
