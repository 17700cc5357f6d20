"""Which agent holds which task: the claim written on an agent before a dispatch.

**Why two replicas never give one agent two tasks.** A claim (:class:`AgentClaim`: the task,
the attempt, a fresh random token, the claiming process) is written on the agent with a
compare-and-set on the token and the revision that the selection read (``expected_data`` and
``expected_revision``: a data-only write moves no revision, so the revision alone would let
two replicas both "win"). Only then does the task's own compare-and-set to ``dispatched``
follow (:mod:`opscore.workflows.progress`). A claim is *held* while its task is
``dispatched``/``running`` with this agent at that attempt, *pending* while the task is
still at the attempt before and dispatchable (its claimer is between the two writes), and
*over* otherwise; it is never released, only found over. Held and pending claims keep an
agent from every other task, and a reader can only find a claim over once its task has moved
past it for good. A pending claim of another replica yields to its own task after
:data:`CLAIM_GRACE_SECONDS` (its claimer is presumed dead; the task's compare-and-set still
lets only one dispatch win). The one cost: a replica killed between the claim and the task
write of a run that is then paused leaves that agent reserved until the run resumes or is
cancelled.
"""

from __future__ import annotations

import uuid
from enum import StrEnum

from opscore import clock
from opscore.models import Entity, EntityQuery
from opscore.workflows.shared import Shared
from opscore.workflows.state import (
    AGENT,
    CLAIM_KEY,
    DISPATCHABLE,
    HELD,
    SYSTEM,
    TASK,
    AgentClaim,
    RunData,
    TaskData,
    last_dispatch_at,
)

CLAIM_GRACE_SECONDS = 10.0
"""How long another replica's pending claim on an agent keeps even its own task off it."""


class Hold(StrEnum):
    """What an agent's claim means now (:meth:`Claims.status`)."""

    HELD = "held"
    PENDING = "pending"
    FREE = "free"


class Claims:
    def __init__(self, shared: Shared) -> None:
        self.shared = shared

    async def choose(self, run: Entity, task: Entity) -> Entity | None:
        """The task's pinned agent; else the triggering agent if capable; else the least recently busy.

        The answer is a fresh read of a free agent, the one :meth:`claim` compares against.
        """
        store = self.shared.store
        spec = TaskData.of(task)
        if spec.pinned_agent_id:
            return await self.free(spec.pinned_agent_id, task.entity_id)
        trigger = RunData.of(run).agent_id
        if trigger:
            agent = await store.get(AGENT, trigger)
            if agent is not None and spec.capability in agent.data.get("capabilities", []):
                fresh = await self.free(trigger, task.entity_id)
                if fresh is not None:
                    return fresh
        query = EntityQuery(AGENT, state="idle", capability=spec.capability)
        candidates = [agent async for agent in self.shared.every(query)]
        candidates.sort(key=lambda a: (last_dispatch_at(a), a.entity_id))
        for agent in candidates:
            fresh = await self.free(agent.entity_id, task.entity_id)
            if fresh is not None:
                return fresh
        return None

    async def free(self, agent_id: str, task_eid: str) -> Entity | None:
        """The agent, freshly read, when it is idle and its claim leaves it free for the task."""
        fresh = await self.shared.store.get(AGENT, agent_id)  # a listed snapshot may be older
        if fresh is None or fresh.state != "idle":
            return None
        return fresh if await self.status(fresh, task_eid) is Hold.FREE else None

    async def claim(self, agent: Entity, task: Entity, attempt: int) -> None:
        """Write on ``agent`` that it is about to hold attempt ``attempt`` of ``task``; ``LOST`` if taken.

        ``agent`` is the read that found it free: the write holds only if its claim and its
        revision are still what that read saw. The token is new each time, so a claim can
        never come back to a value an earlier reader saw (no ABA).
        """
        now = clock.now()
        claim = AgentClaim(task.entity_id, attempt, uuid.uuid4().hex, self.shared.instance, now, agent.seq)
        await self.shared.engine.update(
            AGENT,
            agent.entity_id,
            claim.to_data(last_dispatch_at=now),
            ctx=SYSTEM,
            expected_revision=agent.revision,
            expected_data={CLAIM_KEY: AgentClaim.raw(agent)},
        )

    async def status(self, agent: Entity, for_task: str | None = None) -> Hold:
        """Whether the agent's claim is held (its task is out with it), pending (a dispatch may be on
        its way) or over (:class:`Hold`).

        A claim on attempt n of task T is held while T is dispatched/running with this agent at
        attempt n, and pending while T is still at attempt n-1 and dispatchable. A pending claim
        made by this process is over (this process dispatches one at a time, so that dispatch
        lost its race); one made by another replica blocks other tasks, and blocks T itself for
        :data:`CLAIM_GRACE_SECONDS`.
        """
        claim = AgentClaim.of(agent)
        if claim is None:
            return Hold.FREE
        task = await self.shared.store.get(TASK, claim.task)
        if task is None:
            return Hold.FREE
        spec = TaskData.of(task)
        if task.state in HELD and spec.agent_id == agent.entity_id and spec.attempt == claim.attempt:
            return Hold.HELD
        if task.state in DISPATCHABLE and spec.attempt == claim.attempt - 1:
            if claim.by == self.shared.instance:
                return Hold.FREE
            if for_task == claim.task and claim.claimed_at < clock.after(-CLAIM_GRACE_SECONDS):
                return Hold.FREE
            return Hold.PENDING
        return Hold.FREE

    async def held_task(self, agent: Entity) -> Entity | None:
        """The task this agent holds now, or ``None`` (a stale or pending claim is no hold)."""
        claim = AgentClaim.of(agent)
        if claim is None or await self.status(agent) is not Hold.HELD:
            return None
        return await self.shared.store.get(TASK, claim.task)
