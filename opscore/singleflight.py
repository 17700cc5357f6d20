"""One run of an expensive coroutine at a time, its result shared by everyone who asked meanwhile.

``GET /audit/verify`` re-hashes every record (seconds at 300k records); eight callers at once
each ran their own verification and starved the event loop (an audit page took 26 s,
``/health`` 1.9 s). With a :class:`SingleFlight`, callers arriving while a run is in progress
wait for that run and share its answer, so at most one runs, however many ask. ``reuse``
keeps a finished result for that many seconds (the readiness probe), ``0`` never reuses one.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class SingleFlight(Generic[T]):
    def __init__(self, reuse: float = 0.0) -> None:
        self.reuse = reuse
        self._running: asyncio.Task[T] | None = None
        self._finished_at = 0.0

    async def run(self, start: Callable[[], Awaitable[T]]) -> T:
        """The result of the run in progress, of a recent one (within ``reuse`` s), or of a new one."""
        task = self._running
        fresh = task is not None and task.done() and time.monotonic() - self._finished_at < self.reuse
        if task is None or (task.done() and not fresh):
            task = self._running = asyncio.get_running_loop().create_task(self._timed(start))
        return await asyncio.shield(task)

    async def _timed(self, start: Callable[[], Awaitable[T]]) -> T:
        try:
            return await start()
        finally:
            self._finished_at = time.monotonic()
