"""listing-seek: ``?at=`` on a long chain and ``/workflows?workflowId=`` among many runs, over HTTP in-process.

    python -m benchmarks.listing_seek [--url sqlite:///tmp/seek.db] [--records 200000] [--runs 20000]
                                      [--reuse] [--repeat 20]

Builds (unless ``--reuse``) one agent with ``--records`` audit records (alternating idle/active,
every 50th change a refused one) and ``--runs`` workflow runs spread over 100 definitions and 50
agents, all through the store's own ``apply_many`` (so whatever the store writes beside the
rows, schema v2's revision column and labels included, is written as in production). Then it
asks the app, in process, for the agent's state and diagram at a moment in the middle of its
chain, and for a page of the runs of one definition, and prints the median of ``--repeat`` calls.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import time
from typing import Any

import httpx

from opscore import audit
from opscore.api import create_app
from opscore.config import Settings
from opscore.models import AuditQuery, Change, Entity
from opscore.storage import Store, open_store

KEY = "bench-key"


def _draft(agent: str, source: str, dest: str, outcome: str) -> dict[str, Any]:
    return audit.draft(
        entity_type="agent",
        entity_id=agent,
        event="begin_task" if dest == "active" else "finish_task",
        source=source,
        dest=dest,
        outcome=outcome,
        reason=None if outcome == "applied" else "illegal_transition",
        actor="key:bench",
        request_id=None,
        details={},
        reported_at=None,
    )


async def build(store: Store, records: int, runs: int) -> None:
    agent = "seek-agent"
    await store.apply(Change("agent", agent, create=Entity("agent", agent, "idle")))
    state, n, chunk = "idle", 0, 2000
    while n < records:
        changes = []
        for _ in range(min(chunk, records - n)):
            n += 1
            dest = "active" if state == "idle" else "idle"
            if n % 50 == 0:
                changes.append(Change("agent", agent, record=_draft(agent, state, "registered", "rejected")))
            else:
                changes.append(Change("agent", agent, state=dest, record=_draft(agent, state, dest, "applied")))
                state = dest
        for result in await store.apply_many(changes):
            if isinstance(result, Exception):
                raise result
    made = 0
    while made < runs:
        changes = []
        for i in range(made, min(made + chunk, runs)):
            wf = "wf-rare" if i % 10_000 == 0 else f"wf-{i % 100}"
            data = {"workflowId": wf, "agentId": f"agent-{i % 50}", "sessionId": f"s-{i:08d}"}
            changes.append(
                Change("workflow", f"s-{i:08d}", create=Entity("workflow", f"s-{i:08d}", "completed", data=data))
            )
        for result in await store.apply_many(changes):
            if isinstance(result, Exception):
                raise result
        made += len(changes)


async def median_ms(client: httpx.AsyncClient, url: str, params: dict[str, Any], repeat: int) -> tuple[float, Any]:
    times, last = [], None
    for _ in range(repeat):
        started = time.perf_counter()
        answer = await client.get(url, params=params)
        times.append((time.perf_counter() - started) * 1000)
        assert answer.status_code == 200, answer.text
        last = answer
    assert last is not None
    return statistics.median(times), last


async def main(url: str, records: int, runs: int, reuse: bool, repeat: int) -> None:
    if not reuse:
        store = open_store(url)
        await store.open()
        started = time.perf_counter()
        await build(store, records, runs)
        await store.close()
        print(f"built {records} records and {runs} runs in {time.perf_counter() - started:.1f} s")
    app = create_app(Settings(database_url=url, api_key=KEY))
    started = time.perf_counter()
    async with app.router.lifespan_context(app):
        print(f"opened (migrations included) in {time.perf_counter() - started:.2f} s")
        logging.getLogger("httpx").setLevel(logging.WARNING)
        store = app.state.engine.store
        chain = await store.list_audit(
            AuditQuery(entity_type="agent", entity_id="seek-agent", descending=True, limit=records // 2)
        )
        middle = chain[-1]["recordedAt"]
        transport = httpx.ASGITransport(app=app)
        headers = {"Authorization": f"Bearer {KEY}"}
        async with httpx.AsyncClient(transport=transport, base_url="http://bench", headers=headers) as client:
            ms, answer = await median_ms(client, "/v1/opscore/agent/seek-agent/state", {"at": middle}, repeat)
            print(f"GET /agent/{{id}}/state?at=<middle>      {ms:9.2f} ms  {answer.json()}")
            ms, _ = await median_ms(client, "/v1/opscore/agent/seek-agent/diagram", {"at": middle}, repeat)
            print(f"GET /agent/{{id}}/diagram?at=<middle>    {ms:9.2f} ms")
            ms, answer = await median_ms(client, "/v1/opscore/workflows", {"workflowId": "wf-7", "limit": 100}, repeat)
            items = answer.json()["items"]
            print(f"GET /workflows?workflowId=wf-7&limit=100 {ms:9.2f} ms  {len(items)} items")
            ms, answer = await median_ms(client, "/v1/opscore/workflows", {"workflowId": "wf-rare"}, repeat)
            print(f"GET /workflows?workflowId=wf-rare        {ms:9.2f} ms  {len(answer.json()['items'])} items")
            ms, answer = await median_ms(client, "/v1/opscore/workflows", {"agentId": "agent-7", "limit": 100}, repeat)
            print(f"GET /workflows?agentId=agent-7&limit=100 {ms:9.2f} ms  {len(answer.json()['items'])} items")
            ms, answer = await median_ms(client, "/v1/opscore/workflows", {"limit": 100}, repeat)
            print(f"GET /workflows?limit=100                 {ms:9.2f} ms  {len(answer.json()['items'])} items")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="sqlite:////tmp/opscore-seek.db")
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--runs", type=int, default=20_000)
    parser.add_argument("--reuse", action="store_true", help="measure an existing database, build nothing")
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    asyncio.run(main(args.url, args.records, args.runs, args.reuse, args.repeat))
