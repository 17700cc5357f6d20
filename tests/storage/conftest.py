"""The ``backend`` fixture: every storage test runs on memory, SQLite and PostgreSQL.

Tests are plain functions that call :meth:`Backend.run` with a coroutine; it opens a fresh
store in its own event loop (``asyncio.run``, no pytest-asyncio) and closes it afterwards.
``tamper_body``/``delete_record`` reach past the store into its data (raw SQL for SQLite and
PostgreSQL, the lists themselves for memory), as someone editing the database would.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import pytest

from opscore.storage import Store, open_store
from opscore.storage.memory import MemoryStore
from opscore.storage.sqlite import path_from_url
from tests.conftest import PG_URL

T = TypeVar("T")


@dataclass
class Backend:
    name: str
    url: str

    def store(self) -> Store:
        return open_store(self.url)

    def run(self, scenario: Callable[[Store], Awaitable[T]]) -> T:
        async def main() -> T:
            store = self.store()
            await store.open()
            try:
                return await scenario(store)
            finally:
                await store.close()

        return asyncio.run(main())

    async def execute(self, sql: str, params: tuple[Any, ...] = ()) -> int:
        """Raw SQL (``%s`` placeholders) on the database, beside the store; the row count."""
        if self.name == "sqlite":

            def run() -> int:
                conn = sqlite3.connect(path_from_url(self.url), isolation_level=None)
                try:
                    return conn.execute(sql.replace("%s", "?"), params).rowcount
                finally:
                    conn.close()

            return await asyncio.to_thread(run)
        async with await psycopg.AsyncConnection.connect(self.url, autocommit=True) as conn:
            return (await conn.execute(sql, params)).rowcount  # type: ignore[arg-type]

    async def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Raw SQL (``%s`` placeholders) on the database, beside the store; the rows."""
        if self.name == "sqlite":

            def run() -> list[tuple[Any, ...]]:
                conn = sqlite3.connect(path_from_url(self.url), isolation_level=None)
                try:
                    return conn.execute(sql.replace("%s", "?"), params).fetchall()
                finally:
                    conn.close()

            return await asyncio.to_thread(run)
        async with await psycopg.AsyncConnection.connect(self.url, autocommit=True) as conn:
            return await (await conn.execute(sql, params)).fetchall()  # type: ignore[arg-type]

    async def tamper_body(self, store: Store, record_id: int, change: dict[str, Any]) -> None:
        """Rewrite a stored record's content, leaving its stored hash as it was."""
        if isinstance(store, MemoryStore):
            index = next(i for i, r in enumerate(store.records) if r["id"] == record_id)
            store.records[index] = {**store.records[index], **change}
            return
        [record] = [r for r in await store.list_audit(_by_id(record_id)) if r["id"] == record_id]
        body = json.dumps({**record, **change}, ensure_ascii=False, separators=(",", ":"))
        assert await self.execute("UPDATE audit SET body = %s WHERE id = %s", (body, record_id)) == 1

    async def delete_record(self, store: Store, record_id: int) -> None:
        if isinstance(store, MemoryStore):
            store.records[:] = [r for r in store.records if r["id"] != record_id]
            return
        assert await self.execute("DELETE FROM audit WHERE id = %s", (record_id,)) == 1


async def until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll ``predicate`` every 20 ms inside a scenario; ``AssertionError`` after ``timeout`` seconds."""
    for _ in range(int(timeout / 0.02)):
        if predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("timed out")


def _by_id(record_id: int) -> Any:
    from opscore.models import AuditQuery

    return AuditQuery(after_id=record_id - 1, limit=1)


@pytest.fixture(
    params=[
        pytest.param("memory", id="memory"),
        pytest.param("sqlite", id="sqlite"),
        pytest.param("postgres", id="postgres"),
    ]
)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "memory":
        yield Backend("memory", "memory://")
    elif request.param == "sqlite":
        yield Backend("sqlite", f"sqlite:///{tmp_path / 'opscore.db'}")
    else:
        if not PG_URL:
            pytest.skip("PostgreSQL half skipped: OPSCORE_TEST_DATABASE_URL is not set")
        from tests.pg import fresh_schema

        with fresh_schema(PG_URL) as url:
            yield Backend("postgres", url)
