"""Wire models only: what clients send and what they get, as DESIGN §2 and §5 fix them."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import Path
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from opscore.errors import UnacceptableInput
from opscore.inputs import MAX_ID_LENGTH, check_id, check_json

# The answers live in opscore.wire, beside nothing but pydantic, so that opscore.client uses the
# very same models without importing the server; re-exported here for the routes.
from opscore.wire import (
    AgentPage,
    AgentStateAtView,
    AgentStateView,
    AgentView,
    AuditPage,
    AuditRecord,
    BatchResult,
    Checkpoint,
    CheckpointPage,
    DefinitionList,
    EntityHead,
    ErrorBody,
    HeadPage,
    HealthAnswer,
    HealthUnavailable,
    MachineList,
    MachineTransition,
    MachineView,
    ReadyAnswer,
    RunPage,
    RunStarted,
    RunSummary,
    RunView,
    StateReportAnswer,
    StateReportBatchAnswer,
    TaskDefinition,
    TaskView,
    VerifyAnswer,
    WebhookDeregistered,
    WebhookRegistered,
    WorkflowDefinition,
)

__all__ = [  # the re-exported answers (every other name here is defined here)
    "AgentPage",
    "AgentStateAtView",
    "AgentStateView",
    "AgentView",
    "AuditPage",
    "AuditRecord",
    "BatchResult",
    "Checkpoint",
    "CheckpointPage",
    "DefinitionList",
    "EntityHead",
    "ErrorBody",
    "HeadPage",
    "HealthAnswer",
    "HealthUnavailable",
    "MachineList",
    "MachineTransition",
    "MachineView",
    "ReadyAnswer",
    "RunPage",
    "RunStarted",
    "RunSummary",
    "RunView",
    "StateReportAnswer",
    "StateReportBatchAnswer",
    "TaskDefinition",
    "TaskView",
    "VerifyAnswer",
    "WebhookDeregistered",
    "WebhookRegistered",
    "WorkflowDefinition",
]


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


class TriggerRequest(Wire):
    """An operator asks for a trigger by name."""

    trigger: str = Field(min_length=1, max_length=64)
    details: dict[str, Any] | None = None


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
