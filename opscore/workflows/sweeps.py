"""The periodic passes the scheduler makes: recover runs, retry waiting tasks, send silent agents offline."""

from __future__ import annotations

import logging

from opscore import clock
from opscore.errors import IllegalTransition
from opscore.models import Entity, EntityQuery
from opscore.workflows.progress import Progress
from opscore.workflows.shared import Shared
from opscore.workflows.state import AGENT, LOST, TASK, WORKFLOW, TaskData, cas

log = logging.getLogger("opscore.workflows")

ALIVE = ("initializing", "idle", "active", "error")
"""Agent states the liveness sweep may send ``offline``."""


class Sweeps:
    def __init__(self, shared: Shared, progress: Progress) -> None:
        self.shared = shared
        self.store = shared.store
        self.engine = shared.engine
        self.progress = progress

    async def recover(self) -> int:
        """Advance every unfinished run (start-up, and now and then): heals any crash gap."""
        count = 0
        for state in ("pending", "running"):
            async for run in self.shared.every(EntityQuery(WORKFLOW, state=state)):
                try:
                    await self.progress.advance(run.entity_id)
                except Exception:  # one broken run must not stop the others
                    log.exception("could not advance run", extra={"sessionId": run.entity_id})
                count += 1
        return count

    async def dispatch_waiting(self) -> None:
        """Try again the tasks waiting for an agent, longest waiting first.

        Once one task of a capability (or pinned agent) finds no free agent, the others
        needing the same are skipped for this sweep: a sweep costs O(free agents), not
        O(waiting tasks x agents), which is what keeps a backlog from eating the CPU.
        """
        went_waiting = self.shared.went_waiting
        waiting: list[Entity] = [task async for task in self.shared.every(EntityQuery(TASK, state="waiting"))]
        if not waiting and self.store.sole_writer and went_waiting == self.shared.went_waiting:
            # None, and none went waiting while we looked (one committed after the read moves
            # went_waiting before or after this line, and clears the flag either way).
            self.shared.none_waiting = True
        waiting.sort(key=lambda t: (TaskData.of(t).waiting_since or "", t.entity_id))
        exhausted: set[str] = set()
        for task in waiting:
            spec = TaskData.of(task)
            if spec.need in exhausted:
                continue
            await self.progress.advance(spec.session_id)
            after = await self.store.get(TASK, task.entity_id)
            if after is not None and after.state == "waiting":
                exhausted.add(spec.need)

    async def sweep_liveness(self, agent_timeout: float) -> int:
        """Agents silent for ``agent_timeout`` s go ``offline`` (actor ``system``); their tasks fail over."""
        cutoff = clock.after(-agent_timeout)
        count = 0
        async for listed in self.shared.every(EntityQuery(AGENT, seen_before=cutoff)):
            # Decide on a fresh read and apply only to that revision: every replica sweeps,
            # and an agent heard from meanwhile (here or on another replica) stays.
            agent = await self.store.get(AGENT, listed.entity_id)
            if agent is None or agent.state not in ALIVE or (agent.last_seen_at or "") >= cutoff:
                continue
            try:
                await self.engine.fire(
                    AGENT,
                    agent.entity_id,
                    "go_offline",
                    ctx=cas(agent),
                    details={"reason": f"no report for {agent_timeout:g} s", "lastSeenAt": agent.last_seen_at},
                )
                count += 1
            except (IllegalTransition, *LOST):
                pass  # it reported meanwhile, or another replica sent it offline first
        return count
