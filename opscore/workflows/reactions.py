"""What moves a run besides itself: a deadline or a retry coming due, and agents' reports.

The real AgentKit reports ``details: {}``, so progress is correlated by agent: a report is
applied to the task the agent holds (:mod:`opscore.workflows.claims`), and only when the
report's ``seq`` in the agent's chain is newer than the claim, so a late report about an
earlier task cannot finish the next one. ``details.opscore_task_id``, when present, must name
the held task, or the report is ignored for the run (its own audit record is already
written). Each reaction reads afresh and decides by compare-and-set, so one handled twice (a
timer whose lease ran out, a report seen by two replicas) does nothing the second time.
"""

from __future__ import annotations

import logging
from typing import Any

from opscore import clock
from opscore.audit import is_transition
from opscore.models import Entity, Timer
from opscore.workflows.claims import Claims
from opscore.workflows.progress import Progress
from opscore.workflows.shared import Shared
from opscore.workflows.state import (
    AGENT,
    AGENT_LOST,
    DEADLINE,
    HELD,
    LOST,
    MAX_RACES,
    RETRY,
    TASK,
    AgentClaim,
    TaskData,
    cas,
    deadline_key,
)

log = logging.getLogger("opscore.workflows")


class Reactions:
    def __init__(self, shared: Shared, progress: Progress, claims: Claims) -> None:
        self.shared = shared
        self.store = shared.store
        self.engine = shared.engine
        self.progress = progress
        self.claims = claims

    async def on_timer(self, timer: Timer) -> None:
        """A task deadline or a retry backoff came due (possibly after a restart, or on another replica)."""
        session_id = str(timer.payload.get("sessionId", ""))
        attempt = timer.payload.get("attempt")

        async def react() -> bool:
            task = await self.store.get(TASK, timer.entity_id)
            if task is None or task.data.get("attempt") != attempt:
                return False
            if timer.kind == DEADLINE and task.state in HELD:
                timeout = TaskData.of(task).timeout_seconds
                await self.progress.fail_attempt(
                    task, f"attempt {attempt} did not complete within {timeout} s", cause="timeout"
                )
                return True
            return timer.kind == RETRY and task.state == "retrying"

        async with self.shared.run_locks.hold(session_id):
            if await self.shared.until_settled(react):
                await self.progress.advance_held(session_id)

    def listener(self, record: dict[str, Any], entity: Entity) -> None:
        """Engine listener: every committed record; agent transitions are handled in order.

        An agent that has never been claimed for a task (no claim in the entity this very
        commit left) cannot be holding one, so nothing is spawned for it: most reports of a
        fleet are about agents outside any workflow. A claim is committed before its
        dispatch, and so before any report the dispatch can cause.
        """
        if record.get("outcome") != "applied":
            return
        if record.get("entityType") != AGENT:
            if record.get("dest") == "waiting" and record.get("entityType") == TASK:
                self.shared.went_waiting += 1
                self.shared.none_waiting = False
            return
        if record.get("dest") == "idle" and not self.shared.none_waiting:
            self.shared.agent_available.set()  # also when an idle agent's capabilities changed
        if not is_transition(record) or AgentClaim.of(entity) is None:
            return
        self.shared.spawn(self.on_agent(record))

    async def on_agent(self, record: dict[str, Any]) -> None:
        """Apply an agent's transition to the task it holds, if any (this replica committed it)."""
        agent_id = str(record["entityId"])
        async with self.shared.agent_locks.hold(agent_id):
            for _ in range(MAX_RACES):
                agent = await self.store.get(AGENT, agent_id)
                task = None if agent is None else await self.claims.held_task(agent)
                claim = None if agent is None else AgentClaim.of(agent)
                if agent is None or task is None or claim is None:
                    return
                if int(record.get("seq", 0)) <= claim.since:
                    return  # older than the claim: about an earlier task
                session_id = TaskData.of(task).session_id
                async with self.shared.run_locks.hold(session_id):
                    task = await self.store.get(TASK, task.entity_id)
                    if task is None or task.state not in HELD or TaskData.of(task).agent_id != agent_id:
                        return
                    if TaskData.of(task).attempt != claim.attempt:
                        continue  # the claim moved on meanwhile: read it again
                    try:
                        changed = await self._apply(task, record)
                    except LOST:
                        continue  # e.g. its deadline fired on another replica: decide again
                    if changed:
                        await self.progress.advance_held(session_id)
                    return

    async def _apply(self, task: Entity, record: dict[str, Any]) -> bool:
        """Apply one agent transition to the task it holds; whether the task changed."""
        details = record.get("details") or {}
        spec = TaskData.of(task)
        claimed = details.get("opscore_task_id")
        if claimed is not None and claimed not in (task.entity_id, spec.task_id):
            log.info(
                "report ignored for the run: the agent holds another task",
                extra={"agentId": record["entityId"], "holds": task.entity_id, "reported": claimed},
            )
            return False
        source, dest = record.get("source"), record.get("dest")
        note = {"agentId": record["entityId"], "agentAuditId": record["id"], "attempt": spec.attempt}
        if dest == "active":
            if task.state == "dispatched":
                await self.engine.fire(TASK, task.entity_id, "begin", ctx=cas(task), details=note)
                return True
            return False
        if dest == "idle" and source == "active":
            await self.engine.fire(
                TASK,
                task.entity_id,
                "succeed",
                ctx=cas(task),
                details=note,
                data={
                    "result": details.get("result"),
                    "attempts": spec.attempts_ended(outcome="succeeded", endedAt=clock.now()),
                    "error": None,
                    "deadlineAt": None,
                },
                cancel_timers=(deadline_key(task.entity_id, spec.attempt),),
            )
            return True
        if dest in AGENT_LOST:
            error = details.get("error") or f"agent {record['entityId']} went {dest} while holding the task"
            await self.progress.fail_attempt(task, str(error), cause=f"agent_{dest}")
            return True
        return False
