"""The typed data of runs, tasks and agent claims, and the names the workflow modules share.

A run is a ``workflow`` entity whose id is its ``sessionId``; each task is a ``task`` entity
``<sessionId>:<taskId>``. Their facts live in the entity's ``data`` (the layout the API and
the diagrams read); here they are read once into frozen values (``from_entity``) instead of
by string key all over the code. Ops-Core's claim on an agent lives under the agent's
``data["opscore"]``, a key no request body can write (registration keeps only the fields it
declares).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from opscore.engine import Context
from opscore.errors import PreconditionFailed, RevisionConflict
from opscore.models import Entity

WORKFLOW = "workflow"
TASK = "task"
AGENT = "agent"
SYSTEM = Context(actor="system")

HELD = ("dispatched", "running")
"""Task states in which an agent holds the task."""
DISPATCHABLE = ("pending", "waiting", "retrying")
"""Task states from which the next attempt may be dispatched."""
DONE = ("succeeded", "skipped", "cancelled")
"""Task states nothing moves a task out of."""
AGENT_LOST = ("error", "offline", "deregistered", "initializing")
"""Agent states that end the attempt the agent holds."""
OPERATOR_TRIGGERS = ("pause", "resume", "cancel", "retry")

DEADLINE = "task-deadline"
RETRY = "task-retry"
MAX_BACKOFF_SECONDS = 300.0

LOST = (PreconditionFailed, RevisionConflict)
"""A compare-and-set lost: the entity moved since it was read. Re-read, never repeat blindly."""
MAX_RACES = 50
"""Lost races one reaction absorbs before leaving the rest to the sweeps (a safety net only)."""

CLAIM_KEY = "opscore"
"""The key of an agent's ``data`` holding Ops-Core's own bookkeeping (its claim)."""


def cas(entity: Entity) -> Context:
    """The system acting on ``entity`` only if it is still at the revision that was read."""
    return Context(actor=SYSTEM.actor, if_match=entity.revision)


def task_entity_id(session_id: str, task_id: str) -> str:
    return f"{session_id}:{task_id}"


def deadline_key(task_eid: str, attempt: int) -> str:
    return f"{DEADLINE}:{task_eid}:{attempt}"


def retry_key(task_eid: str, attempt: int) -> str:
    return f"{RETRY}:{task_eid}:{attempt}"


def backoff(base: float, failures: int) -> float:
    """Exponential backoff with jitter: ``base * 2**(failures-1)`` capped, then 50-100 % of it.

    The jitter spreads the retries of many tasks that failed together (AgentKit restarting)
    so they do not all come back in the same instant.
    """
    delay = min(base * 2 ** max(failures - 1, 0), max(base, MAX_BACKOFF_SECONDS))
    jitter: float = 0.5 + random.random() / 2  # jitter, not security
    return float(delay) * jitter


@dataclass(frozen=True, slots=True)
class RunData:
    """What a run knows of itself (``workflow`` entity data)."""

    session_id: str
    workflow_id: str
    workflow_version: str
    agent_id: str | None
    initial_payload: dict[str, Any]
    task_ids: tuple[str, ...]
    current_task_id: str | None
    path: tuple[str, ...]
    reason: str | None

    @classmethod
    def of(cls, run: Entity) -> RunData:
        d = run.data
        return cls(
            session_id=str(d.get("sessionId", run.entity_id)),
            workflow_id=str(d.get("workflowId", "")),
            workflow_version=str(d.get("workflowVersion", "")),
            agent_id=d.get("agentId"),
            initial_payload=dict(d.get("initialPayload") or {}),
            task_ids=tuple(d.get("taskIds", ())),
            current_task_id=d.get("currentTaskId"),
            path=tuple(d.get("path", ())),
            reason=d.get("reason"),
        )

    def task_entity_ids(self) -> list[str]:
        return [task_entity_id(self.session_id, t) for t in self.task_ids]


@dataclass(frozen=True, slots=True)
class TaskData:
    """What a task knows of itself (``task`` entity data), defaults applied."""

    session_id: str
    task_id: str
    name: str | None
    capability: str | None
    pinned_agent_id: str | None
    parameters: dict[str, Any]
    next_task_id: str | None
    fallback_task_id: str | None
    max_retries: int
    timeout_seconds: float | None
    retry_backoff_seconds: float
    attempt: int
    failures: int
    agent_id: str | None
    attempts: tuple[dict[str, Any], ...]
    result: Any
    error: str | None
    retry_at: str | None
    waiting_since: str | None = field(default=None)

    @classmethod
    def of(cls, task: Entity) -> TaskData:
        d = task.data
        return cls(
            session_id=str(d.get("sessionId", "")),
            task_id=str(d.get("taskId", "")),
            name=d.get("name"),
            capability=d.get("agentCapability"),
            pinned_agent_id=d.get("pinnedAgentId"),
            parameters=dict(d.get("parameters") or {}),
            next_task_id=d.get("nextTaskId"),
            fallback_task_id=d.get("fallbackTaskId"),
            max_retries=int(d.get("maxRetries", 3)),
            timeout_seconds=d.get("timeoutSeconds"),
            retry_backoff_seconds=float(d.get("retryBackoffSeconds", 1.0)),
            attempt=int(d.get("attempt", 0)),
            failures=int(d.get("failures", 0)),
            agent_id=d.get("agentId"),
            attempts=tuple(dict(a) for a in d.get("attempts", ())),
            result=d.get("result"),
            error=d.get("error"),
            retry_at=d.get("retryAt"),
            waiting_since=d.get("waitingSince"),
        )

    @property
    def need(self) -> str:
        """What the task waits for: one agent, or any agent with a capability."""
        return f"agent:{self.pinned_agent_id}" if self.pinned_agent_id else f"capability:{self.capability}"

    def attempts_ended(self, **outcome: Any) -> list[dict[str, Any]]:
        """The attempts, the last one ended with ``outcome`` (its fields)."""
        attempts = [dict(a) for a in self.attempts]
        if attempts:
            attempts[-1].update(outcome)
        return attempts


@dataclass(frozen=True, slots=True)
class AgentClaim:
    """Ops-Core's claim on an agent: it is about to hold, or holds, attempt ``attempt`` of ``task``.

    ``token`` is new for every claim (a claim never comes back to a value an earlier reader
    saw), ``by`` names the claiming process, ``since`` is the agent's audit ``seq`` when it was
    claimed (reports older than the claim are about an earlier task).
    """

    task: str
    attempt: int
    token: str
    by: str
    claimed_at: str
    since: int

    @staticmethod
    def raw(agent: Entity) -> dict[str, Any] | None:
        """The claim as stored (what a compare-and-set compares), ``None`` when never claimed."""
        value = agent.data.get(CLAIM_KEY)
        return value if isinstance(value, dict) else None

    @classmethod
    def of(cls, agent: Entity) -> AgentClaim | None:
        raw = cls.raw(agent)
        if raw is None and agent.data.get("opscoreTask"):  # written by 0.1.0, beside the metadata
            d = agent.data
            raw = {
                "task": d["opscoreTask"],
                "attempt": d.get("opscoreAttempt", 0),
                "token": d.get("opscoreClaim", ""),
                "by": d.get("opscoreClaimBy", ""),
                "claimedAt": d.get("opscoreClaimedAt", ""),
                "since": d.get("opscoreSince", -1),
            }
        if raw is None or not raw.get("task"):
            return None
        return cls(
            task=str(raw["task"]),
            attempt=int(raw.get("attempt", 0)),
            token=str(raw.get("token", "")),
            by=str(raw.get("by", "")),
            claimed_at=str(raw.get("claimedAt", "")),
            since=int(raw.get("since", -1)),
        )

    def to_data(self, last_dispatch_at: str) -> dict[str, Any]:
        return {
            CLAIM_KEY: {
                "task": self.task,
                "attempt": self.attempt,
                "token": self.token,
                "by": self.by,
                "claimedAt": self.claimed_at,
                "since": self.since,
                "lastDispatchAt": last_dispatch_at,
            }
        }


def last_dispatch_at(agent: Entity) -> str:
    """When a task was last dispatched to ``agent`` ("" never): who has waited longest goes first."""
    raw = AgentClaim.raw(agent)
    return str(raw.get("lastDispatchAt") or "") if raw else ""
