"""SQLite's reader threads: ``close()`` waits for the reads in flight before closing their connections.

Closing a ``sqlite3`` connection under a running query crashed the process (a checkpointer
read during shutdown); the store's reads therefore run in its own pool, which ``close()``
drains first, and a read asked for after that is refused as 503, not run.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path

import pytest

from opscore.errors import Unavailable
from opscore.models import Change, Entity
from opscore.storage.sqlite import SQLiteStore


def test_close_waits_for_a_read_in_flight_then_refuses_reads(tmp_path: Path) -> None:
    async def scenario() -> None:
        store = SQLiteStore(str(tmp_path / "reads.db"))
        await store.open()
        await store.apply(Change("agent", "a", create=Entity("agent", "a", "registered")))
        started, release = threading.Event(), threading.Event()

        def slow(conn: sqlite3.Connection) -> int:
            started.set()
            release.wait(10)
            return int(conn.execute("SELECT count(*) FROM entities").fetchone()[0])

        read = asyncio.ensure_future(store._read(slow))
        await asyncio.to_thread(started.wait, 10)
        closing = asyncio.ensure_future(store.close())
        await asyncio.sleep(0.3)
        assert not closing.done(), "close() returned while a read was still running on its connection"
        release.set()
        assert await read == 1
        await closing
        with pytest.raises(Unavailable, match="closing"):
            await store.list_timers()

    asyncio.run(scenario())
