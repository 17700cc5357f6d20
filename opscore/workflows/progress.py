"""How a run advances: one step at a time along its path, each step a compare-and-set.

**One path.** ``currentTaskId`` names the task in hand; :meth:`Progress.advance` does the one
thing its state calls for (dispatch a ``pending``/``waiting`` task, wait for a
``dispatched``/``running`` one, move to ``nextTaskId`` after ``succeeded``, to
``fallbackTaskId`` or fail the run after ``failed``, complete the run at the end). It is
idempotent, so anything that may have left a run behind (a crash between two writes, a timer
fired while paused, an agent becoming idle) calls it again; start-up calls it for every
unfinished run.

**Correct across replicas: every decision is a compare-and-set.** Several processes on one
PostgreSQL database run this code on the same rows. Every write that decides something is
made against the revision it was decided on (``Context.if_match`` through :func:`cas`);
moving the run to its next task, a data-only write that moves no revision, is a
compare-and-set on the revision *and* on ``currentTaskId``; tasks are created create-only. A
write that loses (:data:`LOST`) means someone else acted first: the step is taken again from
a fresh read, which finds the work done or does what is left. (A lost ``If-Match`` detected
before the write is recorded as a rejected audit record with reason ``revision_mismatch``
and actor ``system``: the trace of a replica that lost a race.)

**Dispatch happens at most once per attempt.** The change that moves a task to
``dispatched`` carries the attempt number and arms that attempt's deadline timer in the
same transaction; the ``/run`` call to AgentKit is made only after that commit, and only by
the caller whose commit it was. Two callers that read the same task revision compute the
same attempt n and only one compare-and-set wins; once it has, no revision with attempt n-1
is ever current again, so attempt n is sent once. A crash before the call leaves a
dispatched attempt that was never sent: its deadline fails it and the retry path sends
attempt n+1. Every reaction (an HTTP answer, an agent report, a timer) checks the attempt it
was meant for, so a late answer about attempt n cannot touch attempt n+1.

**Deadlines keep running while a run is paused**, on purpose: pause stops the run from
*starting* work but cannot recall a task already with an agent, so its deadline is still
the only guard against an agent that never answers. An attempt that fails while paused
counts against ``maxRetries``, the task waits in ``retrying``, and its next attempt is
dispatched on ``resume``; a success reported while paused is kept.
"""

from __future__ import annotations

import logging
from typing import Any

from opscore import clock
from opscore.engine import Context
from opscore.models import Entity, Timer
from opscore.workflows.catalog import Catalog
from opscore.workflows.claims import Claims
from opscore.workflows.definitions import Definition
from opscore.workflows.dispatch import run_body
from opscore.workflows.shared import Shared
from opscore.workflows.state import (
    DEADLINE,
    HELD,
    LOST,
    MAX_RACES,
    RETRY,
    SYSTEM,
    TASK,
    WORKFLOW,
    RunData,
    TaskData,
    backoff,
    cas,
    deadline_key,
    retry_key,
    task_entity_id,
)

log = logging.getLogger("opscore.workflows")


def task_data(session_id: str, definition: Definition, task_id: str) -> dict[str, Any]:
    """A new task's data, from its definition (the layout :class:`TaskData` reads)."""
    spec = definition.tasks[task_id]
    return {
        "sessionId": session_id,
        "taskId": task_id,
        "name": spec.name,
        "agentCapability": spec.capability,
        "pinnedAgentId": spec.agent_id,
        "parameters": spec.parameters,
        "nextTaskId": spec.next_task_id,
        "fallbackTaskId": spec.fallback_task_id,
        "maxRetries": spec.max_retries,
        "timeoutSeconds": spec.timeout_seconds,
        "retryBackoffSeconds": spec.retry_backoff_seconds,
        "attempt": 0,
        "failures": 0,
        "agentId": None,
        "attempts": [],
        "result": None,
        "error": None,
        "deadlineAt": None,
        "retryAt": None,
    }


class Progress:
    def __init__(self, shared: Shared, catalog: Catalog, claims: Claims) -> None:
        self.shared = shared
        self.engine = shared.engine
        self.store = shared.store
        self.catalog = catalog
        self.claims = claims

    async def advance(self, session_id: str) -> None:
        async with self.shared.run_locks.hold(session_id):
            await self.advance_held(session_id, SYSTEM)

    async def advance_held(self, session_id: str, ctx: Context = SYSTEM) -> None:
        """Do what the current task's state calls for; the run lock is held. Idempotent."""
        races = 0
        for _ in range(10_000):
            try:
                again = await self._step(session_id, ctx)
            except LOST:
                races += 1
                if races >= MAX_RACES:
                    log.warning("run kept changing under this replica; the sweeps come back to it",
                                extra={"sessionId": session_id})  # fmt: skip
                    return
                again = True
            ctx = SYSTEM  # only the first step (starting the run) acts for the requester
            if not again:
                return

    async def _step(self, session_id: str, ctx: Context) -> bool:
        """One step of :meth:`advance_held`; whether there may be another. ``LOST`` on a lost race."""
        run = await self.store.get(WORKFLOW, session_id)
        if run is None:
            return False
        if run.state == "pending":
            await self._begin(run, ctx)
            return True
        if run.state != "running":
            return False
        current = RunData.of(run).current_task_id
        task = await self.store.get(TASK, task_entity_id(session_id, current)) if current else None
        if task is None:
            await self.fail_run(run, f"task {current!r} of this run is missing", current)
            return False
        spec = TaskData.of(task)
        if task.state in ("pending", "waiting"):
            await self._dispatch(run, task)
            return False
        if task.state == "retrying":
            if (spec.retry_at or "") <= clock.now():
                await self._dispatch(run, task)
            return False
        if task.state == "succeeded":
            if spec.next_task_id is None:
                await self._complete(run)
                return False
            await self._move(run, spec.next_task_id)
            return True
        if task.state == "failed":
            if spec.fallback_task_id is not None:
                await self._move(run, spec.fallback_task_id)
                return True
            await self.fail_run(run, f"task {current!r} failed: {spec.error}", current)
            return False
        return False  # dispatched/running: the agent has it; cancelled/skipped: nothing to do

    async def _begin(self, run: Entity, ctx: Context) -> None:
        facts = RunData.of(run)
        definition = await self.catalog.get(facts.workflow_id, facts.workflow_version)
        sid = run.entity_id
        for task_id in definition.tasks:
            # create-only: a replica healing the same gap must not reset a task another one moved
            await self.engine.create(
                TASK, task_entity_id(sid, task_id), task_data(sid, definition, task_id), ctx=SYSTEM
            )
        await self.engine.fire(
            WORKFLOW,
            sid,
            "start",
            ctx=Context(actor=ctx.actor, request_id=ctx.request_id, if_match=run.revision),
            details={"workflowId": definition.definition_id, "version": definition.version},
            data={"currentTaskId": definition.start, "path": [definition.start]},
        )

    async def _move(self, run: Entity, task_id: str) -> None:
        """Make ``task_id`` the current task: a data-only write, so a CAS on the current task too."""
        facts = RunData.of(run)
        await self.engine.update(
            WORKFLOW,
            run.entity_id,
            {"currentTaskId": task_id, "path": [*facts.path, task_id]},
            ctx=SYSTEM,
            expected_revision=run.revision,
            expected_data={"currentTaskId": facts.current_task_id},
        )

    async def _complete(self, run: Entity) -> None:
        results = {}
        for task in await self.store.get_many(TASK, RunData.of(run).task_entity_ids()):
            if task is None:
                continue
            if task.state == "succeeded":
                results[TaskData.of(task).task_id] = task.data.get("result")
            elif task.state in ("pending", "waiting"):
                await self.engine.fire(
                    TASK, task.entity_id, "skip", ctx=cas(task), details={"reason": "not on the path the run took"}
                )
        await self.engine.fire(
            WORKFLOW,
            run.entity_id,
            "complete",
            ctx=cas(run),
            data={"results": results, "reason": None},
            details={"path": run.data.get("path")},
        )

    async def fail_run(self, run: Entity, reason: str, task_id: str | None) -> None:
        await self.engine.fire(
            WORKFLOW,
            run.entity_id,
            "fail",
            ctx=cas(run),
            data={"reason": reason},
            details={"reason": reason, "taskId": task_id},
        )

    async def _dispatch(self, run: Entity, task: Entity) -> None:
        """Claim an agent, commit ``dispatched`` (attempt n, its deadline), then send, at most once.

        Two compare-and-sets, in this order: the claim on the agent
        (:meth:`Claims.claim`), then the task's move to ``dispatched`` on the revision read.
        Only the caller whose task CAS wins sends the ``/run``; a loser raises ``LOST`` and the
        run is re-read. The selection lock only saves this process from racing itself.
        """
        spec = TaskData.of(task)
        async with self.shared.selecting:
            attempt = spec.attempt + 1
            for _ in range(MAX_RACES):
                agent = await self.claims.choose(run, task)
                if agent is None:
                    if task.state != "waiting":
                        wanted = spec.pinned_agent_id or spec.capability
                        await self.engine.fire(
                            TASK,
                            task.entity_id,
                            "wait",
                            ctx=cas(task),
                            data={"waitingSince": clock.now()},
                            details={"reason": f"no free idle agent for {wanted!r}"},
                        )
                    return
                try:
                    await self.claims.claim(agent, task, attempt)
                except LOST:
                    continue  # another replica took this agent first: choose again
                break
            else:
                log.warning("agents kept being taken; the task waits for the next sweep",
                            extra={"task": task.entity_id})  # fmt: skip
                return
            agent_id = agent.entity_id
            deadline = clock.after(float(spec.timeout_seconds or self.shared.default_timeout))
            attempts = [
                *spec.attempts,
                {"attempt": attempt, "agentId": agent_id, "dispatchedAt": clock.now(), "outcome": None, "error": None},
            ]
            timer = Timer(
                deadline_key(task.entity_id, attempt),
                deadline,
                DEADLINE,
                TASK,
                task.entity_id,
                {"sessionId": run.entity_id, "attempt": attempt},
            )
            await self.engine.fire(
                TASK,
                task.entity_id,
                "dispatch",
                ctx=cas(task),
                details={"attempt": attempt, "agentId": agent_id, "deadlineAt": deadline},
                data={"attempt": attempt, "agentId": agent_id, "attempts": attempts, "deadlineAt": deadline},
                timers=(timer,),
                cancel_timers=(retry_key(task.entity_id, attempt - 1),) if attempt > 1 else (),
            )
        facts = RunData.of(run)
        body = run_body(
            session_id=run.entity_id,
            task_entity_id=task.entity_id,
            task_name=spec.task_id,
            parameters={**facts.initial_payload, **spec.parameters},
            attempt=attempt,
            workflow_id=facts.workflow_id,
            extra={
                "task_display_name": spec.name,
                "initial_payload": facts.initial_payload,
                "previous_result": await self._previous_result(run),
            },
        )
        self.shared.spawn(self._send(run.entity_id, task.entity_id, attempt, agent_id, body))

    async def _previous_result(self, run: Entity) -> Any:
        path = RunData.of(run).path
        if len(path) < 2:
            return None
        previous = await self.store.get(TASK, task_entity_id(run.entity_id, path[-2]))
        return None if previous is None else previous.data.get("result")

    async def _send(self, session_id: str, task_eid: str, attempt: int, agent_id: str, body: dict[str, Any]) -> None:
        """The ``/run`` call, after the dispatch committed; a refusal or no answer fails that attempt."""
        result = await self.shared.agentkit.run(agent_id, body)
        if result.outcome == "accepted":
            return

        async def fail() -> bool:
            task = await self.store.get(TASK, task_eid)
            if task is None or task.state not in HELD or TaskData.of(task).attempt != attempt:
                return False
            await self.fail_attempt(task, result.error or result.outcome, cause=result.outcome)
            return True

        async with self.shared.run_locks.hold(session_id):
            if await self.shared.until_settled(fail):
                await self.advance_held(session_id)

    async def fail_attempt(self, task: Entity, error: str, *, cause: str) -> None:
        """The attempt in hand failed: back off and retry, or fail the task for good (CAS on ``task``)."""
        spec = TaskData.of(task)
        failures = spec.failures + 1
        attempts = spec.attempts_ended(outcome="failed", error=error, endedAt=clock.now())
        cancel = (deadline_key(task.entity_id, spec.attempt),)
        details = {"attempt": spec.attempt, "cause": cause, "error": error, "failures": failures}
        if failures > spec.max_retries:
            await self.engine.fire(
                TASK,
                task.entity_id,
                "fail",
                ctx=cas(task),
                details={**details, "reason": f"{failures} failed attempts, maxRetries {spec.max_retries}"},
                data={"failures": failures, "attempts": attempts, "error": error, "deadlineAt": None},
                cancel_timers=cancel,
            )
            return
        delay = backoff(spec.retry_backoff_seconds, failures)
        retry_at = clock.after(delay)
        timer = Timer(
            retry_key(task.entity_id, spec.attempt),
            retry_at,
            RETRY,
            TASK,
            task.entity_id,
            {"sessionId": spec.session_id, "attempt": spec.attempt},
        )
        await self.engine.fire(
            TASK,
            task.entity_id,
            "fail_attempt",
            ctx=cas(task),
            details={**details, "retryInSeconds": round(delay, 3)},
            data={"failures": failures, "attempts": attempts, "error": error, "retryAt": retry_at, "deadlineAt": None},
            timers=(timer,),
            cancel_timers=cancel,
        )
