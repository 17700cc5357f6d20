"""Group commit: one writer thread runs every queued job of a store, many per transaction.

Callers on the event loop submit a job and await its future; the writer takes everything
queued (up to ``max_batch``) and runs it in ONE transaction, so one fsync serves the whole
batch. A future is resolved only after that transaction committed, so an acknowledged write
is durable. The writer knows nothing of entities or SQL: the store gives it a factory of
:class:`Transaction` objects (begin, savepoints, commit, abort) and jobs that take one.

The thread is woken once per pass of the event loop, not once per job: a job is queued at
once, and the first of a pass schedules (``call_soon``) one wake-up, run after the callbacks
that were ready with it. Woken by the first job, the thread used to wake while the loop still
held the GIL for the rest of its pass, wait for it, and wake again: a context switch and a
futex round trip more per batch, about a tenth of a state report's CPU (docs/performance.md).

How a job is isolated from the others in its batch is its :class:`Mode`. What fails the
transaction as a whole (the COMMIT itself, a row refused when written at the end) names no
culprit, so the batch is rolled back and each job runs again in a transaction of its own:
a job that cannot be stored fails alone and every other caller's job still commits.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from opscore.errors import StorageError
from opscore.queues import drain

log = logging.getLogger("opscore.storage")


class Mode(enum.Enum):
    """How a job is isolated from the other jobs of its transaction."""

    READ = "read"
    """Writes nothing: needs no transaction of its own (a batch of reads opens none)."""
    PLAIN = "plain"
    """Writes, but raises before changing anything or succeeds: no SAVEPOINT needed.

    Its writes are rows handed to the transaction for its commit, never SQL run on the spot:
    the SQLite store opens no transaction for plain jobs before the commit.
    """
    SAVEPOINT = "savepoint"
    """Writes as it goes: a SAVEPOINT undoes its writes alone when it raises."""


class Transaction(Protocol):
    """The store's side of one transaction of the writer, in the order the writer calls it.

    ``begin`` and ``commit`` run for every batch; a batch in which every job is
    :attr:`Mode.READ` is opened with ``writes=False`` and its ``begin``/``commit`` need not
    touch the database (``commit`` still publishes what the jobs read, if the store caches).
    """

    def begin(self) -> None: ...

    def savepoint(self) -> None: ...

    def rollback_savepoint(self) -> None: ...

    def release_savepoint(self) -> None: ...

    def commit(self) -> None: ...

    def abort(self, exc: BaseException) -> Exception:
        """Roll back after ``exc``; the exception every job of the failed transaction is answered with."""
        ...


TxT = TypeVar("TxT", bound=Transaction)
R = TypeVar("R")
I = TypeVar("I")  # noqa: E741 - an item of a Many


@dataclass(slots=True)
class Job(Generic[TxT]):
    """What the writer runs: ``run(tx)``, isolated from the other jobs of its transaction as ``mode`` says.

    What ``run`` returns or raises is its caller's answer.
    """

    run: Callable[[TxT], object]
    mode: Mode


@dataclass(slots=True)
class Many(Generic[TxT, I, R]):
    """``run(tx, item)`` for each plain item, answered together: each item's result or the exception that refused it.

    The ``run`` of a :attr:`Mode.PLAIN` job. Each item raises before changing anything or
    succeeds, so a refused one is answered in its place and the others go on, with no
    SAVEPOINT and one future; if the transaction fails as a whole, each item is retried alone.
    """

    run: Callable[[TxT, I], R]
    items: Sequence[I]

    def __call__(self, tx: TxT, /) -> list[R | Exception]:
        out: list[R | Exception] = []
        run = self.run
        for item in self.items:
            try:
                out.append(run(tx, item))
            except Exception as exc:  # noqa: BLE001 - this item's answer
                out.append(exc)
        return out


@dataclass(slots=True)
class _Item(Generic[TxT, I, R]):
    """One item of a :class:`Many`, run in a transaction of its own after its batch failed."""

    run: Callable[[TxT, I], R]
    item: I

    def __call__(self, tx: TxT, /) -> R:
        return self.run(tx, self.item)


_Queued = tuple[Job[TxT], "asyncio.Future[Any]"]
"""A job and the future its caller awaits (a plain tuple: one per job, on the hot path)."""
_Outcome = tuple[object, BaseException | None]
"""What a job returned, or what it raised."""


class GroupCommitWriter(Generic[TxT]):
    """The thread that runs a store's jobs, ``max_batch`` at most per transaction.

    ``transaction(writes)`` makes the :class:`Transaction` of one batch; it is also what
    every job of that batch is handed.
    """

    def __init__(self, transaction: Callable[[bool], TxT], *, max_batch: int, name: str) -> None:
        self._transaction_of = transaction
        self.max_batch = max_batch
        self.name = name
        self._jobs: queue.SimpleQueue[_Queued[TxT] | None] = queue.SimpleQueue()
        self._wakes: queue.SimpleQueue[bool] = queue.SimpleQueue()
        """One token per wake-up: the thread blocks here, never on ``_jobs``."""
        self._wake_due = False
        """A wake-up is scheduled on the loop and has not run yet (touched on the loop only)."""
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.batches = 0
        """Transactions committed (a count for benchmarks and tests)."""
        self.batched = 0
        """Jobs (or Manys) answered by those transactions."""
        self.commits = 0
        """Of those transactions, the ones that wrote (``/metrics``: ``opscore_store_batches_total{kind="commit"}``)."""
        self.committed = 0
        """The writes they carried: a job each, a Many's items each (read jobs not counted)."""

    # -- life cycle -----------------------------------------------------------------------

    def start(self) -> None:
        """Start the thread; the caller's running event loop is where futures are answered."""
        self._loop = asyncio.get_running_loop()
        self._wake_due = False  # a wake-up left scheduled on a loop that is gone will never run
        self._thread = threading.Thread(target=self._main, name=f"opscore-{self.name.lower()}-writer", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Run what is queued, then end the thread (blocking: call it from a worker thread)."""
        if self._thread is not None:
            self._jobs.put(None)
            self._wakes.put(True)
            self._thread.join()
            self._thread = None

    # -- submitting -----------------------------------------------------------------------

    def submit(self, run: Callable[[TxT], R], mode: Mode) -> asyncio.Future[R]:
        """Queue ``run``; the future resolves after the transaction that ran it committed."""
        loop = self._loop
        if self._thread is None or loop is None:
            raise StorageError(f"the {self.name} store is not open for writing")
        future: asyncio.Future[R] = loop.create_future()
        self._jobs.put((Job(run, mode), future))
        if not self._wake_due:
            self._wake_due = True
            loop.call_soon(self._wake)
        return future

    def _wake(self) -> None:
        """On the loop, after the callbacks that were ready with the pass's first job: wake the thread once for all."""
        self._wake_due = False
        self._wakes.put(True)

    def submit_many(self, run: Callable[[TxT, I], R], items: Sequence[I]) -> asyncio.Future[list[R | Exception]]:
        """Queue the plain ``items`` as one job (:class:`Many`): one future, one answer per item."""
        return self.submit(Many(run, items), Mode.PLAIN)

    # -- the thread -----------------------------------------------------------------------

    def _main(self) -> None:
        wakes, jobs = self._wakes, self._jobs
        while True:
            wakes.get()
            for _ in range(wakes.qsize()):  # their jobs were queued before them: the drains below take them
                wakes.get_nowait()
            while True:
                batch, stop = drain(jobs, self.max_batch)
                if batch:
                    self._run_batch(batch)
                if stop:
                    return
                if len(batch) < self.max_batch:
                    break

    def _run_batch(self, batch: list[_Queued[TxT]]) -> None:
        """The batch in one transaction; if that fails as a whole, each job in a transaction of its own."""
        assert self._loop is not None
        outcomes = self._transaction([job for job, _ in batch])
        if isinstance(outcomes, Exception):
            failure = outcomes
            outcomes = []
            for job, _ in batch:
                if isinstance(job.run, Many) and len(job.run.items) > 1:
                    outcomes.append((self._isolated_items(job.run, failure), None))
                else:
                    alone = self._transaction([job])
                    outcomes.append((None, alone) if isinstance(alone, Exception) else alone[0])
        answers = [(future, *outcome) for (_, future), outcome in zip(batch, outcomes, strict=True)]
        self._loop.call_soon_threadsafe(_deliver, answers)

    def _isolated_items(self, many: Many[TxT, Any, Any], failure: Exception) -> list[Any]:
        """The items of a Many, each committed (or refused) in a transaction of its own."""
        answers: list[Any] = []
        for item in many.items:
            alone = self._transaction([Job(_Item(many.run, item), Mode.PLAIN)])
            if isinstance(alone, Exception):
                answers.append(alone)
                continue
            result, error = alone[0]
            answers.append(result if error is None else error if isinstance(error, Exception) else failure)
        return answers

    def _transaction(self, jobs: Sequence[Job[TxT]]) -> list[_Outcome] | Exception:
        """Every job in ONE transaction: each job's outcome, or the failure if it did not commit."""
        writes = any(job.mode is not Mode.READ for job in jobs)
        tx = self._transaction_of(writes)
        outcomes: list[_Outcome] = []
        try:
            tx.begin()
            for job in jobs:
                isolated = job.mode is Mode.SAVEPOINT
                if isolated:
                    tx.savepoint()
                try:
                    result = job.run(tx)
                except BaseException as exc:  # noqa: BLE001 - handed to the job's caller
                    if isolated:
                        tx.rollback_savepoint()
                    outcomes.append((None, exc))
                else:
                    if isolated:
                        tx.release_savepoint()
                    outcomes.append((result, None))
            tx.commit()
        except BaseException as exc:  # noqa: BLE001 - nothing of this transaction is acknowledged
            failure = tx.abort(exc)
            log.error(f"{self.name} transaction failed", extra={"jobs": len(jobs), "error": repr(exc)})
            return failure
        self.batches += 1
        self.batched += len(jobs)
        if writes:
            self.commits += 1
            self.committed += sum(
                len(job.run.items) if isinstance(job.run, Many) else 1 for job in jobs if job.mode is not Mode.READ
            )
        return outcomes


def _deliver(answers: list[tuple[asyncio.Future[Any], object, BaseException | None]]) -> None:
    """On the event loop: resolve each future (a caller that gave up has cancelled its own)."""
    for future, result, exc in answers:
        if future.done():
            continue
        if exc is not None:
            future.set_exception(exc if isinstance(exc, Exception) else StorageError(str(exc)))
        else:
            future.set_result(result)
