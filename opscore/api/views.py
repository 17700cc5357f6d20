"""What the API shows of an entity: agents, runs and their tasks, as the answers' JSON.

One place for each view, so the routes, the webhook and the console show the same thing.
"""

from __future__ import annotations

from typing import Any

from opscore.api.schemas import AgentDetails
from opscore.models import Entity
from opscore.storage.base import Store
from opscore.workflows.state import TASK, task_entity_id


def agent_metadata(details: AgentDetails) -> dict[str, Any]:
    """The metadata kept for an agent: everything AgentKit described but its id."""
    return details.model_dump(exclude={"agentId"})


def agent_view(entity: Entity) -> dict[str, Any]:
    data = entity.data
    return {
        "agentId": entity.entity_id,
        "agentName": data.get("agentName"),
        "version": data.get("version"),
        "capabilities": data.get("capabilities", []),
        "contactEndpoint": data.get("contactEndpoint"),
        "metadata": data.get("metadata", {}),
        "state": entity.state,
        "revision": entity.revision,
        "lastSeenAt": entity.last_seen_at,
        "lastReportAt": entity.last_report_at,
        "registeredAt": entity.created_at,
        "updatedAt": entity.updated_at,
    }


def task_view(task: Entity) -> dict[str, Any]:
    d = task.data
    return {
        "taskId": d.get("taskId"),
        "taskEntityId": task.entity_id,
        "name": d.get("name"),
        "state": task.state,
        "revision": task.revision,
        "agentCapability": d.get("agentCapability"),
        "agentId": d.get("agentId"),
        "pinnedAgentId": d.get("pinnedAgentId"),
        "attempt": d.get("attempt", 0),
        "failures": d.get("failures", 0),
        "maxRetries": d.get("maxRetries"),
        "timeoutSeconds": d.get("timeoutSeconds"),
        "attempts": d.get("attempts", []),
        "result": d.get("result"),
        "error": d.get("error"),
        "deadlineAt": d.get("deadlineAt"),
        "retryAt": d.get("retryAt") if task.state == "retrying" else None,
        "nextTaskId": d.get("nextTaskId"),
        "fallbackTaskId": d.get("fallbackTaskId"),
        "updatedAt": task.updated_at,
    }


def run_summary(run: Entity) -> dict[str, Any]:
    d = run.data
    return {
        "sessionId": run.entity_id,
        "workflowId": d.get("workflowId"),
        "workflowVersion": d.get("workflowVersion"),
        "workflowName": d.get("workflowName"),
        "state": run.state,
        "revision": run.revision,
        "agentId": d.get("agentId"),
        "currentTaskId": d.get("currentTaskId"),
        "path": d.get("path", []),
        "reason": d.get("reason"),
        "createdAt": run.created_at,
        "updatedAt": run.updated_at,
    }


async def run_view(store: Store, run: Entity) -> dict[str, Any]:
    """The run with its tasks, read with one query (``get_many``), in the definition's order."""
    ids = [task_entity_id(run.entity_id, task_id) for task_id in run.data.get("taskIds", [])]
    tasks = [task_view(task) for task in await store.get_many(TASK, ids) if task is not None]
    return {
        **run_summary(run),
        "initialPayload": run.data.get("initialPayload", {}),
        "results": run.data.get("results", {}),
        "tasks": tasks,
    }
