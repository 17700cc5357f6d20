"""Three real Ops-Core replicas on one PostgreSQL schema running workflows (issue 5, DESIGN §6).

One stand-in AgentKit serves all three (every replica's ``AGENTKIT_API_URL``), and its
simulated agents send their reports to the replicas in turn; runs are started on the
replicas in turn, from several threads at once. Whatever lands where, each task attempt is
dispatched exactly once (the simulator counts one ``/run`` per (task, attempt)), no agent is
handed a task while it still works on another, every run completes and every chain
verifies, also when one replica is killed with ``kill -9`` while runs are in flight.
"""

from __future__ import annotations

import json
import secrets
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import PG_URL
from tests.servers import Server, free_port
from tests.simulator import Simulator, wait_for
from tests.test_workflows import EXAMPLE, settled, start

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not PG_URL, reason="PostgreSQL half skipped: OPSCORE_TEST_DATABASE_URL is not set"),
]

RUNS = 20
AGENTS = 6


@dataclass
class Deployment:
    servers: list[Server]
    sim: Simulator


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[Deployment]:
    """Three replicas (one API key, one schema) and one simulator reporting to all of them."""
    from tests.pg import fresh_schema

    sim_port = free_port()
    env = {
        "AGENTKIT_API_URL": f"http://127.0.0.1:{sim_port}",
        # a task whose reports died with a killed replica fails over within seconds, not 5 min
        "OPSCORE_TASK_TIMEOUT_SECONDS": "10",
    }
    key = secrets.token_urlsafe(16)
    started: list[Server | Simulator] = []
    with fresh_schema(PG_URL) as url:
        try:
            servers = [
                Server(database_url=url, api_key=key, env=env, log_path=tmp_path / f"replica{i}.log") for i in range(3)
            ]
            for srv in servers:
                started.append(srv.start())
            sim = Simulator(
                servers[0],
                agents=AGENTS,
                latency=0.3,
                heartbeat=2.0,  # resynchronises an agent whose report was lost with a replica
                port=sim_port,
                opscore_urls=[srv.url for srv in servers],
                log_path=tmp_path / "simulator.log",
            )
            started.append(sim.start())
            yield Deployment(servers, sim)
        finally:
            for process in reversed(started):
                process.stop()


def start_runs(servers: list[Server], numbers: range) -> list[str]:
    """Start one run per number, on the replicas in turn, from several threads at once."""

    def one(n: int) -> str:
        with servers[n % len(servers)].client() as client:
            body = {"workflowDefinitionId": EXAMPLE["id"], "initialPayload": {"n": n}}
            return start(client, body, agent=f"sim-agent-{n % AGENTS}")

    with ThreadPoolExecutor(6) as pool:
        return list(pool.map(one, numbers))


def logged(server: Server, entity_type: str, event: str) -> set[str]:
    """Ids of the entities ``server`` committed an applied ``event`` for, read from its JSON log."""
    assert server.log_path is not None
    found = set()
    for line in server.log_path.read_text().splitlines():
        if not line.startswith("{"):
            continue
        entry = json.loads(line)
        if (entry.get("message"), entry.get("entityType"), entry.get("event"), entry.get("outcome")) == (
            "transition",
            entity_type,
            event,
            "applied",
        ):
            found.add(str(entry["entityId"]))
    return found


def assert_each_attempt_dispatched_once(calls: list[dict[str, Any]], runs: list[dict[str, Any]]) -> None:
    sent = Counter((c["body"]["opscore_task_id"], c["body"]["payload"]["attempt"]) for c in calls)
    duplicates = {attempt: n for attempt, n in sent.items() if n > 1}
    assert not duplicates, duplicates
    assert [c for c in calls if c["overlap"]] == []  # no agent got a task while busy with another
    for run in runs:
        assert run["state"] == "completed", run
        for task in run["tasks"]:
            assert task["state"] == "succeeded", task
            numbers = [a["attempt"] for a in task["attempts"]]
            assert numbers == sorted(set(numbers)), task  # attempts only ever count up
            assert (task["taskEntityId"], task["attempt"]) in sent  # the attempt that succeeded was sent


def test_three_replicas_dispatch_each_attempt_of_20_runs_once(deployment: Deployment) -> None:
    servers, sim = deployment.servers, deployment.sim
    with servers[1].client() as client:
        client.post("/v1/opscore/workflow-definitions", json=EXAMPLE).raise_for_status()
    sessions = start_runs(servers, range(RUNS))

    runs = []
    for n, sid in enumerate(sessions):
        with servers[(n + 1) % 3].client() as client:  # read on another replica than it started on
            runs.append(settled(client, sid, timeout=120))
    assert_each_attempt_dispatched_once(sim.calls(), runs)
    assert len(runs) == RUNS and len({r["sessionId"] for r in runs}) == RUNS
    for srv in servers:
        with srv.client() as client:
            verification = client.get("/v1/opscore/audit/verify").json()
            assert verification["ok"] is True, verification["problems"]
            completed = client.get("/v1/opscore/workflows", params={"state": "completed", "limit": 100}).json()
            assert len(completed["items"]) == RUNS


def test_kill_9_of_a_replica_mid_way_the_others_finish_every_run(deployment: Deployment) -> None:
    servers, sim = deployment.servers, deployment.sim
    victim, survivors = servers[0], servers[1:]
    sim.control(latency=1.0)  # more tasks out with the agents when the victim dies
    with survivors[0].client() as client:
        client.post("/v1/opscore/workflow-definitions", json=EXAMPLE).raise_for_status()
    first = start_runs(servers, range(RUNS // 2))  # every one acknowledged (202), a third by the victim
    wait_for(lambda: len(sim.calls()) >= 4, 60, "tasks out with the agents")
    victim.kill()  # timers it leased, dispatches it committed and reports it took die with it
    assert victim.process is not None and victim.process.returncode == -9
    second = start_runs(survivors, range(RUNS // 2, RUNS))

    with survivors[0].client() as client:
        runs = [settled(client, sid, timeout=180) for sid in first + second]
        verification = client.get("/v1/opscore/audit/verify").json()
        assert verification["ok"] is True, verification["problems"]
    assert_each_attempt_dispatched_once(sim.calls(), runs)
    # The victim really had work in hand: runs it started (and tasks it dispatched) that
    # only the survivors could finish. Each replica logs every record it commits (DESIGN §8).
    started_there = logged(victim, "workflow", "start")
    finished_elsewhere = set().union(*(logged(srv, "workflow", "complete") for srv in survivors))
    assert logged(victim, "task", "dispatch")
    assert started_there & finished_elsewhere, (started_there, finished_elsewhere)
