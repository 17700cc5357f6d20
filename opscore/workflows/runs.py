"""Workflow runs, as the API and the scheduler see them: publish, start, operate, react, sweep.

A run is a ``workflow`` entity whose id is its ``sessionId``; each task is a ``task`` entity
``<sessionId>:<taskId>``, created with the run in ``pending``. Every state change of either
goes through :class:`~opscore.engine.Engine`, so it is audited. This module is a thin facade
over the parts, each beside the argument that makes it correct across replicas:

- :mod:`~opscore.workflows.state`: the typed data of runs, tasks and claims;
- :mod:`~opscore.workflows.claims`: which agent holds which task;
- :mod:`~opscore.workflows.progress`: the advance loop and the dispatch, at most once per attempt;
- :mod:`~opscore.workflows.reactions`: deadlines, retries and agents' reports;
- :mod:`~opscore.workflows.sweeps`: recovery, waiting tasks, liveness.
"""

from __future__ import annotations

import uuid
from typing import Any

from opscore import clock
from opscore.engine import Context, Engine
from opscore.errors import UnknownTrigger
from opscore.models import Entity
from opscore.workflows.catalog import Catalog
from opscore.workflows.claims import Claims
from opscore.workflows.definitions import Definition
from opscore.workflows.dispatch import AgentKitClient
from opscore.workflows.progress import Progress
from opscore.workflows.reactions import Reactions
from opscore.workflows.shared import Shared
from opscore.workflows.state import (
    AGENT,
    DONE,
    OPERATOR_TRIGGERS,
    TASK,
    WORKFLOW,
    RunData,
    TaskData,
    cas,
    deadline_key,
    retry_key,
    task_entity_id,
)
from opscore.workflows.sweeps import Sweeps


class Runs:
    """The run logic. One per process, built in the app's lifespan."""

    def __init__(self, engine: Engine, agentkit: AgentKitClient, *, default_timeout: float) -> None:
        self.shared = Shared(engine, agentkit, default_timeout=default_timeout)
        self.engine = engine
        self.store = engine.store
        self.catalog = Catalog(engine.store, default_timeout=default_timeout)
        self.claims = Claims(self.shared)
        self.progress = Progress(self.shared, self.catalog, self.claims)
        self.reactions = Reactions(self.shared, self.progress, self.claims)
        self.sweeps = Sweeps(self.shared, self.progress)
        # what the engine, the scheduler and the API call
        self.listener = self.reactions.listener
        self.on_timer = self.reactions.on_timer
        self.advance = self.progress.advance
        self.recover = self.sweeps.recover
        self.dispatch_waiting = self.sweeps.dispatch_waiting
        self.sweep_liveness = self.sweeps.sweep_liveness
        self.publish = self.catalog.publish
        self.definition = self.catalog.get
        self.drain = self.shared.drain
        self.cancel_background = self.shared.cancel_background
        self.agent_available = self.shared.agent_available

    async def start(self, definition: Definition, *, agent_id: str, payload: dict[str, Any], ctx: Context) -> Entity:
        """Create the run (``pending``) and its tasks, start it and dispatch its first task."""
        session_id = str(uuid.uuid4())
        data = {
            "sessionId": session_id,
            "workflowId": definition.definition_id,
            "workflowVersion": definition.version,
            "workflowName": definition.name,
            "agentId": agent_id,
            "initialPayload": payload,
            "taskIds": list(definition.tasks),
            "startTaskId": definition.start,
            "currentTaskId": None,
            "path": [],
            "reason": None,
        }
        await self.engine.create(WORKFLOW, session_id, data, ctx=ctx)
        async with self.shared.run_locks.hold(session_id):
            await self.progress.advance_held(session_id, ctx)
        return await self.engine.get(WORKFLOW, session_id)

    async def trigger_agent(self, agent_id: str) -> Entity:
        """The agent a run is started for; ``UnknownEntity`` (404 ``unknown_agent``) when unknown."""
        return await self.engine.get(AGENT, agent_id)

    async def operate(self, session_id: str, trigger: str, ctx: Context, details: dict[str, Any] | None) -> Entity:
        """pause, resume, cancel or retry a run; 409 (recorded) when illegal in its state."""
        if trigger not in OPERATOR_TRIGGERS:
            raise UnknownTrigger(
                f"{trigger!r} is not a run trigger; valid: {', '.join(OPERATOR_TRIGGERS)}",
                valid=list(OPERATOR_TRIGGERS),
            )
        async with self.shared.run_locks.hold(session_id):
            run = await self.engine.get(WORKFLOW, session_id)
            # back to running: the failure that stopped it is no longer the run's reason
            cleared = {"reason": None} if trigger in ("resume", "retry") else None
            await self.engine.fire(WORKFLOW, session_id, trigger, ctx=ctx, details=details, data=cleared)
            if trigger == "cancel":
                await self._cancel_tasks(run)
            elif trigger == "retry":
                await self._retry_current(run)
            if trigger in ("resume", "retry"):
                await self.progress.advance_held(session_id)
        return await self.engine.get(WORKFLOW, session_id)

    async def _cancel_tasks(self, run: Entity) -> None:
        """Cancel every unfinished task, whatever another replica does to it meanwhile."""
        for eid in RunData.of(run).task_entity_ids():

            async def cancel(eid: str = eid) -> bool:
                task = await self.store.get(TASK, eid)
                if task is None or task.state in DONE:
                    return False
                attempt = TaskData.of(task).attempt
                await self.engine.fire(
                    TASK,
                    eid,
                    "cancel",
                    ctx=cas(task),
                    details={"reason": "the run was cancelled"},
                    data={"deadlineAt": None, "retryAt": None},
                    cancel_timers=(deadline_key(eid, attempt), retry_key(eid, attempt)),
                )
                return True

            await self.shared.until_settled(cancel)

    async def _retry_current(self, run: Entity) -> None:
        current = RunData.of(run).current_task_id
        if not current:
            return
        eid = task_entity_id(run.entity_id, current)

        async def retry() -> bool:
            task = await self.store.get(TASK, eid)
            if task is None or task.state != "failed":
                return False
            await self.engine.fire(
                TASK,
                eid,
                "retry",
                ctx=cas(task),
                details={"reason": "the run was retried", "previousError": TaskData.of(task).error},
                data={"failures": 0, "retryAt": clock.now()},
            )
            return True

        await self.shared.until_settled(retry)
