"""audit-query: newest pages at 10k, 100k and 1M records, and full-chain verification speed.

    python -m benchmarks.audit_query [--sizes 10000,100000,1000000] [--agents 1000]

The database is built fast but honestly: properly sealed, hash-chained records (the store's
own ``audit.seal``), inserted with ``executemany`` into a file the store created and then
reopened; entity heads are written too, so verification checks them. Queries go through
the store's public ``list_audit`` (thread hop, SQL, JSON parse of 101 bodies), as the API does.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from opscore import audit, checkpoints
from opscore.models import AuditQuery
from opscore.storage.sqlite import SQLiteStore, connect


def grow(path: str, heads: dict[str, tuple[int, str]], start_id: int, count: int, agents: int) -> int:
    """Append ``count`` sealed records round-robin over ``agents`` agents; the next id."""
    conn = connect(path)
    rows = []
    states = ("idle", "active")
    for n in range(count):
        record_id = start_id + n
        agent = f"q{record_id % agents}"
        seq, prev = heads.get(agent, (0, audit.GENESIS))
        dest = states[seq % 2]
        draft = audit.draft(
            entity_type="agent",
            entity_id=agent,
            event="ready" if dest == "idle" else "begin_task",
            source=states[(seq + 1) % 2] if seq else "registered",
            dest=dest,
            outcome="applied",
            reason=None,
            actor="key:bench",
            request_id=f"{record_id:032x}",
            details={},
            reported_at=None,
        )
        recorded = f"2030-01-01T00:00:00.{record_id % 1_000_000:06d}+00:00"
        record = audit.seal(draft, record_id=record_id, seq=seq + 1, prev_hash=prev, recorded_at=recorded)
        heads[agent] = (seq + 1, record["hash"])
        rows.append((record_id, "agent", agent, seq + 1, "applied", recorded, audit.text_of(record)))
    conn.execute("BEGIN")
    conn.executemany(
        "INSERT INTO audit (id, entity_type, entity_id, seq, outcome, recorded_at, body) VALUES (?,?,?,?,?,?,?)", rows
    )
    conn.executemany(
        "INSERT INTO entities (entity_type, entity_id, state, revision, seq, head_hash, data, created_at, updated_at, "
        "last_seen_at, last_report_at, last_details) VALUES ('agent', ?, ?, ?, ?, ?, '{}', '', '', NULL, NULL, '{}') "
        "ON CONFLICT (entity_type, entity_id) DO UPDATE SET state=excluded.state, revision=excluded.revision, "
        "seq=excluded.seq, head_hash=excluded.head_hash",
        [(a, ("idle", "active")[(s + 1) % 2], s, s, h) for a, (s, h) in heads.items()],
    )
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return start_id + count


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


async def measure(path: str, agents: int, queries: int) -> dict[str, Any]:
    store = SQLiteStore(path)
    await store.open()
    try:
        one, every = [], []
        for _ in range(20):  # warm the reader connections and the page cache
            await store.list_audit(AuditQuery(descending=True, limit=101))
        for _ in range(queries):
            agent = f"q{random.randrange(agents)}"
            t = time.perf_counter()
            page = await store.list_audit(AuditQuery(entity_type="agent", entity_id=agent, descending=True, limit=101))
            one.append((time.perf_counter() - t) * 1000)
            assert page and page[0]["entityId"] == agent
            t = time.perf_counter()
            page = await store.list_audit(AuditQuery(descending=True, limit=101))
            every.append((time.perf_counter() - t) * 1000)
            assert len(page) == 101
        return {
            "agent_page_p50_ms": statistics.median(one),
            "agent_page_p99_ms": pct(one, 99),
            "global_page_p50_ms": statistics.median(every),
            "global_page_p99_ms": pct(every, 99),
        }
    finally:
        await store.close()


async def verify(path: str) -> dict[str, Any]:
    store = SQLiteStore(path, readonly=True)
    await store.open()
    try:
        t = time.perf_counter()
        result = await store.verify(checkpoints.verifier())
        elapsed = time.perf_counter() - t
    finally:
        await store.close()
    assert result.ok, result.problems[:3]
    return {"records": result.records, "seconds": elapsed, "records_per_s": result.records / elapsed}


def run(sizes: list[int], agents: int = 1000, queries: int = 300) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="opscore-audit-"))
    path = str(tmp / "audit.db")

    async def create() -> None:
        store = SQLiteStore(path)
        await store.open()
        await store.close()

    asyncio.run(create())
    heads: dict[str, tuple[int, str]] = {}
    next_id, out = 1, {}
    for size in sorted(sizes):
        t = time.perf_counter()
        next_id = grow(path, heads, next_id, size - (next_id - 1), agents)
        built = time.perf_counter() - t
        out[str(size)] = {**asyncio.run(measure(path, agents, queries)), "build_s": built}
    out["verify"] = asyncio.run(verify(path))
    shutil.rmtree(tmp, ignore_errors=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--agents", type=int, default=1000)
    args = parser.parse_args()
    print(json.dumps(run([int(s) for s in args.sizes.split(",")], args.agents), indent=1))


if __name__ == "__main__":
    main()
