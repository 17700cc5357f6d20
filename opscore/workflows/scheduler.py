"""The background loop that makes time pass for workflows.

One asyncio task per process, started in the app's lifespan. Each tick it

- claims due timers from the store (task deadlines, retry backoffs), once a tick however
  often the loop wakes, and hands each to
  :meth:`Runs.on_timer`, then deletes it; a claim is a lease, so among PostgreSQL replicas one
  process handles a timer, and a process killed mid-handling lets it come back when the lease
  runs out. Timers are rows written with the change that armed them: after ``kill -9`` the
  next process finds exactly the deadlines that were committed;
- retries tasks ``waiting`` for an agent, at once when an agent became idle (agents going idle
  within ``wake_gap`` s of the last look share the next one; with the store's only writer, a
  look that found none stops the wakes until a task goes ``waiting``), else every
  ``waiting_interval`` s (an agent's capabilities may arrive by webhook, which writes no
  record a listener could see);
- sends agents silent for ``OPSCORE_AGENT_TIMEOUT_SECONDS`` ``offline`` (actor ``system``);
- every ``recover_interval`` s advances unfinished runs, which heals a run left between two
  writes by a crash of another replica;
- every ``purge_interval`` s drops idempotency answers past their 48 h (any replica may: the
  delete is idempotent).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from opscore.storage.base import utc_now
from opscore.workflows.runs import Runs

log = logging.getLogger("opscore.workflows")


class Scheduler:
    def __init__(
        self,
        runs: Runs,
        *,
        agent_timeout: float,
        tick: float = 0.2,
        lease_seconds: float = 15.0,
        waiting_interval: float = 1.0,
        liveness_interval: float | None = None,
        recover_interval: float = 30.0,
        purge_interval: float = 3600.0,
        wake_gap: float = 0.02,
    ) -> None:
        self.runs = runs
        self.agent_timeout = agent_timeout
        self.tick = tick
        self.lease_seconds = lease_seconds
        self.waiting_interval = waiting_interval
        self.liveness_interval = liveness_interval or max(0.5, min(agent_timeout / 4, 15.0))
        self.recover_interval = recover_interval
        self.purge_interval = purge_interval
        self.wake_gap = wake_gap
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    async def start(self) -> None:
        await self.runs.recover()
        self._task = asyncio.get_running_loop().create_task(self._main(), name="opscore-scheduler")

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _main(self) -> None:
        clock = time.monotonic()
        next_waiting = clock + self.waiting_interval
        next_liveness = clock + self.liveness_interval
        next_recover = clock + self.recover_interval
        next_purge = next_timers = clock
        looked = clock - self.wake_gap
        while not self._stop.is_set():
            try:
                # An agent becoming idle wakes the loop for the waiting tasks, which under a fleet
                # reporting all the time is as often as reports commit: the looks are spaced by
                # wake_gap below, and the timers (a write through the store) keep the tick.
                if time.monotonic() >= next_timers:
                    next_timers = time.monotonic() + self.tick  # a claim that failed comes back at the tick
                    await self._timers()
                clock = time.monotonic()
                if self.runs.agent_available.is_set() or clock >= next_waiting:
                    self.runs.agent_available.clear()
                    await self.runs.dispatch_waiting()
                    next_waiting = clock + self.waiting_interval
                    looked = clock
                if clock >= next_liveness:
                    await self.runs.sweep_liveness(self.agent_timeout)
                    next_liveness = clock + self.liveness_interval
                if clock >= next_recover:
                    await self.runs.recover()
                    next_recover = clock + self.recover_interval
                if clock >= next_purge:
                    await self.runs.store.purge_idempotency()
                    next_purge = clock + self.purge_interval
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("scheduler tick failed; continuing")
            gap = looked + self.wake_gap - time.monotonic()
            if gap > 0:
                await asyncio.sleep(gap)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.runs.agent_available.wait(), timeout=self.tick)

    async def _timers(self) -> None:
        while True:
            timers = await self.runs.store.claim_timers(utc_now(), 100, self.lease_seconds)
            if not timers:
                return

            async def handle(timer_key: str, coro: asyncio.Future[None]) -> None:
                try:
                    await coro
                except Exception:
                    log.exception("timer failed; it comes back when its lease ends", extra={"key": timer_key})
                    return
                await self.runs.store.finish_timer(timer_key)

            await asyncio.gather(*(handle(t.key, asyncio.ensure_future(self.runs.on_timer(t))) for t in timers))
            if len(timers) < 100:
                return
