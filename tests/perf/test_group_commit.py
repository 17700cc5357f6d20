"""Group commit guard rails: a refused change fails alone; kill -9 loses no acknowledged change."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from opscore import audit
from opscore.errors import IdempotencyKeyInUse, RevisionConflict, UnknownAgent
from opscore.models import Change, Committed, Entity, IdempotencyEntry, Timer
from opscore.storage.sqlite import SQLiteStore
from opscore.storage.writer import Mode
from tests.servers import Server


def record(entity_id: str, dest: str, source: str = "registered") -> dict[str, object]:
    return audit.draft(
        entity_type="agent",
        entity_id=entity_id,
        event="ready",
        source=source,
        dest=dest,
        outcome="applied",
        reason=None,
        actor="test",
        request_id=None,
        details={},
        reported_at=None,
    )


@contextlib.asynccontextmanager
async def opened(path: str) -> AsyncIterator[SQLiteStore]:
    """The store on ``path``, open for the block (the file as a restarted server finds it)."""
    store = SQLiteStore(path)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


async def hold_writer(store: SQLiteStore) -> tuple[threading.Event, asyncio.Future[None]]:
    """Park the writer thread in a job until the event is set: what is submitted meanwhile is ONE batch."""
    started, release = threading.Event(), threading.Event()

    def hold(tx: object) -> None:
        started.set()
        release.wait(10)

    held = store._writer.submit(hold, Mode.READ)
    await asyncio.to_thread(started.wait, 10)
    return release, held


async def _one_batch_with_refusals(path: str) -> None:
    async with opened(path) as store:
        for i in range(6):
            await store.apply(Change("agent", f"a{i}", create=Entity("agent", f"a{i}", "registered")))
        await store.apply(Change("agent", "a5", idempotency=IdempotencyEntry("s", "taken", "f", 200, {"x": 1})))
        release, held = await hold_writer(store)  # every change below lands in ONE batch (one transaction)
        batches = store.batches
        changes = [
            Change("agent", "a0", expected_revision=0, state="idle", record=record("a0", "idle")),
            Change("agent", "a1", expected_revision=5, state="idle", record=record("a1", "idle")),  # stale revision
            Change("agent", "a2", expected_revision=0, state="idle", record=record("a2", "idle")),
            Change("agent", "ghost", state="idle", record=record("ghost", "idle")),  # unknown, nothing to create
            Change(  # needs a SAVEPOINT (idempotency) and fails inside it: the key is taken
                "agent",
                "a3",
                expected_revision=0,
                state="idle",
                record=record("a3", "idle"),
                idempotency=IdempotencyEntry("s", "taken", "f", 200, {"auditId": None}),
            ),
            Change(  # needs a SAVEPOINT (timers) and succeeds
                "agent",
                "a4",
                expected_revision=0,
                state="idle",
                record=record("a4", "idle"),
                timers=(Timer("t:a4", "2030-01-01T00:00:00+00:00", "deadline", "agent", "a4"),),
            ),
            Change("agent", "a0", expected_revision=1, state="active", record=record("a0", "active", "idle")),
        ]
        pending = asyncio.gather(*(store.apply(c) for c in changes), return_exceptions=True)
        await asyncio.sleep(0.05)
        release.set()
        await held
        results = await pending
        assert store.batches == batches + 2  # the held job, then all seven changes together
        assert [type(r) for r in results] == [
            Committed,
            RevisionConflict,
            Committed,
            UnknownAgent,
            IdempotencyKeyInUse,
            Committed,
            Committed,
        ]

    async with opened(path) as reopened:
        states = {f"a{i}": (await reopened.get("agent", f"a{i}")) for i in range(5)}
        assert {k: (e.state, e.revision) for k, e in states.items() if e is not None} == {
            "a0": ("active", 2),
            "a1": ("registered", 0),
            "a2": ("idle", 1),
            "a3": ("registered", 0),
            "a4": ("idle", 1),
        }
        assert await reopened.get("agent", "ghost") is None
        assert [t.key for t in await reopened.list_timers()] == ["t:a4"]
        verification = await reopened.verify()
        assert verification.ok and verification.records == 4


def test_a_refused_change_fails_alone_in_its_group_commit(tmp_path: Path) -> None:
    asyncio.run(_one_batch_with_refusals(str(tmp_path / "g.db")))


async def _one_statement_batch_with_a_poisoned_row(path: str) -> None:
    async with opened(path) as store:
        for i in range(8):
            await store.apply(Change("agent", f"p{i}", create=Entity("agent", f"p{i}", "registered")))
        release, held = await hold_writer(store)
        batches = store.batches
        changes = [
            Change(
                "agent",
                f"p{i}",
                expected_revision=0,
                state="idle",
                record=record(f"p{i}", "idle"),
                # decided in Python, refused only when SQLite is handed the row: a lone surrogate
                data={"poison": "\udfff"} if i == 5 else None,
            )
            for i in range(8)
        ]
        traced: list[str] = []
        assert store._wconn is not None
        store._wconn.set_trace_callback(traced.append)
        pending = asyncio.gather(*(store.apply(c) for c in changes), return_exceptions=True)
        await asyncio.sleep(0.05)
        release.set()
        await held
        results = await pending
        assert traced and all(t.startswith("INSERT INTO batch_rows") for t in traced)  # no BEGIN, no COMMIT
        # the held job; the shared statement failed and was undone whole; then each change alone
        assert store.batches == batches + 1 + 7
        assert [type(r).__name__ for r in results] == ["Committed"] * 5 + ["StorageError"] + ["Committed"] * 2

    async with opened(path) as reopened:
        states = [(await reopened.get("agent", f"p{i}")) for i in range(8)]
        assert [(e.state, e.revision) for e in states if e is not None] == [("idle", 1)] * 5 + [("registered", 0)] + [
            ("idle", 1)
        ] * 2
        verification = await reopened.verify()
        assert verification.ok and verification.records == 7


def test_a_row_sqlite_refuses_in_a_one_statement_batch_fails_alone(tmp_path: Path) -> None:
    """A small batch commits as ONE statement: a row that fails it undoes it whole, then the rest commit alone."""
    asyncio.run(_one_statement_batch_with_a_poisoned_row(str(tmp_path / "one.db")))


@pytest.mark.slow
def test_kill_9_under_load_loses_no_acknowledged_transition(sqlite_url: str, tmp_path: Path) -> None:
    server = Server(database_url=sqlite_url, log_path=tmp_path / "server.log").start()
    acknowledged: dict[str, int] = {}  # agent -> highest acknowledged revision
    audit_ids: set[int] = set()
    stop = threading.Event()

    async def agent_loop(client: httpx.AsyncClient, agent: str) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            state = "idle" if n % 2 else "active"
            body = {
                "agentId": agent,
                "timestamp": f"2026-01-01T00:00:{n // 1_000_000:02d}.{n % 1_000_000:06d}+00:00",
                "state": state,
            }
            try:
                answer = await client.post(f"/v1/opscore/agent/{agent}/state", json=body)
            except httpx.HTTPError:
                return  # the server is gone: this one was never acknowledged
            assert answer.status_code == 200, answer.text
            data = answer.json()
            acknowledged[agent] = data["revision"]
            audit_ids.add(data["auditId"])

    async def load() -> None:
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=server.url, headers=server.headers, timeout=30, limits=limits) as client:
            await asyncio.gather(*(agent_loop(client, f"k{i}") for i in range(48)))

    loader = threading.Thread(target=asyncio.run, args=(load(),))
    loader.start()
    deadline = time.monotonic() + 60
    while len(audit_ids) < 1500 and time.monotonic() < deadline and loader.is_alive():
        time.sleep(0.05)
    server.kill()  # kill -9 while requests are in flight and a group commit may be open
    stop.set()
    loader.join(30)
    assert len(audit_ids) >= 1500

    restarted = Server(database_url=sqlite_url, log_path=tmp_path / "server2.log").start()
    try:
        with restarted.client() as client:
            for agent, revision in acknowledged.items():
                stored = client.get(f"/v1/opscore/agent/{agent}").json()
                assert stored["revision"] >= revision, (agent, stored, revision)
            seen: set[int] = set()
            cursor = None
            while True:
                params = {"limit": 1000, **({"cursor": cursor} if cursor else {})}
                page = client.get("/v1/opscore/audit", params=params).json()
                seen.update(r["id"] for r in page["items"])
                cursor = page["nextCursor"]
                if cursor is None:
                    break
            assert audit_ids <= seen
            assert client.get("/v1/opscore/audit/verify").json()["ok"] is True
    finally:
        restarted.stop()
