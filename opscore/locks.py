"""Locks by key (an entity, an Idempotency-Key, a run), created on demand and dropped when free."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any


class KeyedLocks:
    """FIFO locks by key, dropped when nobody holds or waits for them.

    A key is held while it is in ``_held``; its value is the queue of waiters (``None``
    until someone waits). Taking a free key is a dict insert with no await
    (:meth:`try_acquire`), cheaper than an ``asyncio.Lock`` per key (``docs/performance.md``).
    A waiter gets the key handed over by :meth:`release`, in arrival order, as
    ``asyncio.Lock`` would.
    """

    __slots__ = ("_held",)

    def __init__(self) -> None:
        self._held: dict[Any, deque[asyncio.Future[None]] | None] = {}

    def try_acquire(self, key: Any) -> bool:
        """Take ``key`` if nobody holds it; never waits."""
        if key in self._held:
            return False
        self._held[key] = None
        return True

    async def acquire(self, key: Any) -> None:
        """Take ``key``, waiting behind its holder and earlier waiters."""
        if self.try_acquire(key):
            return
        waiters = self._held[key]
        if waiters is None:
            waiters = self._held[key] = deque()
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiters.append(future)
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release(key)  # handed over just as we were cancelled: pass it on
            else:
                with contextlib.suppress(ValueError):
                    waiters.remove(future)
            raise

    def release(self, key: Any) -> None:
        """Hand ``key`` to its next live waiter, or drop it."""
        waiters = self._held[key]
        while waiters:
            future = waiters.popleft()
            if not future.done():
                future.set_result(None)
                return
        del self._held[key]

    @asynccontextmanager
    async def hold(self, key: Any) -> AsyncIterator[None]:
        await self.acquire(key)
        try:
            yield
        finally:
            self.release(key)
