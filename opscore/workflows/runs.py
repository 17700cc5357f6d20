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
same transaction; the HTTP call to AgentKit is made only after that commit, and only by the
caller whose commit it was. A crash before the call leaves a dispatched attempt that was
never sent: its deadline fails it and the retry path sends attempt n+1. Nothing ever
re-sends attempt n, and every reaction (HTTP answer, agent report, timer) checks the attempt
number it was meant for, so a late answer about attempt n cannot touch attempt n+1.

**Correct across replicas: every decision is a compare-and-set.** Several processes on one
PostgreSQL database run the same code on the same rows, and nothing process-local (the
asyncio locks below) can serialise them. So every write that decides something is made
against the revision it was decided on: task ``dispatch`` (attempt n = the attempt read +
1), ``wait``, ``begin``, ``succeed``, ``fail_attempt``, ``fail``, ``skip``, ``cancel``,
``retry``, and the run's ``start``, ``complete``, ``fail`` go through the engine with
``Context.if_match``; moving the run to its next task, a data-only write that moves no
revision, is a CAS on the revision *and* on ``currentTaskId``
(``Change.expected_data``); tasks are created create-only. A write that loses
(``PreconditionFailed``/``RevisionConflict``, together :data:`LOST`) means someone else
acted first: the reaction re-reads and decides again, which finds the work done or does
what is left. Two callers that read the same task revision compute the same attempt n and
only one CAS wins; once it has, no revision with attempt n-1 is ever current again, so
attempt n is dispatched, and sent, once. (A lost ``If-Match`` detected before the write is
recorded as a rejected audit record with reason ``revision_mismatch`` and actor
``system``: the trace of a replica that lost a race.) Timers are claimed with ``FOR UPDATE
SKIP LOCKED`` and a lease (:mod:`opscore.workflows.scheduler`); a timer handled twice (a
lease that ran out) meets the same CAS and does nothing the second time.

**Which agent holds which task** is a claim written on the agent before the dispatch:
``data.opscoreTask`` (task entity id), ``opscoreAttempt``, and a fresh random
``opscoreClaim`` token, written with a CAS on the token and revision that the selection
read (``expected_data``/``expected_revision``: a data-only write moves no revision, so the
revision alone would let two replicas both "win"). Then the task CAS follows. A claim is
*held* while its task is ``dispatched``/``running`` with this agent at that attempt,
*pending* while the task is still at the attempt before and dispatchable (its claimer is
between the two writes), and *over* otherwise; it is never released, only found over.
Held and pending claims keep an agent from every other task, so two replicas never give
one agent two tasks: a reader can only find a claim over once its task has moved past it
for good. A pending claim of another replica yields to its own task after
``CLAIM_GRACE_SECONDS`` (its claimer is presumed dead; the task CAS still lets only one
dispatch win). The one cost of this design: a replica killed between the claim and the
task write of a run that is then paused leaves that agent reserved until the run resumes
or is cancelled. Reports are applied to the held task only when their agent ``seq`` is
newer than the claim (``opscoreSince``), so a late report about an earlier task cannot
finish the next one. The real AgentKit reports ``details: {}``, so progress is correlated
by agent; ``details.opscore_task_id``, when present, must name the held task or the report
is ignored for the run (its own audit record is already written).

**Deadlines keep running while a run is paused**, on purpose: pause stops the run from
*starting* work (no next task, no retry is dispatched while paused) but cannot recall a
task already with an agent. That task is still out there, so its deadline is still the
only guard against an agent that never answers: an attempt that times out or fails while
paused counts against ``maxRetries`` like any other (it did fail), the task waits in
``retrying``, and its next attempt is dispatched on ``resume``. A success reported while
paused is kept, and the run moves on at ``resume``.

Inside one process, as an optimisation only: one asyncio lock per run serialises what
reads and changes a run and its tasks; one per agent keeps an agent's reports in order;
agent selection is serialised so the process never races itself for an agent (and so that a
pending claim of this process is known to be over).
"""

from __future__ import annotations

import asyncio
import logging
import random
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from datetime import UTC, datetime, timedelta
from typing import Any

from opscore.audit import is_transition
from opscore.engine import Context, Engine
from opscore.errors import IllegalTransition, NotFound, PreconditionFailed, RevisionConflict, UnknownTrigger
from opscore.locks import KeyedLocks
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
DISPATCHABLE = ("pending", "waiting", "retrying")
"""Task states from which the next attempt may be dispatched."""
AGENT_LOST = ("error", "offline", "deregistered", "initializing")
"""Agent states that end the attempt the agent holds."""
OPERATOR_TRIGGERS = ("pause", "resume", "cancel", "retry")
MAX_BACKOFF_SECONDS = 300.0
DEADLINE = "task-deadline"
RETRY = "task-retry"

LOST = (PreconditionFailed, RevisionConflict)
"""A compare-and-set lost: the entity moved since it was read. Re-read, never repeat blindly."""
MAX_RACES = 50
"""Lost races one reaction absorbs before leaving the rest to the sweeps (a safety net only)."""
CLAIM_GRACE_SECONDS = 10.0
"""How long another replica's pending claim on an agent keeps even its own task off it."""
HELD_, PENDING, FREE = "held", "pending", "free"
"""What an agent's claim means now (see :meth:`Runs._claim_status`)."""


def cas(entity: Entity) -> Context:
    """The system acting on ``entity`` only if it is still at the revision that was read."""
    return Context(actor=SYSTEM.actor, if_match=entity.revision)


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
        self._run_locks = KeyedLocks()
        self._agent_locks = KeyedLocks()
        self._select = asyncio.Lock()
        self.instance = uuid.uuid4().hex
        """Names this process's claims on agents (see :meth:`_claim_status`)."""
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
        await self.engine.create(WORKFLOW, session_id, data, ctx=ctx)
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
        """Do what the current task's state calls for; the run lock is held. Idempotent.

        Each step is a compare-and-set on what it read; a step that loses (another replica,
        or an operator, moved the run or the task first) is simply taken again from a fresh
        read, which then finds the work done or does what is left.
        """
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
        """One step of :meth:`_advance`; whether there may be another. ``LOST`` on a lost race."""
        run = await self.store.get(WORKFLOW, session_id)
        if run is None:
            return False
        if run.state == "pending":
            await self._begin(run, ctx)
            return True
        if run.state != "running":
            return False
        current = run.data.get("currentTaskId")
        task = await self.store.get(TASK, task_entity_id(session_id, current)) if current else None
        if task is None:
            await self._fail_run(run, f"task {current!r} of this run is missing", current)
            return False
        state = task.state
        if state in ("pending", "waiting"):
            await self._dispatch(run, task)
            return False
        if state == "retrying":
            if (task.data.get("retryAt") or "") <= utc_now():
                await self._dispatch(run, task)
            return False
        if state == "succeeded":
            nxt = task.data.get("nextTaskId")
            if nxt is None:
                await self._complete(run)
                return False
            await self._move(run, nxt)
            return True
        if state == "failed":
            fallback = task.data.get("fallbackTaskId")
            if fallback is not None:
                await self._move(run, fallback)
                return True
            await self._fail_run(run, f"task {current!r} failed: {task.data.get('error')}", current)
            return False
        return False  # dispatched/running: the agent has it; cancelled/skipped: nothing to do

    async def _begin(self, run: Entity, ctx: Context) -> None:
        definition = await self.definition(run.data["workflowId"], run.data["workflowVersion"])
        sid = run.entity_id
        for task_id in definition.tasks:
            # create-only: a replica healing the same gap must not reset a task another one moved
            await self.engine.create(
                TASK, task_entity_id(sid, task_id), self._task_data(sid, definition, task_id), ctx=SYSTEM
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
        path = [*run.data.get("path", []), task_id]
        await self.engine.update(
            WORKFLOW,
            run.entity_id,
            {"currentTaskId": task_id, "path": path},
            ctx=SYSTEM,
            expected_revision=run.revision,
            expected_data={"currentTaskId": run.data.get("currentTaskId")},
        )

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
                    TASK,
                    task.entity_id,
                    "skip",
                    ctx=cas(task),
                    details={"reason": "not on the path the run took"},
                )
        await self.engine.fire(
            WORKFLOW,
            sid,
            "complete",
            ctx=cas(run),
            data={"results": results, "reason": None},
            details={"path": run.data.get("path")},
        )

    async def _fail_run(self, run: Entity, reason: str, task_id: str | None) -> None:
        await self.engine.fire(
            WORKFLOW,
            run.entity_id,
            "fail",
            ctx=cas(run),
            data={"reason": reason},
            details={"reason": reason, "taskId": task_id},
        )

    # -- dispatch -----------------------------------------------------------------------------

    async def _dispatch(self, run: Entity, task: Entity) -> None:
        """Claim an agent, commit ``dispatched`` (attempt n, its deadline), then send, at most once.

        Two compare-and-sets, in this order: the claim on the agent (its ``opscoreClaim`` token
        as read, and its revision), then the task's move to ``dispatched`` on the revision read.
        Only the caller whose task CAS wins sends the ``/run``; a loser raises ``LOST`` and the
        run is re-read. The selection lock only saves this process from racing itself.
        """
        async with self._select:
            attempt = int(task.data.get("attempt", 0)) + 1
            for _ in range(MAX_RACES):
                agent = await self._choose(run, task)
                if agent is None:
                    if task.state != "waiting":
                        capability = task.data.get("pinnedAgentId") or task.data.get("agentCapability")
                        await self.engine.fire(
                            TASK,
                            task.entity_id,
                            "wait",
                            ctx=cas(task),
                            data={"waitingSince": utc_now()},
                            details={"reason": f"no free idle agent for {capability!r}"},
                        )
                    return
                try:
                    await self._claim(agent, task, attempt)
                except LOST:
                    continue  # another replica took this agent first: choose again
                break
            else:
                log.warning("agents kept being taken; the task waits for the next sweep",
                            extra={"task": task.entity_id})  # fmt: skip
                return
            agent_id = agent.entity_id
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
                ctx=cas(task),
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

    async def _claim(self, agent: Entity, task: Entity, attempt: int) -> None:
        """Write on ``agent`` that it is about to hold attempt ``attempt`` of ``task``; ``LOST`` if taken.

        ``agent`` is the read that found it free: the write holds only if its claim token and
        its revision are still what that read saw. The token is new each time, so a claim can
        never come back to a value an earlier reader saw (no ABA).
        """
        now = utc_now()
        await self.engine.update(
            AGENT,
            agent.entity_id,
            {
                "opscoreTask": task.entity_id,
                "opscoreAttempt": attempt,
                "opscoreClaim": uuid.uuid4().hex,
                "opscoreClaimBy": self.instance,
                "opscoreClaimedAt": now,
                "opscoreSince": agent.seq,
                "lastDispatchAt": now,
            },
            ctx=SYSTEM,
            expected_revision=agent.revision,
            expected_data={"opscoreClaim": agent.data.get("opscoreClaim")},
        )

    async def _previous_result(self, run: Entity) -> Any:
        path = run.data.get("path", [])
        if len(path) < 2:
            return None
        previous = await self.store.get(TASK, task_entity_id(run.entity_id, path[-2]))
        return None if previous is None else previous.data.get("result")

    async def _choose(self, run: Entity, task: Entity) -> Entity | None:
        """The task's ``agentId``; else the triggering agent if capable; else the least recently busy.

        The answer is a fresh read of a free agent, the one :meth:`_claim` compares against.
        """
        pinned = task.data.get("pinnedAgentId")
        if pinned:
            return await self._free(pinned, task)
        capability = task.data.get("agentCapability")
        trigger = run.data.get("agentId")
        if trigger:
            agent = await self.store.get(AGENT, trigger)
            if agent is not None and capability in agent.data.get("capabilities", []):
                fresh = await self._free(trigger, task)
                if fresh is not None:
                    return fresh
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
            fresh = await self._free(agent.entity_id, task)
            if fresh is not None:
                return fresh
        return None

    async def _free(self, agent_id: str, task: Entity) -> Entity | None:
        """The agent, freshly read, when it is idle and its claim leaves it free for ``task``."""
        fresh = await self.store.get(AGENT, agent_id)  # a listed snapshot may be older
        if fresh is None or fresh.state != "idle":
            return None
        return fresh if await self._claim_status(fresh, task.entity_id) == FREE else None

    async def _claim_status(self, agent: Entity, for_task: str | None = None) -> str:
        """``HELD`` (its task is out with it), ``PENDING`` (a dispatch may be on its way) or ``FREE``.

        A claim on attempt n of task T is *held* while T is dispatched/running with this agent
        at attempt n, and *pending* while T is still at attempt n-1 and dispatchable (the
        claimer has not committed the dispatch yet). Anything else is over: T moved on, or
        went elsewhere. These only ever end, so a reader that finds a claim over may take the
        agent. A pending claim made by this process is over too (this process dispatches one
        at a time, under ``_select``, so that dispatch lost its race); one made by another
        replica blocks other tasks, and blocks T itself for ``CLAIM_GRACE_SECONDS`` (after
        that its claimer is presumed dead: T may take the agent, since only one claimer can
        win T's own compare-and-set).
        """
        held = agent.data.get("opscoreTask")
        if not held:
            return FREE
        task = await self.store.get(TASK, held)
        if task is None:
            return FREE
        mine = task.state in HELD and task.data.get("agentId") == agent.entity_id
        claimed = agent.data.get("opscoreAttempt")
        if claimed is None:  # a claim written before claims carried their attempt
            return HELD_ if mine else FREE
        at = int(task.data.get("attempt", 0))
        if mine and at == claimed:
            return HELD_
        if task.state in DISPATCHABLE and at == claimed - 1:
            if agent.data.get("opscoreClaimBy") == self.instance:
                return FREE
            claimed_at = agent.data.get("opscoreClaimedAt") or ""
            if for_task == held and claimed_at < seconds_from_now(-CLAIM_GRACE_SECONDS):
                return FREE
            return PENDING
        return FREE

    async def _held_task(self, agent: Entity) -> Entity | None:
        """The task this agent holds now, or ``None`` (a stale or pending claim is no hold)."""
        if await self._claim_status(agent) != HELD_:
            return None
        return await self.store.get(TASK, agent.data["opscoreTask"])

    async def _send(self, session_id: str, task_eid: str, attempt: int, agent_id: str, body: dict[str, Any]) -> None:
        result = await self.agentkit.run(agent_id, body)
        if result.outcome == "accepted":
            return

        async def fail() -> bool:
            task = await self.store.get(TASK, task_eid)
            if task is None or task.state not in HELD or task.data.get("attempt") != attempt:
                return False
            await self._fail_attempt(task, result.error or result.outcome, cause=result.outcome)
            return True

        async with self._run_locks.hold(session_id):
            if await self._until_settled(fail):
                await self._advance(session_id)

    async def _until_settled(self, step: Callable[[], Awaitable[bool]]) -> bool:
        """Run ``step`` (which reads afresh and decides) until it does not lose a race; its answer."""
        for _ in range(MAX_RACES):
            try:
                return await step()
            except LOST:
                continue
        log.warning("an entity kept changing under this replica; giving up this reaction")
        return False

    async def _fail_attempt(self, task: Entity, error: str, *, cause: str) -> None:
        """The attempt in hand failed: back off and retry, or fail the task for good (CAS on ``task``)."""
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
                ctx=cas(task),
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
            ctx=cas(task),
            details={**details, "retryInSeconds": round(delay, 3)},
            data={"failures": failures, "attempts": attempts, "error": error, "retryAt": retry_at, "deadlineAt": None},
            timers=(timer,),
            cancel_timers=cancel,
        )

    # -- reactions: timers ----------------------------------------------------------------------

    async def on_timer(self, timer: Timer) -> None:
        """A task deadline or a retry backoff came due (possibly after a restart, or on another replica)."""
        session_id = str(timer.payload.get("sessionId", ""))
        attempt = timer.payload.get("attempt")

        async def react() -> bool:
            task = await self.store.get(TASK, timer.entity_id)
            if task is None or task.data.get("attempt") != attempt:
                return False
            if timer.kind == DEADLINE and task.state in HELD:
                timeout = task.data.get("timeoutSeconds")
                await self._fail_attempt(
                    task, f"attempt {attempt} did not complete within {timeout} s", cause="timeout"
                )
                return True
            return timer.kind == RETRY and task.state == "retrying"

        async with self._run_locks.hold(session_id):
            if await self._until_settled(react):
                await self._advance(session_id)

    # -- reactions: agent reports ---------------------------------------------------------------

    def listener(self, record: dict[str, Any], entity: Entity) -> None:
        """Engine listener: every committed record; agent transitions are handled in order.

        An agent that has never been claimed for a task (no ``opscoreTask`` in the entity
        this very commit left) cannot be holding one, so nothing is spawned for it: most
        reports of a fleet are about agents outside any workflow. A claim is committed
        before its dispatch, and so before any report the dispatch can cause.
        """
        if record.get("entityType") != AGENT or record.get("outcome") != "applied":
            return
        if record.get("dest") == "idle":
            self.agent_available.set()  # also when an idle agent's capabilities changed
        if not is_transition(record):
            return
        if entity.data.get("opscoreTask") is None:
            return
        self.spawn(self._on_agent(record))

    async def _on_agent(self, record: dict[str, Any]) -> None:
        """Apply an agent's transition to the task it holds, if any (this replica committed it)."""
        agent_id = str(record["entityId"])
        async with self._agent_locks.hold(agent_id):
            for _ in range(MAX_RACES):
                agent = await self.store.get(AGENT, agent_id)
                task = None if agent is None else await self._held_task(agent)
                if agent is None or task is None:
                    return
                if int(record.get("seq", 0)) <= int(agent.data.get("opscoreSince", -1)):
                    return  # older than the claim: about an earlier task
                session_id = str(task.data.get("sessionId"))
                async with self._run_locks.hold(session_id):
                    task = await self.store.get(TASK, task.entity_id)
                    if task is None or task.state not in HELD or task.data.get("agentId") != agent_id:
                        return
                    if task.data.get("attempt") != agent.data.get("opscoreAttempt", task.data.get("attempt")):
                        continue  # the claim moved on meanwhile: read it again
                    try:
                        changed = await self._progress(task, record)
                    except LOST:
                        continue  # e.g. its deadline fired on another replica: decide again
                    if changed:
                        await self._advance(session_id)
                    return

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
                await self.engine.fire(TASK, task.entity_id, "begin", ctx=cas(task), details=note)
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
                ctx=cas(task),
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
        async with self._run_locks.hold(session_id):
            run = await self.engine.get(WORKFLOW, session_id)
            # back to running: the failure that stopped it is no longer the run's reason
            cleared = {"reason": None} if trigger in ("resume", "retry") else None
            await self.engine.fire(WORKFLOW, session_id, trigger, ctx=ctx, details=details, data=cleared)
            if trigger == "cancel":
                await self._cancel_tasks(run)
            elif trigger == "retry":
                await self._retry_current(run)
            if trigger in ("resume", "retry"):
                await self._advance(session_id)
        return await self.engine.get(WORKFLOW, session_id)

    async def _cancel_tasks(self, run: Entity) -> None:
        """Cancel every unfinished task, whatever another replica does to it meanwhile."""
        for task_id in run.data.get("taskIds", []):
            eid = task_entity_id(run.entity_id, task_id)

            async def cancel(eid: str = eid) -> bool:
                task = await self.store.get(TASK, eid)
                if task is None or task.state in ("succeeded", "skipped", "cancelled"):
                    return False
                attempt = int(task.data.get("attempt", 0))
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

            await self._until_settled(cancel)

    async def _retry_current(self, run: Entity) -> None:
        current = run.data.get("currentTaskId")
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
                details={"reason": "the run was retried", "previousError": task.data.get("error")},
                data={"failures": 0, "retryAt": utc_now()},
            )
            return True

        await self._until_settled(retry)

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
            for listed in page:
                # Decide on a fresh read and apply only to that revision: every replica sweeps,
                # and an agent heard from meanwhile (here or on another replica) stays.
                agent = await self.store.get(AGENT, listed.entity_id)
                if agent is None or agent.state not in ("initializing", "idle", "active", "error"):
                    continue
                if (agent.last_seen_at or "") >= cutoff:
                    continue
                try:
                    await self.engine.fire(
                        AGENT,
                        agent.entity_id,
                        "go_offline",
                        ctx=cas(agent),
                        details={
                            "reason": f"no report for {agent_timeout:g} s",
                            "lastSeenAt": agent.last_seen_at,
                        },
                    )
                    count += 1
                except (IllegalTransition, *LOST):
                    pass  # it reported meanwhile, or another replica sent it offline first
            if len(page) < 500:
                return count
            after = page[-1].entity_id
