"""The httpx client for AgentKit's ``POST /v1/agents/{agentId}/run`` (DESIGN §2, task dispatch).

:func:`run_body` builds the body exactly as the contract fixes it; :class:`AgentKitClient`
sends it and folds every answer into one of three outcomes the run logic acts on:
``accepted`` (2xx: scheduled, not done), ``unknown_agent`` (404: this attempt fails) and
``unreachable`` (connection error, timeout, 5xx or anything else: the attempt fails and the
retry path backs off). Nothing here retries: retries are durable timers, not loops in memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import quote

import httpx

Outcome = Literal["accepted", "unknown_agent", "unreachable"]


@dataclass(frozen=True, slots=True)
class DispatchResult:
    outcome: Outcome
    status: int | None
    error: str | None


def run_body(
    *,
    session_id: str,
    task_entity_id: str,
    task_name: str,
    parameters: dict[str, Any],
    attempt: int,
    workflow_id: str,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``/run`` body: ``messageType`` ``workflow_task`` (never ``tool_invocation``).

    ``opscore_task_id`` is the task's entity id ``<sessionId>:<taskId>`` (unique across runs)
    and is repeated inside ``payload`` because agents read their payload, and an agent that
    echoes it in ``details.opscore_task_id`` lets Ops-Core check the correlation.
    """
    payload: dict[str, Any] = {
        "task_name": task_name,
        "task_parameters": parameters,
        "opscore_session_id": session_id,
        "opscore_task_id": task_entity_id,
        "workflow_id": workflow_id,
        "attempt": attempt,
        **(extra or {}),
    }
    return {
        "senderId": "opscore",
        "messageType": "workflow_task",
        "payload": payload,
        "task_name": task_name,
        "opscore_session_id": session_id,
        "opscore_task_id": task_entity_id,
    }


class AgentKitClient:
    """One pooled ``httpx.AsyncClient`` to ``AGENTKIT_API_URL``, opened in the app's lifespan."""

    def __init__(self, base_url: str, *, timeout: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout, connect=min(timeout, 5.0)),
            limits=httpx.Limits(max_connections=100, max_keepalive_connections=50),
        )

    async def close(self) -> None:
        await self._client.aclose()

    async def run(self, agent_id: str, body: dict[str, Any]) -> DispatchResult:
        url = f"{self.base_url}/v1/agents/{quote(agent_id, safe='')}/run"
        try:
            response = await self._client.post(url, json=body)
        except httpx.HTTPError as exc:
            return DispatchResult("unreachable", None, f"AgentKit unreachable: {type(exc).__name__}: {exc}")
        if 200 <= response.status_code < 300:
            return DispatchResult("accepted", response.status_code, None)
        if response.status_code == 404:
            return DispatchResult("unknown_agent", 404, f"AgentKit does not know agent {agent_id!r} (404)")
        return DispatchResult(
            "unreachable", response.status_code, f"AgentKit answered {response.status_code}: {response.text[:200]}"
        )
