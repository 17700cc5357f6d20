"""State-report throughput over HTTP with wrk: SQLite (one process) vs PostgreSQL (1..N replicas).

    python -m benchmarks.pg_http --backend postgres --replicas 2 --duration 30 --connections 64

Starts ``opscore serve`` processes on a fresh database (a temporary SQLite file, or a new
schema in ``OPSCORE_BENCH_DATABASE_URL`` / ``OPSCORE_TEST_DATABASE_URL``, dropped at the end),
brings ``--agents`` agents to ``idle``, then runs one ``wrk`` per replica at the same time,
the connections and wrk threads split between them, each wrk on its own agents (``benchmarks/pg_http.lua``:
legal idle/active reports, increasing timestamps). Afterwards it checks that every answer
was 200 and that the audit verifies, and prints one JSON line with the summed throughput and
the mean group commit and read batch during the load (``/metrics``, summed over the replicas).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg
from prometheus_client.parser import text_string_to_metric_families
from psycopg import sql

from tests.servers import Server

LUA = Path(__file__).resolve().parent / "pg_http.lua"


@contextmanager
def database(backend: str) -> Iterator[str]:
    if backend == "sqlite":
        with tempfile.TemporaryDirectory() as tmp:
            yield f"sqlite:///{tmp}/bench.db"
        return
    base = os.environ.get("OPSCORE_BENCH_DATABASE_URL") or os.environ.get("OPSCORE_TEST_DATABASE_URL")
    if not base:
        sys.exit("set OPSCORE_BENCH_DATABASE_URL (or OPSCORE_TEST_DATABASE_URL) to a PostgreSQL URL")
    schema = f"opscore_bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    try:
        yield f"{base}{'&' if '?' in base else '?'}options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(base, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))


async def make_idle(servers: list[Server], agents: list[str], at: str) -> None:
    """Register every agent by a first report (registered -> idle), spread over the replicas."""
    clients = [httpx.AsyncClient(base_url=s.url, headers=s.headers, timeout=60) for s in servers]
    queue: asyncio.Queue[str] = asyncio.Queue()
    for agent in agents:
        queue.put_nowait(agent)

    async def worker(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            agent = queue.get_nowait()
            body = {"agentId": agent, "timestamp": at, "state": "idle", "details": {}}
            answer = await client.post(f"/v1/opscore/agent/{agent}/state", json=body)
            answer.raise_for_status()

    try:
        await asyncio.gather(*(worker(clients[i % len(clients)]) for i in range(16)))
    finally:
        for client in clients:
            await client.aclose()


def batch_counts(servers: list[Server]) -> dict[str, list[float]]:
    """Each kind's [batches, items] summed over the replicas, from ``/metrics``."""
    counts: dict[str, list[float]] = {}
    for server in servers:
        with server.client() as client:
            text = client.get("/metrics").text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name in ("opscore_store_batches_total", "opscore_store_batch_items_total"):
                    row = counts.setdefault(sample.labels["kind"], [0.0, 0.0])
                    row[sample.name == "opscore_store_batch_items_total"] += sample.value
    return counts


def mean_batches(before: dict[str, list[float]], after: dict[str, list[float]]) -> dict[str, float]:
    """The mean batch of each kind during the load (items / batches between the two scrapes)."""
    means = {}
    for kind, (batches, items) in after.items():
        was = before.get(kind, [0.0, 0.0])
        if batches > was[0]:
            means[f"{kind}_batch"] = round((items - was[1]) / (batches - was[0]), 2)
    return means


def run(args: argparse.Namespace) -> dict[str, Any]:
    wrk = shutil.which("wrk")
    if wrk is None:
        sys.exit("wrk is not installed")
    env = {"OPSCORE_PG_POOL_MAX": str(args.pool_max)} if args.pool_max else {}
    with database(args.backend) as url, tempfile.TemporaryDirectory() as logs:
        servers = [
            Server(database_url=url, api_key="bench-key", env=env, log_path=Path(logs) / f"server{i}.log")
            for i in range(args.replicas)
        ]
        try:
            for server in servers:
                server.start()
            per = args.agents // args.replicas
            base = int(time.time())
            # wrk i reports for agents b<i>-0 .. b<i>-(per-1): disjoint per replica and wrk thread.
            names = [f"b{i}-{n}" for i in range(args.replicas) for n in range(per)]
            asyncio.run(make_idle(servers, names, datetime.fromtimestamp(base - 3600, UTC).isoformat()))
            conns = args.connections // args.replicas
            # The load generator's threads are split like its connections: one replica or two,
            # wrk runs the same number of threads on the same two cores.
            threads = max(1, min(args.threads // args.replicas, conns))
            before = batch_counts(servers)
            procs = []
            for i, server in enumerate(servers):
                argv = [wrk, f"-t{threads}", f"-c{conns}", f"-d{args.duration}s", "-s", str(LUA), server.url,
                        "--", "bench-key", f"b{i}-", str(per), str(base), str(threads)]  # fmt: skip
                procs.append(subprocess.Popen(argv, stdout=subprocess.PIPE, text=True))
            results = []
            for proc in procs:
                out, _ = proc.communicate()
                line = next(ln for ln in out.splitlines() if ln.startswith("RESULT "))
                results.append(json.loads(line[len("RESULT ") :]))
            batches = mean_batches(before, batch_counts(servers))
            with servers[0].client() as client:
                verification = client.get("/v1/opscore/audit/verify", timeout=600).json()
        finally:
            for server in servers:
                server.stop()
    requests = sum(r["requests"] for r in results)
    seconds = max(r["duration_us"] for r in results) / 1e6
    return {
        "backend": args.backend,
        "replicas": args.replicas,
        "connections": args.connections,
        "duration_s": round(seconds, 1),
        "requests": requests,
        "rps": round(requests / seconds, 1),
        "non200": sum(r["non200"] for r in results),
        "socket_errors": sum(r["errors"] for r in results),
        "p50_ms": max(r["p50_us"] for r in results) / 1000,
        "p99_ms": max(r["p99_us"] for r in results) / 1000,
        "verify_ok": verification["ok"],
        "records": verification["records"],
        **batches,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=["sqlite", "postgres"], default="postgres")
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--duration", type=int, default=30)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="wrk threads in all, split between the replicas' wrks")
    parser.add_argument("--agents", type=int, default=4096)
    parser.add_argument("--pool-max", type=int, default=0, help="OPSCORE_PG_POOL_MAX for the servers")
    args = parser.parse_args()
    if args.backend == "sqlite" and args.replicas != 1:
        sys.exit("SQLite serves from one process: --replicas 1")
    print(json.dumps(run(args)))


if __name__ == "__main__":
    main()
