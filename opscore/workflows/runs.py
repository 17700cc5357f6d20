"""Workflow runs: start, dispatch, progress from agent reports, timers, operator triggers.

Entities (shared with the diagrams): a run is a ``workflow`` entity whose id is its
``sessionId``; each task is a ``task`` entity ``<sessionId>:<taskId>``, created with the run
in ``pending``. Every state change of either goes through :class:`~opscore.engine.Engine`, so
it is audited; the facts of a run (definition, payload, current task, path) and of a task
(attempts, agent, result, error, deadlines) live in the entity's ``data``.

**The run advances along one path.** ``data.currentTaskId`` names the task in hand;
:meth:`Runs.advance` looks at it and does the one thing its state calls for (dispatch a
``pending``/``waiting`` task, wait for a ``dispatched``/``running`` one, move to
``nextTaskId`` after ``succeeded``, to ``fallbackTaskId`` or fail the run after ``failed``,
complete the run at the end). It is idempotent, so anything that may have left a run behind
(a crash between two writes, a timer fired while paused, an agent becoming idle) calls it
again; start-up calls it for every unfinished run.

**Dispatch happens at most once per attempt.** The change that moves a task to
``dispatched`` carries the attempt number and arms that attempt's deadline timer in the
same transaction; the HTTP call to AgentKit is made only after that commit. A crash before
the call leaves a dispatched attempt that was never sent: its deadline fails it and the
retry path sends attempt n+1. Nothing ever re-sends attempt n, and every reaction (HTTP
answer, agent report, timer) checks the attempt number it was meant for, so a late answer
about attempt n cannot touch attempt n+1.

**Which agent holds which task** is written on the agent (``data.opscoreTask``) when a task
is dispatched to it, and trusted only while that task is still ``dispatched``/``running``
with ``data.agentId`` equal to the agent: a stale claim (the task finished, or a crash
between the claim and the dispatch) is simply not a claim, so nothing has to release it.
The real AgentKit reports ``details: {}``, so progress is correlated by agent;
``details.opscore_task_id``, when present, must name the held task or the report is ignored
for the run (its own audit record is already written).

Concurrency inside one process: one asyncio lock per run serialises everything that reads
and changes a run and its tasks; one per agent keeps an agent's reports in order; agent
selection is serialised so two tasks never pick the same idle agent.
"""

from __future__ import annotations

import asyncio
import logging
import random
import uuid
from collections.abc import Coroutine
from datetime import UTC, datetime, timedelta
from typing import Any

from opscore.engine import Context, Engine, _KeyedLocks
from opscore.errors import IllegalTransition, NotFound, UnknownTrigger
from opscore.models import Entity, EntityQuery, Timer
from opscore.storage.base import utc_now
from opscore.workflows.definitions import Definition, validate
from opscore.workflows.dispatch import AgentKitClient, run_body

log = logging.getLogger("opscore.workflows")

WORKFLOW = "workflow"
TASK = "task"
AGENT = "agent"
SYSTEM = Context(actor="system")

HELD = ("dispatched", "running")
"""Task states in which an agent holds the task."""
AGENT_LOST = ("error", "offline", "deregistered", "initializing")
"""Agent states that end the attempt the agent holds."""
OPERATOR_TRIGGERS = ("pause", "resume", "cancel", "retry")
MAX_BACKOFF_SECONDS = 300.0
DEADLINE = "task-deadline"
RETRY = "task-retry"


def task_entity_id(session_id: str, task_id: str) -> str:
    return f"{session_id}:{task_id}"


def deadline_key(task_eid: str, attempt: int) -> str:
    return f"{DEADLINE}:{task_eid}:{attempt}"


def retry_key(task_eid: str, attempt: int) -> str:
    return f"{RETRY}:{task_eid}:{attempt}"


def seconds_from_now(seconds: float) -> str:
    return (datetime.now(UTC) + timedelta(seconds=seconds)).isoformat(timespec="microseconds")


def backoff(base: float, failures: int) -> float:
    """Exponential backoff with jitter: ``base * 2**(failures-1)`` capped, then 50-100 % of it.

    The jitter spreads the retries of many tasks that failed together (AgentKit restarting)
    so they do not all come back in the same instant.
    """
    delay = min(base * 2 ** max(failures - 1, 0), max(base, MAX_BACKOFF_SECONDS))
    jitter: float = 0.5 + random.random() / 2  # jitter, not security
    return float(delay) * jitter


class Runs:
    """The run logic. One per process, built in the app's lifespan."""

    def __init__(self, engine: Engine, agentkit: AgentKitClient, *, default_timeout: float) -> None:
        self.engine = engine
        self.store = engine.store
        self.agentkit = agentkit
        self.default_timeout = default_timeout
        self._run_locks = _KeyedLocks()
        self._agent_locks = _KeyedLocks()
        self._select = asyncio.Lock()
        self._background: set[asyncio.Task[Any]] = set()
        self._definitions: dict[tuple[str, str], Definition] = {}
        self.agent_available = asyncio.Event()
        """Set when an agent became idle: the scheduler then retries waiting tasks at once."""

    # -- plumbing ---------------------------------------------------------------------------

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("workflow step failed", exc_info=task.exception())

    async def drain(self) -> None:
        """Wait for in-flight dispatches and report handling (shutdown, tests)."""
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)

    async def cancel_background(self) -> None:
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*list(self._background), return_exceptions=True)

    # -- definitions ------------------------------------------------------------------------

    async def publish(self, body: Any) -> tuple[Definition, bool]:
        """Validate and store a definition; ``(definition, created)``. 409 for another body."""
        definition = validate(body, default_timeout=self.default_timeout)
        created = await self.store.put_definition(definition.definition_id, definition.version, definition.body)
        self._definitions[(definition.definition_id, definition.version)] = definition
        return definition, created

    async def definition(self, definition_id: str, version: str | None = None) -> Definition:
        if version is not None and (definition_id, version) in self._definitions:
            return self._definitions[(definition_id, version)]
        body = await self.store.get_definition(definition_id, version)
        if body is None:
            which = f"{definition_id!r}" + ("" if version is None else f" version {version!r}")
            raise NotFound(f"no workflow definition {which}", code="unknown_workflow_definition")
        definition = validate(body, default_timeout=self.default_timeout)
        self._definitions[(definition.definition_id, definition.version)] = definition
        return definition

    # -- starting a run ---------------------------------------------------------------------

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
        await self.engine.upsert(WORKFLOW, session_id, data, ctx=ctx)
        async with self._run_locks.hold(session_id):
            await self._advance(session_id, ctx)
        return await self.engine.get(WORKFLOW, session_id)

    def _task_data(self, session_id: str, definition: Definition, task_id: str) -> dict[str, Any]:
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

    # -- advancing ----------------------------------------------------------------------------

    async def advance(self, session_id: str) -> None:
        async with self._run_locks.hold(session_id):
            await self._advance(session_id, SYSTEM)

    async def _advance(self, session_id: str, ctx: Context = SYSTEM) -> None:
        """Do what the current task's state calls for; the run lock is held. Idempotent."""
        for _ in range(10_000):
            run = await self.store.get(WORKFLOW, session_id)
            if run is None:
                return
            if run.state == "pending":
                await self._begin(run, ctx)
                ctx = SYSTEM
                continue
            if run.state != "running":
                return
            current = run.data.get("currentTaskId")
            task = await self.store.get(TASK, task_entity_id(session_id, current)) if current else None
            if task is None:
                await self._fail_run(run, f"task {current!r} of this run is missing", current)
                return
            state = task.state
            if state in ("pending", "waiting"):
                await self._dispatch(run, task)
                return
            if state == "retrying":
                if (task.data.get("retryAt") or "") <= utc_now():
                    await self._dispatch(run, task)
                return
            if state == "succeeded":
                nxt = task.data.get("nextTaskId")
                if nxt is None:
                    await self._complete(run)
                    return
                await self._move(run, nxt)
                continue
            if state == "failed":
                fallback = task.data.get("fallbackTaskId")
                if fallback is not None:
                    await self._move(run, fallback)
                    continue
                await self._fail_run(run, f"task {current!r} failed: {task.data.get('error')}", current)
                return
            return  # dispatched/running: the agent has it; cancelled/skipped: nothing to do

    async def _begin(self, run: Entity, ctx: Context) -> None:
        definition = await self.definition(run.data["workflowId"], run.data["workflowVersion"])
        sid = run.entity_id
        for task_id in definition.tasks:
            eid = task_entity_id(sid, task_id)
            if await self.store.get(TASK, eid) is None:
                await self.engine.upsert(TASK, eid, self._task_data(sid, definition, task_id), ctx=SYSTEM)
        await self.engine.fire(
            WORKFLOW,
            sid,
            "start",
            ctx=ctx,
            details={"workflowId": definition.definition_id, "version": definition.version},
            data={"currentTaskId": definition.start, "path": [definition.start]},
        )

    async def _move(self, run: Entity, task_id: str) -> None:
        path = [*run.data.get("path", []), task_id]
        await self.engine.upsert(WORKFLOW, run.entity_id, {"currentTaskId": task_id, "path": path}, ctx=SYSTEM)

    async def _complete(self, run: Entity) -> None:
        sid = run.entity_id
        results = {}
        for task_id in run.data.get("taskIds", []):
            task = await self.store.get(TASK, task_entity_id(sid, task_id))
            if task is None:
                continue
            if task.state == "succeeded":
                results[task_id] = task.data.get("result")
            elif task.state in ("pending", "waiting"):
                await self.engine.fire(
                    TASK, task.entity_id, "skip", ctx=SYSTEM, details={"reason": "not on the path the run took"}
                )
        await self.engine.fire(
            WORKFLOW, sid, "complete", ctx=SYSTEM, data={"results": results}, details={"path": run.data.get("path")}
        )

    async def _fail_run(self, run: Entity, reason: str, task_id: str | None) -> None:
        await self.engine.fire(
            WORKFLOW,
            run.entity_id,
            "fail",
            ctx=SYSTEM,
            data={"reason": reason},
            details={"reason": reason, "taskId": task_id},
        )

    # -- dispatch -----------------------------------------------------------------------------

    async def _dispatch(self, run: Entity, task: Entity) -> None:
        """Pick an agent, commit ``dispatched`` with its deadline, then send (at most once)."""
        # The selection lock is held until the dispatch is committed: a selection then always
        # sees every earlier claim in the store (an in-memory "claiming" set is not enough: a
        # list read started before a claim committed can return after it was forgotten).
        async with self._select:
            agent = await self._choose(run, task)
            if agent is None:
                if task.state != "waiting":
                    capability = task.data.get("pinnedAgentId") or task.data.get("agentCapability")
                    await self.engine.fire(
                        TASK,
                        task.entity_id,
                        "wait",
                        ctx=SYSTEM,
                        data={"waitingSince": utc_now()},
                        details={"reason": f"no free idle agent for {capability!r}"},
                    )
                return
            agent_id = agent.entity_id
            await self.engine.upsert(
                AGENT, agent_id, {"opscoreTask": task.entity_id, "lastDispatchAt": utc_now()}, ctx=SYSTEM
            )
            attempt = int(task.data.get("attempt", 0)) + 1
            timeout = float(task.data.get("timeoutSeconds") or self.default_timeout)
            deadline = seconds_from_now(timeout)
            attempts = [
                *task.data.get("attempts", []),
                {"attempt": attempt, "agentId": agent_id, "dispatchedAt": utc_now(), "outcome": None, "error": None},
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
                ctx=SYSTEM,
                details={"attempt": attempt, "agentId": agent_id, "deadlineAt": deadline},
                data={"attempt": attempt, "agentId": agent_id, "attempts": attempts, "deadlineAt": deadline},
                timers=(timer,),
                cancel_timers=(retry_key(task.entity_id, attempt - 1),) if attempt > 1 else (),
            )
        body = run_body(
            session_id=run.entity_id,
            task_entity_id=task.entity_id,
            task_name=task.data["taskId"],
            parameters={**(run.data.get("initialPayload") or {}), **(task.data.get("parameters") or {})},
            attempt=attempt,
            workflow_id=run.data["workflowId"],
            extra={
                "task_display_name": task.data.get("name"),
                "initial_payload": run.data.get("initialPayload") or {},
                "previous_result": await self._previous_result(run),
            },
        )
        self.spawn(self._send(run.entity_id, task.entity_id, attempt, agent_id, body))

    async def _previous_result(self, run: Entity) -> Any:
        path = run.data.get("path", [])
        if len(path) < 2:
            return None
        previous = await self.store.get(TASK, task_entity_id(run.entity_id, path[-2]))
        return None if previous is None else previous.data.get("result")

    async def _choose(self, run: Entity, task: Entity) -> Entity | None:
        """The task's ``agentId``; else the triggering agent if capable; else the least recently busy."""
        pinned = task.data.get("pinnedAgentId")
        if pinned:
            agent = await self.store.get(AGENT, pinned)
            return agent if agent is not None and await self._free(agent) else None
        capability = task.data.get("agentCapability")
        trigger = run.data.get("agentId")
        if trigger:
            agent = await self.store.get(AGENT, trigger)
            if agent is not None and capability in agent.data.get("capabilities", []) and await self._free(agent):
                return agent
        candidates: list[Entity] = []
        after: str | None = None
        while True:
            page = await self.store.list_entities(
                EntityQuery(AGENT, state="idle", capability=capability, after_id=after, limit=500)
            )
            candidates.extend(page)
            if len(page) < 500:
                break
            after = page[-1].entity_id
        candidates.sort(key=lambda a: (a.data.get("lastDispatchAt") or "", a.entity_id))
        for agent in candidates:
            if await self._free(agent):
                return agent
        return None

    async def _free(self, agent: Entity) -> bool:
        fresh = await self.store.get(AGENT, agent.entity_id)  # a listed snapshot may be older
        if fresh is None or fresh.state != "idle":
            return False
        return await self._held_task(fresh) is None

    async def _held_task(self, agent: Entity) -> Entity | None:
        """The task this agent holds now, or ``None`` (a stale claim is no claim)."""
        held = agent.data.get("opscoreTask")
        if not held:
            return None
        task = await self.store.get(TASK, held)
        if task is None or task.state not in HELD or task.data.get("agentId") != agent.entity_id:
            return None
        return task

    async def _send(self, session_id: str, task_eid: str, attempt: int, agent_id: str, body: dict[str, Any]) -> None:
        result = await self.agentkit.run(agent_id, body)
        if result.outcome == "accepted":
            return
        async with self._run_locks.hold(session_id):
            task = await self.store.get(TASK, task_eid)
            if task is None or task.state not in HELD or task.data.get("attempt") != attempt:
                return
            await self._fail_attempt(task, result.error or result.outcome, cause=result.outcome)
            await self._advance(session_id)

    async def _fail_attempt(self, task: Entity, error: str, *, cause: str) -> None:
        """The attempt in hand failed: back off and retry, or fail the task for good."""
        data = task.data
        attempt = int(data.get("attempt", 0))
        failures = int(data.get("failures", 0)) + 1
        attempts = [dict(a) for a in data.get("attempts", [])]
        if attempts:
            attempts[-1].update(outcome="failed", error=error, endedAt=utc_now())
        cancel = (deadline_key(task.entity_id, attempt),)
        details = {"attempt": attempt, "cause": cause, "error": error, "failures": failures}
        if failures > int(data.get("maxRetries", 3)):
            await self.engine.fire(
                TASK,
                task.entity_id,
                "fail",
                ctx=SYSTEM,
                details={**details, "reason": f"{failures} failed attempts, maxRetries {data.get('maxRetries')}"},
                data={"failures": failures, "attempts": attempts, "error": error, "deadlineAt": None},
                cancel_timers=cancel,
            )
            return
        delay = backoff(float(data.get("retryBackoffSeconds", 1.0)), failures)
        retry_at = seconds_from_now(delay)
        timer = Timer(
            retry_key(task.entity_id, attempt),
            retry_at,
            RETRY,
            TASK,
            task.entity_id,
            {"sessionId": data["sessionId"], "attempt": attempt},
        )
        await self.engine.fire(
            TASK,
            task.entity_id,
            "fail_attempt",
            ctx=SYSTEM,
            details={**details, "retryInSeconds": round(delay, 3)},
            data={"failures": failures, "attempts": attempts, "error": error, "retryAt": retry_at, "deadlineAt": None},
            timers=(timer,),
            cancel_timers=cancel,
        )

    # -- reactions: timers ----------------------------------------------------------------------

    async def on_timer(self, timer: Timer) -> None:
        """A task deadline or a retry backoff came due (possibly after a restart)."""
        session_id = str(timer.payload.get("sessionId", ""))
        attempt = timer.payload.get("attempt")
        async with self._run_locks.hold(session_id):
            task = await self.store.get(TASK, timer.entity_id)
            if task is None or task.data.get("attempt") != attempt:
                return
            if timer.kind == DEADLINE and task.state in HELD:
                timeout = task.data.get("timeoutSeconds")
                await self._fail_attempt(
                    task, f"attempt {attempt} did not complete within {timeout} s", cause="timeout"
                )
            elif timer.kind != RETRY or task.state != "retrying":
                return
            await self._advance(session_id)

    # -- reactions: agent reports ---------------------------------------------------------------

    def listener(self, record: dict[str, Any]) -> None:
        """Engine listener: every committed record; agent transitions are handled in order."""
        if record.get("entityType") != AGENT or record.get("outcome") != "applied":
            return
        if record.get("dest") == "idle":
            self.agent_available.set()
        self.spawn(self._on_agent(record))

    async def _on_agent(self, record: dict[str, Any]) -> None:
        agent_id = str(record["entityId"])
        async with self._agent_locks.hold(agent_id):
            agent = await self.store.get(AGENT, agent_id)
            held = None if agent is None else agent.data.get("opscoreTask")
            if not held:
                return
            session_id = str(held).rpartition(":")[0]
            async with self._run_locks.hold(session_id):
                task = await self.store.get(TASK, held)
                if task is None or task.state not in HELD or task.data.get("agentId") != agent_id:
                    return
                if await self._progress(task, record):
                    await self._advance(session_id)

    async def _progress(self, task: Entity, record: dict[str, Any]) -> bool:
        """Apply one agent transition to the task it holds; whether the task changed."""
        details = record.get("details") or {}
        claimed = details.get("opscore_task_id")
        if claimed is not None and claimed not in (task.entity_id, task.data.get("taskId")):
            log.info(
                "report ignored for the run: the agent holds another task",
                extra={"agentId": record["entityId"], "holds": task.entity_id, "reported": claimed},
            )
            return False
        source, dest = record.get("source"), record.get("dest")
        note = {"agentId": record["entityId"], "agentAuditId": record["id"], "attempt": task.data.get("attempt")}
        if dest == "active":
            if task.state == "dispatched":
                await self.engine.fire(TASK, task.entity_id, "begin", ctx=SYSTEM, details=note)
                return True
            return False
        if dest == "idle" and source == "active":
            attempts = [dict(a) for a in task.data.get("attempts", [])]
            if attempts:
                attempts[-1].update(outcome="succeeded", endedAt=utc_now())
            attempt = int(task.data.get("attempt", 0))
            await self.engine.fire(
                TASK,
                task.entity_id,
                "succeed",
                ctx=SYSTEM,
                details=note,
                data={"result": details.get("result"), "attempts": attempts, "error": None, "deadlineAt": None},
                cancel_timers=(deadline_key(task.entity_id, attempt),),
            )
            return True
        if dest in AGENT_LOST:
            error = details.get("error") or f"agent {record['entityId']} went {dest} while holding the task"
            await self._fail_attempt(task, str(error), cause=f"agent_{dest}")
            return True
        return False

    # -- operators ----------------------------------------------------------------------------

    async def operate(self, session_id: str, trigger: str, ctx: Context, details: dict[str, Any] | None) -> Entity:
        """pause, resume, cancel or retry a run; 409 (recorded) when illegal in its state."""
        if trigger not in OPERATOR_TRIGGERS:
            raise UnknownTrigger(
                f"{trigger!r} is not a run trigger; valid: {', '.join(OPERATOR_TRIGGERS)}",
                valid=list(OPERATOR_TRIGGERS),
            )
        async with self._run_locks.hold(session_id):
            run = await self.engine.get(WORKFLOW, session_id)
            await self.engine.fire(WORKFLOW, session_id, trigger, ctx=ctx, details=details)
            if trigger == "cancel":
                await self._cancel_tasks(run)
            elif trigger == "retry":
                await self._retry_current(run)
            if trigger in ("resume", "retry"):
                await self._advance(session_id)
        return await self.engine.get(WORKFLOW, session_id)

    async def _cancel_tasks(self, run: Entity) -> None:
        for task_id in run.data.get("taskIds", []):
            task = await self.store.get(TASK, task_entity_id(run.entity_id, task_id))
            if task is None or task.state in ("succeeded", "skipped", "cancelled"):
                continue
            attempt = int(task.data.get("attempt", 0))
            await self.engine.fire(
                TASK,
                task.entity_id,
                "cancel",
                ctx=SYSTEM,
                details={"reason": "the run was cancelled"},
                data={"deadlineAt": None, "retryAt": None},
                cancel_timers=(deadline_key(task.entity_id, attempt), retry_key(task.entity_id, attempt)),
            )

    async def _retry_current(self, run: Entity) -> None:
        current = run.data.get("currentTaskId")
        if not current:
            return
        task = await self.store.get(TASK, task_entity_id(run.entity_id, current))
        if task is not None and task.state == "failed":
            await self.engine.fire(
                TASK,
                task.entity_id,
                "retry",
                ctx=SYSTEM,
                details={"reason": "the run was retried", "previousError": task.data.get("error")},
                data={"failures": 0, "retryAt": utc_now()},
            )

    # -- sweeps ---------------------------------------------------------------------------------

    async def recover(self) -> int:
        """Advance every unfinished run (start-up, and now and then): heals any crash gap."""
        count = 0
        for state in ("pending", "running"):
            after: str | None = None
            while True:
                page = await self.store.list_entities(EntityQuery(WORKFLOW, state=state, after_id=after, limit=500))
                for run in page:
                    try:
                        await self.advance(run.entity_id)
                    except Exception:  # one broken run must not stop the others
                        log.exception("could not advance run", extra={"sessionId": run.entity_id})
                    count += 1
                if len(page) < 500:
                    break
                after = page[-1].entity_id
        return count

    async def dispatch_waiting(self) -> None:
        """Try again the tasks waiting for an agent, longest waiting first.

        Once one task of a capability (or pinned agent) finds no free agent, the others
        needing the same are skipped for this sweep: a sweep costs O(free agents), not
        O(waiting tasks x agents), which is what keeps a backlog from eating the CPU.
        """
        waiting: list[Entity] = []
        after: str | None = None
        while True:
            page = await self.store.list_entities(EntityQuery(TASK, state="waiting", after_id=after, limit=500))
            waiting.extend(page)
            if len(page) < 500:
                break
            after = page[-1].entity_id
        waiting.sort(key=lambda t: (t.data.get("waitingSince") or "", t.entity_id))
        exhausted: set[str] = set()
        for task in waiting:
            need = (
                f"agent:{task.data.get('pinnedAgentId')}"
                if task.data.get("pinnedAgentId")
                else (f"capability:{task.data.get('agentCapability')}")
            )
            if need in exhausted:
                continue
            await self.advance(str(task.data.get("sessionId")))
            after_advance = await self.store.get(TASK, task.entity_id)
            if after_advance is not None and after_advance.state == "waiting":
                exhausted.add(need)

    async def sweep_liveness(self, agent_timeout: float) -> int:
        """Agents silent for ``agent_timeout`` s go ``offline`` (actor ``system``); their tasks fail over."""
        cutoff = seconds_from_now(-agent_timeout)
        count = 0
        after: str | None = None
        while True:
            page = await self.store.list_entities(EntityQuery(AGENT, seen_before=cutoff, after_id=after, limit=500))
            for agent in page:
                if agent.state not in ("initializing", "idle", "active", "error"):
                    continue
                try:
                    await self.engine.fire(
                        AGENT,
                        agent.entity_id,
                        "go_offline",
                        ctx=SYSTEM,
                        details={
                            "reason": f"no report for {agent_timeout:g} s",
                            "lastSeenAt": agent.last_seen_at,
                        },
                    )
                    count += 1
                except IllegalTransition:
                    pass  # it reported meanwhile
            if len(page) < 500:
                return count
            after = page[-1].entity_id
