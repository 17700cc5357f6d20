"""A COMMIT cut by a failover is looked up once the database is back, not given up at once.

The proxy forwards the COMMIT (PostgreSQL commits), never passes the answer on, cuts the
connection and then refuses every new connection for 2 s, as a database in failover does.
The store must keep asking ``pg_xact_status`` through the outage and answer the truth,
"committed", when it comes back, within ``OUTCOME_WAIT_SECONDS``; a store that gave up at
the first refused connection would answer ``commit_outcome_unknown`` for a committed change.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest

from opscore.storage.postgres import OUTCOME_WAIT_SECONDS, PostgresStore
from tests.conftest import PG_URL
from tests.storage.test_pg_commit_outcome import CuttingProxy, stored_revision, through
from tests.storage.test_pg_pooler import report

pytestmark = pytest.mark.skipif(not PG_URL, reason="PostgreSQL half skipped: OPSCORE_TEST_DATABASE_URL is not set")

OUTAGE_SECONDS = 2.0


class RefusingProxy(CuttingProxy):
    """A :class:`CuttingProxy` that also refuses connections until ``refuse_until``."""

    refuse_until = 0.0
    refused = 0

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        if time.monotonic() < self.refuse_until:
            self.refused += 1
            client_w.close()
            return
        await super()._serve(client_r, client_w)


@pytest.fixture
def pg_url() -> Iterator[str]:
    from tests.pg import fresh_schema

    with fresh_schema(PG_URL) as url:
        yield url


def test_a_commit_cut_by_an_outage_is_found_committed_when_the_database_is_back(pg_url: str) -> None:
    assert OUTAGE_SECONDS * 3 < OUTCOME_WAIT_SECONDS

    async def scenario() -> None:
        parts = urlsplit(pg_url)
        proxy = RefusingProxy(parts.hostname or "127.0.0.1", parts.port or 5432)
        await proxy.start()
        store = PostgresStore(through(pg_url, proxy.port, plain=True), min_size=1, max_size=1, timeout=0.5)
        await store.open()

        async def outage_on_cut() -> None:
            while proxy.cuts == 0:
                await asyncio.sleep(0.005)
            proxy.refuse_until = time.monotonic() + OUTAGE_SECONDS

        try:
            await store.apply(report("outage", "registered", "idle", 0))
            proxy.cut_after = b"COMMIT"
            watcher = asyncio.create_task(outage_on_cut())
            committed = await store.apply(report("outage", "idle", "active", 1))  # committed: must not raise
            await watcher
            assert proxy.cuts == 1 and proxy.refused > 0  # the lookup met the outage, and waited it out
            assert committed.entity.revision == 2
            assert stored_revision(pg_url, "outage") == 2
            again = await store.apply(report("outage", "active", "idle", 2))  # and the pool is back
            assert again.entity.revision == 3
        finally:
            await store.close()
            await proxy.stop()

    asyncio.run(scenario())
