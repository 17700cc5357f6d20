"""Group commit for the PostgreSQL store: many replicas' worth of changes, one transaction per batch.

One transaction per change made PostgreSQL the slow backend: each change paid BEGIN, a locked
read, a write and COMMIT, four round trips and about as much Python in psycopg and the pool as
the whole decision. :class:`GroupWriter` does for PostgreSQL what the SQLite writer thread does
for SQLite: changes go into an :class:`asyncio.Queue`, a writer task takes everything that
arrived while its previous COMMIT was in flight (at most ``max_batch``), and the store commits
them in ONE transaction of a handful of set-based statements
(:meth:`~opscore.storage.postgres.PostgresStore._apply_set`). The batching lives here; the SQL
stays in the store.

One batch is in flight at a time, except under a backlog: when a batch is *full* (``max_batch``
changes were waiting), it goes out beside the one in flight, up to ``in_flight`` batches at once,
so the database works on one batch while the writer decides and builds the next. Under state
reports, batches are far from full and one writer it stays: a second writer on every batch
mostly halved the batches and cost more than it overlapped (``docs/performance.md``, "One
writer again"). Under the batch endpoint's hundreds of changes a request, the queue outruns one
batch at a time, and the overlap is what pays ("Full batches side by side"). Batches in flight
together never hold the same entity: a change to an entity in a batch still in flight waits
for the next batch after it, as a second change in one batch does.

The promises, each kept per change:

- **Answered after COMMIT.** A caller's future resolves only once the batch's COMMIT returned
  (or, when the connection broke while COMMIT was in flight, once
  :meth:`~opscore.storage.postgres.PostgresStore.settle` has found out whether it committed:
  committed → every change's normal answer; not → 503 for every change; unknown → 503
  ``commit_outcome_unknown``).
- **Refused alone.** A change whose compare-and-set fails under the row lock (another replica
  moved the entity since the engine read it) is answered ``RevisionConflict`` alone, as the
  one-transaction path answers it, and the engine decides it again from a fresh read; the
  rest of the batch commits.
- **Isolated when the batch fails.** When the batch's transaction fails as a whole (a value
  PostgreSQL refuses, a deadlock between creates), nothing of it committed, and each of its
  changes is applied again in a transaction of its own, so one bad change fails alone (the
  SQLite writer's ``_run_batch`` does the same). A broken connection fails the batch with 503
  without retrying: nothing committed, and the database is not there to retry on.
- **One change per entity per batch.** A second change to an entity already in the batch waits
  for the next one (the engine's per-entity lock makes that rare), so each change is applied
  to the row as the previous one left it.

Only *plain* changes come here (no ``Idempotency-Key`` answer, no timers): the hot path of
state reports and triggers. The others keep the one-transaction path, whose statements they
need anyway.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from opscore.errors import Invalid, OpsCoreError, StorageError, Unavailable
from opscore.models import Change, Committed

log = logging.getLogger("opscore.storage")

Outcome = Committed | Exception

_Job = tuple[Change, "asyncio.Future[Committed]"]
Key = tuple[str, str]

BatchCommit = Callable[[list[Change]], Awaitable[list[Outcome] | None]]
"""Commits changes in one transaction: each change's outcome, or ``None`` when the batch did not commit
(and may be retried change by change); raises ``Unavailable``/``CommitOutcomeUnknown`` for all of them."""
SoloCommit = Callable[[Change], Awaitable[Committed]]
"""Commits one change in a transaction of its own (the isolation path)."""


async def answer_of(answer: Awaitable[Committed]) -> Outcome:
    """The committed change, or the exception that is this change's answer (never raised here)."""
    try:
        return await answer
    except Exception as exc:  # noqa: BLE001 - handed back to the caller of this change
        return exc


def plain(change: Change) -> bool:
    """Whether ``change`` can go in a group commit: nothing but an entity row, a record and labels."""
    return change.idempotency is None and not change.timers and not change.cancel_timers


class GroupWriter:
    """One task draining the queue into batches; a full batch may go out beside the one in flight."""

    def __init__(self, commit: BatchCommit, solo: SoloCommit, *, max_batch: int = 256, in_flight: int = 2) -> None:
        self._commit = commit
        self._solo = solo
        self.max_batch = max_batch
        self.in_flight = max(1, in_flight)
        self._queue: asyncio.Queue[_Job | None] = asyncio.Queue()
        self._held: deque[_Job] = deque()
        """Jobs whose entity was in the batch being gathered or in one in flight: first in a later batch."""
        self._busy: set[Key] = set()
        """The entities of the batches sent out beside the writer's own (each is held until they commit)."""
        self._task: asyncio.Task[None] | None = None
        self.batches = 0
        self.batched = 0

    def start(self) -> None:
        """Start the writer task on the running loop (a store may be opened again in another loop)."""
        if self._task is None:
            self._queue = asyncio.Queue()
            self._held = deque()
            self._busy = set()
            self._task = asyncio.create_task(self._run(), name="opscore-pg-writer")

    async def stop(self) -> None:
        """Let queued changes commit, then end the writer task."""
        task, self._task = self._task, None
        if task is not None:
            self._queue.put_nowait(None)
            await asyncio.gather(task, return_exceptions=True)

    @property
    def running(self) -> bool:
        return self._task is not None

    async def submit(self, change: Change) -> Committed:
        if self._task is None:
            raise StorageError("the PostgreSQL store is not open for writing")
        future: asyncio.Future[Committed] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((change, future))
        return await future

    async def submit_many(self, changes: list[Change]) -> list[Outcome]:
        """All of them queued at once, so they share batches; each answered in its place."""
        if self._task is None:
            raise StorageError("the PostgreSQL store is not open for writing")
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[Committed]] = []
        for change in changes:
            future: asyncio.Future[Committed] = loop.create_future()
            futures.append(future)
            self._queue.put_nowait((change, future))
        return [await answer_of(future) for future in futures]

    # -- the writer task ----------------------------------------------------------------------

    def _gather(self, first: _Job | None) -> tuple[list[_Job], bool]:
        """The next batch: held jobs first, then what is queued; ``True`` when told to stop."""
        batch: list[_Job] = []
        keys: set[Key] = set()
        busy = self._busy
        stop = False
        held, self._held = self._held, deque()
        pending: list[_Job] = list(held)
        if first is not None:
            pending.append(first)
        queue = self._queue
        while True:
            while pending and len(batch) < self.max_batch:
                job = pending.pop(0)
                key = (job[0].entity_type, job[0].entity_id)
                if key in keys or key in busy:
                    self._held.append(job)
                else:
                    keys.add(key)
                    batch.append(job)
            if len(batch) >= self.max_batch or stop:
                break
            try:
                nxt = queue.get_nowait()
            except asyncio.QueueEmpty:
                break
            if nxt is None:
                stop = True
                continue
            pending.append(nxt)
        self._held.extend(pending)
        return batch, stop

    async def _run(self) -> None:
        queue = self._queue
        beside: set[asyncio.Task[None]] = set()
        stop = False
        while not stop:
            first = None
            if not self._held:
                first = await queue.get()
                if first is None:
                    break
            batch, stop = self._gather(first)
            if not batch:  # all of it waits for entities in a batch in flight beside
                if beside:
                    await asyncio.wait(beside, return_when=asyncio.FIRST_COMPLETED)
            elif len(batch) >= self.max_batch and len(beside) + 1 < self.in_flight:
                beside.add(self._send_beside(batch, beside))
            else:
                await self._guarded(batch)
        if beside:
            await asyncio.wait(beside)
        while self._held:  # stopping: what is still held goes out too
            rest, _ = self._gather(None)
            await self._guarded(rest)

    def _send_beside(self, batch: list[_Job], beside: set[asyncio.Task[None]]) -> asyncio.Task[None]:
        """Commit a full batch in a task of its own, its entities busy until it is answered."""
        keys = {(job[0].entity_type, job[0].entity_id) for job in batch}
        self._busy |= keys

        def done(task: asyncio.Task[None]) -> None:
            beside.discard(task)
            self._busy -= keys

        task = asyncio.create_task(self._guarded(batch))
        task.add_done_callback(done)
        return task

    async def _guarded(self, batch: list[_Job]) -> None:
        try:
            await self._run_batch(batch)
        except BaseException as exc:  # a bug here must not leave callers waiting forever
            _answer_all(batch, StorageError(f"the PostgreSQL writer failed: {exc!r}"))
            if not isinstance(exc, Exception):
                raise

    async def _run_batch(self, batch: list[_Job]) -> None:
        changes = [job[0] for job in batch]
        try:
            outcomes = await self._commit(changes)
        except (Unavailable, StorageError) as exc:  # broke (COMMIT's fate settled by the store): all alike
            _answer_all(batch, exc)
            return
        self.batches += 1
        self.batched += len(batch)
        if outcomes is None:  # the batch failed as a whole: each change in a transaction of its own
            log.warning("a PostgreSQL batch failed; retrying its changes one by one", extra={"changes": len(batch)})
            outcomes = list(await asyncio.gather(*(answer_of(self._solo(c)) for c in changes)))
        for (_, future), outcome in zip(batch, outcomes, strict=True):
            if future.done():
                continue
            if isinstance(outcome, Exception):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)


def _answer_all(batch: list[_Job], exc: Exception) -> None:
    for _, future in batch:
        if not future.done():
            future.set_exception(exc if isinstance(exc, OpsCoreError) else StorageError(str(exc)))


class ReadCoalescer:
    """Point reads that arrive together answered by ONE query (the engine reads before each decision).

    Under load, hundreds of ``get`` calls are waiting at once, each paying a pool checkout and a
    statement in psycopg, which cost more Python than the rest of a transition. A read joins
    the next query only if it has not been sent yet, so a read started after a commit was
    answered still sees that commit. When the query is refused for a value (``Invalid``: a key
    PostgreSQL cannot hold), each key is read alone, so one caller's key fails its own readers
    and no one else's; a broken connection fails the whole batch, as it would each read.
    """

    def __init__(self, fetch: Callable[[list[Key]], Awaitable[dict[Key, Any]]], *, max_batch: int = 512) -> None:
        self._fetch = fetch
        self.max_batch = max_batch
        self._waiting: list[tuple[Key, asyncio.Future[Any]]] = []
        self._task: asyncio.Task[None] | None = None
        self.batches = 0
        """Queries sent (``batched / batches`` is the mean read batch)."""
        self.batched = 0

    async def get(self, key: Key) -> Any:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting.append((key, future))
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        while self._waiting:
            batch, self._waiting = self._waiting[: self.max_batch], self._waiting[self.max_batch :]
            keys = list(dict.fromkeys(key for key, _ in batch))
            self.batches += 1
            self.batched += len(keys)
            failed: dict[Key, Exception] = {}
            try:
                found = await self._fetch(keys)
            except Invalid as exc:  # a key PostgreSQL refuses (NUL, a lone surrogate): it alone fails
                found, failed = ({}, {keys[0]: exc}) if len(keys) == 1 else await self._each_alone(keys)
            except BaseException as exc:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc if isinstance(exc, Exception) else StorageError(repr(exc)))
                if not isinstance(exc, Exception):
                    raise
                continue
            for key, future in batch:
                if not future.done():
                    error = failed.get(key)
                    if error is None:
                        future.set_result(found.get(key))
                    else:
                        future.set_exception(error)

    async def _each_alone(self, keys: list[Key]) -> tuple[dict[Key, Any], dict[Key, Exception]]:
        """A batch one of whose keys PostgreSQL refused: each key read alone, so only that key's readers fail."""
        found: dict[Key, Any] = {}
        failed: dict[Key, Exception] = {}
        for key in keys:
            try:
                found.update(await self._fetch([key]))
            except Exception as exc:  # noqa: BLE001 - this key's readers get it
                failed[key] = exc
        return found, failed
