"""What every part of the run logic shares: the engine, the store, AgentKit, locks, background work.

Inside one process, as an optimisation only (replicas are kept correct by compare-and-set,
see :mod:`opscore.workflows.progress`): one lock per run serialises what reads and changes a
run and its tasks, one per agent keeps an agent's reports in order, and agent selection is
serialised so the process never races itself for an agent.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import replace
from typing import Any

from opscore.engine import Engine
from opscore.locks import KeyedLocks
from opscore.models import Entity, EntityQuery
from opscore.storage.base import Store
from opscore.workflows.dispatch import AgentKitClient
from opscore.workflows.state import LOST, MAX_RACES

log = logging.getLogger("opscore.workflows")

PAGE = 500


class Shared:
    def __init__(self, engine: Engine, agentkit: AgentKitClient, *, default_timeout: float) -> None:
        self.engine = engine
        self.store: Store = engine.store
        self.agentkit = agentkit
        self.default_timeout = default_timeout
        self.run_locks = KeyedLocks()
        self.agent_locks = KeyedLocks()
        self.selecting = asyncio.Lock()
        self.instance = uuid.uuid4().hex
        """Names this process's claims on agents (:mod:`opscore.workflows.claims`)."""
        self.agent_available = asyncio.Event()
        """Set when an agent became idle: the scheduler then retries waiting tasks at once."""
        self.none_waiting = False
        """No task is ``waiting``: known only when this process is the store's only writer.

        Set by a look that found none (``Sweeps.dispatch_waiting``), cleared by any task this
        process sends to ``waiting`` (``Reactions.listener``). While it holds, agents going
        idle do not wake the scheduler: a fleet reporting without workflows costs it nothing.
        """
        self.went_waiting = 0
        """Tasks this process sent to ``waiting`` so far (a look that raced one leaves ``none_waiting`` alone)."""
        self.background: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.background.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self.background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("workflow step failed", exc_info=task.exception())

    async def drain(self) -> None:
        """Wait for in-flight dispatches and report handling (shutdown, tests)."""
        while self.background:
            await asyncio.gather(*list(self.background), return_exceptions=True)

    async def cancel_background(self) -> None:
        for task in list(self.background):
            task.cancel()
        await asyncio.gather(*list(self.background), return_exceptions=True)

    async def until_settled(self, step: Callable[[], Awaitable[bool]]) -> bool:
        """Run ``step`` (which reads afresh and decides) until it does not lose a race; its answer."""
        for _ in range(MAX_RACES):
            try:
                return await step()
            except LOST:
                continue
        log.warning("an entity kept changing under this replica; giving up this reaction")
        return False

    async def every(self, query: EntityQuery) -> AsyncIterator[Entity]:
        """Every entity ``query`` matches, a page of :data:`PAGE` at a time."""
        query = replace(query, limit=PAGE)
        while True:
            page = await self.store.list_entities(query)
            for entity in page:
                yield entity
            if len(page) < PAGE:
                return
            query = replace(query, after_id=page[-1].entity_id)
