"""pg_costs: what one transition costs on PostgreSQL, the inputs of docs/scaling.md.

    OPSCORE_TEST_DATABASE_URL=postgresql://... python -m benchmarks.pg_costs [--agents N] [--rounds R]

Runs the engine scenario of ``benchmarks/engine.py`` in process on a fresh schema and measures,
over the timed phase only: Ops-Core's Python CPU per transition, the CPU of the PostgreSQL
backends serving this process (``/proc/<pid>/stat`` of the backends whose ``application_name``
is ours: needs the database on this machine; the WAL writer and checkpointer are not counted),
WAL bytes per transition (``pg_current_wal_lsn()`` before and after; the whole cluster's WAL,
so other load on it counts too), the connections the process held, and the bytes the audit
and entity tables (with indexes) grew per record. Prints one ``RESULT {json}`` line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

APP = "opscore-pg-costs"
TICK = os.sysconf("SC_CLK_TCK")


def backend_cpu(conn: psycopg.Connection[Any]) -> tuple[float, int]:
    """Seconds of CPU of our backends so far, and how many there are."""
    pids = [r[0] for r in conn.execute("SELECT pid FROM pg_stat_activity WHERE application_name = %s", (APP,))]
    total = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / TICK
        except OSError:
            pass
    return total, len(pids)


async def run(url: str, agents: int, rounds: int, tasks: int) -> dict[str, Any]:
    from opscore.engine import Context, Engine
    from opscore.models import Entity
    from opscore.storage import open_store

    store = open_store(f"{url}&application_name={APP}")
    await store.open()
    engine = Engine(store)
    ctx = Context(actor="key:bench")
    base = datetime.now(UTC) - timedelta(hours=1)
    ids = [f"e{i}" for i in range(agents)]
    slices = [ids[k::tasks] for k in range(tasks)]

    async def walk(mine: list[str], targets: list[str], first: int) -> None:
        for r, target in enumerate(targets):
            at = base + timedelta(microseconds=first + r)
            for agent in mine:
                await engine.report("agent", agent, target, ctx=ctx, reported_at=at, details={},
                                    create=Entity("agent", agent, "registered"))  # fmt: skip

    await asyncio.gather(*(walk(s, ["idle"], 0) for s in slices))
    side = psycopg.connect(url, autocommit=True)
    size_sql = "SELECT pg_total_relation_size('audit') + pg_total_relation_size('entities')"
    lsn0 = side.execute("SELECT pg_current_wal_lsn()").fetchone()[0]  # type: ignore[index]
    size0 = side.execute(size_sql).fetchone()[0]  # type: ignore[index]
    pg0, _ = backend_cpu(side)
    t0, c0 = time.perf_counter(), time.process_time()
    targets = ["active" if r % 2 == 0 else "idle" for r in range(rounds)]
    await asyncio.gather(*(walk(s, targets, 1) for s in slices))
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    pg1, conns = backend_cpu(side)
    wal = side.execute("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), %s)", (lsn0,)).fetchone()[0]  # type: ignore[index]
    size1 = side.execute(size_sql).fetchone()[0]  # type: ignore[index]
    side.close()
    n = agents * rounds
    result = {
        "transitions": n,
        "per_s": n / elapsed,
        "python_cpu_us_per_transition": 1e6 * cpu / n,
        "postgres_backend_cpu_us_per_transition": 1e6 * (pg1 - pg0) / n,
        "wal_bytes_per_transition": float(wal) / n,
        "table_bytes_per_record": (size1 - size0) / n,
        "connections": conns,
        "mean_batch": store.batched / max(1, store.batches),  # type: ignore[attr-defined]
    }
    await store.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--agents", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--tasks", type=int, default=1000)
    args = parser.parse_args()
    from benchmarks.run import pg_schema

    with pg_schema(os.environ["OPSCORE_TEST_DATABASE_URL"]) as url:
        result = asyncio.run(run(url, args.agents, args.rounds, args.tasks))
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
