"""Engine fixtures: one Engine per test on each store, run with ``asyncio.run``."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from opscore.engine import Context, Engine
from opscore.storage import open_store
from opscore.storage.base import Store
from opscore.storage.memory import MemoryStore
from opscore.storage.sqlite import SQLiteStore
from tests.conftest import PG_URL

T = TypeVar("T")
Scenario = Callable[[Engine], Awaitable[Any]]
Runner = Callable[[Scenario], Any]

CTX = Context(actor="key:test", request_id="req-test")


def make_store(kind: str, tmp_path: Path) -> Store:
    if kind == "memory":
        return MemoryStore()
    return SQLiteStore(str(tmp_path / f"engine-{id(tmp_path)}.db"))


def run_with(store: Store, scenario: Scenario) -> Any:
    async def main() -> Any:
        await store.open()
        try:
            return await scenario(Engine(store))
        finally:
            await store.close()

    return asyncio.run(main())


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def run_engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Runner]:
    """``run_engine(async_fn)``: ``async_fn(engine)`` on a fresh store of each kind."""
    if request.param != "postgres":
        yield lambda scenario: run_with(make_store(request.param, tmp_path), scenario)
        return
    if not PG_URL:
        pytest.skip("PostgreSQL half skipped: OPSCORE_TEST_DATABASE_URL is not set")
    from tests.pg import fresh_schema

    with fresh_schema(PG_URL) as url:
        yield lambda scenario: run_with(open_store(url), scenario)
