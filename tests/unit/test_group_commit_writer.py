"""The group-commit writer on its own, with a transaction that records what it was asked to do.

The SQLite store's behaviour under group commit is tested through the store
(tests/perf/test_group_commit.py, tests/storage); these tests pin the writer's part of it:
which jobs share a transaction, where savepoints go, and how a transaction that fails as a
whole is retried job by job (and a Many item by item) so that only the culprit fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator
from typing import Any

import pytest

from opscore.errors import StorageError
from opscore.storage.writer import GroupCommitWriter, Mode


class Refused(Exception):
    pass


class FakeTx:
    """A transaction that logs its calls; its COMMIT fails when a job marked it poisoned."""

    def __init__(self, log: list[Any], writes: bool) -> None:
        self.log = log
        self.writes = writes
        self.poisoned = False

    def begin(self) -> None:
        self.log.append(("begin", self.writes))

    def savepoint(self) -> None:
        self.log.append("savepoint")

    def rollback_savepoint(self) -> None:
        self.log.append("rollback_savepoint")

    def release_savepoint(self) -> None:
        self.log.append("release_savepoint")

    def commit(self) -> None:
        if self.poisoned:
            raise Refused("the database refused a row at COMMIT")
        self.log.append("commit")

    def abort(self, exc: BaseException) -> Exception:
        self.log.append("abort")
        return StorageError(f"the commit failed: {exc}")


def job(name: str, log: list[Any]) -> Any:
    def run(tx: FakeTx) -> str:
        log.append(name)
        if name.startswith("poison"):
            tx.poisoned = True
        if name.startswith("refuse"):
            raise Refused(name)
        return name

    return run


async def held_batch(writer: GroupCommitWriter[FakeTx], submit: Any) -> list[Any]:
    """Hold the writer with one job, queue what ``submit`` queues, release: they form ONE batch."""
    started, release = threading.Event(), threading.Event()

    def hold(tx: FakeTx) -> None:
        started.set()
        release.wait(10)

    held = writer.submit(hold, Mode.READ)
    await asyncio.to_thread(started.wait, 10)
    futures = submit()
    release.set()
    await held
    return list(await asyncio.gather(*futures, return_exceptions=True))


def stop_within(writer: GroupCommitWriter[FakeTx], seconds: float = 10) -> None:
    """Stop the writer from another thread, failing (not hanging) if its thread does not end."""
    stopping = threading.Thread(target=writer.stop, daemon=True)
    stopping.start()
    stopping.join(seconds)
    assert not stopping.is_alive(), "the writer thread did not stop"


async def stopped(writer: GroupCommitWriter[FakeTx]) -> None:
    """:func:`stop_within` off the loop's thread, so the loop keeps running meanwhile."""
    await asyncio.to_thread(stop_within, writer)


def writer_of(log: list[Any], max_batch: int = 100) -> GroupCommitWriter[FakeTx]:
    """A writer whose transactions record their calls in ``log``."""
    return GroupCommitWriter(lambda writes: FakeTx(log, writes), max_batch=max_batch, name="Test")


@contextlib.asynccontextmanager
async def running(writer: GroupCommitWriter[FakeTx]) -> AsyncIterator[GroupCommitWriter[FakeTx]]:
    """``writer`` started on the running loop, and :func:`stopped` when the block ends."""
    writer.start()
    try:
        yield writer
    finally:
        await stopped(writer)


def test_jobs_share_one_transaction_and_only_writers_of_their_own_get_a_savepoint() -> None:
    log: list[Any] = []

    async def scenario() -> list[Any]:
        async with running(writer_of(log)) as writer:
            return await held_batch(
                writer,
                lambda: [
                    writer.submit(job("plain", log), Mode.PLAIN),
                    writer.submit(job("saved", log), Mode.SAVEPOINT),
                    writer.submit(job("refused-saved", log), Mode.SAVEPOINT),
                    writer.submit(job("read", log), Mode.READ),
                    writer.submit_many(job_of_item(log), ["m1", "refuse-m2", "m3"]),
                ],
            )

    results = asyncio.run(scenario())
    assert results[:2] == ["plain", "saved"]
    assert isinstance(results[2], Refused)
    assert results[3] == "read"
    assert results[4][0] == "m1" and isinstance(results[4][1], Refused) and results[4][2] == "m3"
    # the hold ran alone, reading: its transaction never opened for writing
    assert log[:2] == [("begin", False), "commit"]
    assert log[2:] == [
        ("begin", True),
        "plain",
        "savepoint",
        "saved",
        "release_savepoint",
        "savepoint",
        "refused-saved",
        "rollback_savepoint",
        "read",
        "m1",
        "refuse-m2",
        "m3",
        "commit",
    ]


def job_of_item(log: list[Any]) -> Any:
    def run(tx: FakeTx, item: str) -> str:
        return str(job(item, log)(tx))

    return run


def test_a_transaction_that_fails_as_a_whole_is_retried_job_by_job_and_item_by_item() -> None:
    log: list[Any] = []

    async def scenario() -> tuple[list[Any], int]:
        async with running(writer_of(log)) as writer:
            results = await held_batch(
                writer,
                lambda: [
                    writer.submit(job("a", log), Mode.PLAIN),
                    writer.submit(job("poison-b", log), Mode.SAVEPOINT),
                    writer.submit_many(job_of_item(log), ["c1", "poison-c2", "c3"]),
                ],
            )
            return results, writer.batches

    results, batches = asyncio.run(scenario())
    assert results[0] == "a"
    assert isinstance(results[1], StorageError) and "refused a row" in str(results[1])
    many = results[2]
    assert many[0] == "c1" and many[2] == "c3"
    assert isinstance(many[1], StorageError)
    # the hold, then a alone, then c1 and c3 alone committed; the batch and both culprits did not
    assert batches == 4
    assert log.count("abort") == 3
    tail = log[log.index("abort") + 1 :]
    assert tail[:3] == [("begin", True), "a", "commit"]


def test_submitting_before_start_is_refused() -> None:
    async def scenario() -> None:
        writer = writer_of([], max_batch=1)
        with pytest.raises(StorageError, match="not open for writing"):
            writer.submit(job("x", []), Mode.PLAIN)

    asyncio.run(scenario())


def test_the_thread_is_woken_once_the_loop_has_run_what_was_ready_not_by_each_job() -> None:
    """A job waits for the end of the loop's pass: the loop busy (GIL released) does not let it run."""
    ran = threading.Event()

    async def scenario() -> tuple[bool, str, int]:
        async with running(writer_of([])) as writer:

            def run(tx: FakeTx) -> str:
                ran.set()
                return "ran"

            future = writer.submit(run, Mode.PLAIN)
            others = [writer.submit(job(f"j{n}", []), Mode.PLAIN) for n in range(4)]
            early = ran.wait(0.2)  # blocks the loop's thread, GIL released: the writer could run now
            result = await asyncio.wait_for(future, 10)
            await asyncio.gather(*others)
            return early, result, writer.batches

    early, result, batches = asyncio.run(scenario())
    assert not early
    assert result == "ran"
    assert batches == 1  # the pass's five jobs, one wake-up, one transaction


def test_a_full_batch_is_followed_by_the_rest_without_another_wake_up() -> None:
    log: list[Any] = []

    async def scenario() -> tuple[list[Any], int]:
        async with running(writer_of(log, max_batch=2)) as writer:
            futures = [writer.submit(job(f"j{n}", log), Mode.PLAIN) for n in range(5)]
            return list(await asyncio.wait_for(asyncio.gather(*futures), 10)), writer.batches

    results, batches = asyncio.run(scenario())
    assert results == [f"j{n}" for n in range(5)]
    assert batches == 3
    assert log.count("commit") == 3


def test_stop_runs_the_jobs_queued_before_it_even_if_their_wake_up_has_not_run() -> None:
    async def scenario() -> str:
        writer = writer_of([])
        writer.start()
        future = writer.submit(job("last", []), Mode.PLAIN)
        stop_within(writer)  # on the loop's thread, blocked: the scheduled wake-up cannot run
        return await asyncio.wait_for(future, 10)

    assert asyncio.run(scenario()) == "last"


def test_a_writer_started_again_on_another_loop_is_woken_there() -> None:
    """A wake-up left scheduled on a loop that closed before running it does not silence the next loop."""
    writer = writer_of([])
    first = asyncio.new_event_loop()

    async def start_and_leave() -> None:
        writer.start()
        writer.submit(job("left", []), Mode.PLAIN)  # its wake-up is scheduled, and never runs
        first.stop()  # the loop ends this pass, before the callbacks scheduled in it
        await asyncio.sleep(10)

    with pytest.raises(RuntimeError, match="stopped before Future completed"):
        first.run_until_complete(start_and_leave())
    stop_within(writer)  # runs "left" through stop()'s own wake-up
    first.close()

    async def again() -> str:
        async with running(writer):
            return await asyncio.wait_for(writer.submit(job("again", []), Mode.PLAIN), 5)

    assert asyncio.run(again()) == "again"
