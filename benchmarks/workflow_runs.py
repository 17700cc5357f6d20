"""How many workflow runs per second Ops-Core completes with the stand-in AgentKit playing 50 agents.

    /work/main/.venv/bin/python -m benchmarks.workflow_runs --runs 300 --agents 50

Starts a real ``opscore serve`` (SQLite, synchronous=FULL, in a temporary directory) and a
real ``opscore simulate`` process, publishes the two-step example, starts ``--runs`` runs
from ``--concurrency`` client threads, and waits until every run is ``completed``. A run is
2 dispatches to AgentKit, 6 agent state reports, 8 task/run transitions and their audit
records. Prints one JSON line: runs/s from the first start request to the last completion.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from tests.servers import Server, free_port
from tests.simulator import Simulator

EXAMPLE = json.loads((Path(__file__).resolve().parents[1] / "examples/two_step_workflow.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--agents", type=int, default=50)
    parser.add_argument("--latency", type=float, default=0.05, help="simulated work per task, seconds")
    parser.add_argument("--concurrency", type=int, default=16, help="client threads starting runs")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        server = Server(
            database_url=f"sqlite:///{tmp}/bench.db",
            env={"AGENTKIT_API_URL": f"http://127.0.0.1:{port}", "OPSCORE_LOG_LEVEL": "WARNING"},
            log_path=Path(tmp) / "server.log",
        )
        server.start()
        sim = Simulator(server, agents=args.agents, latency=args.latency, port=port, heartbeat=60)
        try:
            sim.start(timeout=60)
            with server.client() as client:
                client.post("/v1/opscore/workflow-definitions", json=EXAMPLE).raise_for_status()

            def start_one(i: int) -> str:
                with httpx.Client(base_url=server.url, headers=server.headers, timeout=60) as c:
                    answer = c.post(
                        f"/v1/opscore/agent/sim-agent-{i % args.agents}/workflow",
                        json={"workflowDefinitionId": EXAMPLE["id"], "initialPayload": {"n": i}},
                    )
                    answer.raise_for_status()
                    return str(answer.json()["sessionId"])

            began = time.perf_counter()
            with ThreadPoolExecutor(args.concurrency) as pool:
                sessions = list(pool.map(start_one, range(args.runs)))
            started = time.perf_counter() - began
            with server.client() as client:
                deadline = time.monotonic() + 600
                while time.monotonic() < deadline:
                    done = 0
                    cursor = None
                    states: dict[str, int] = {}
                    while True:
                        params: dict[str, str | int] = {"limit": 1000}
                        if cursor:
                            params["cursor"] = cursor
                        page = client.get("/v1/opscore/workflows", params=params).json()
                        for run in page["items"]:
                            states[run["state"]] = states.get(run["state"], 0) + 1
                        cursor = page["nextCursor"]
                        if not cursor:
                            break
                    done = states.get("completed", 0) + states.get("failed", 0)
                    if done >= len(sessions):
                        break
                    time.sleep(0.5)
                elapsed = time.perf_counter() - began
                verify = client.get("/v1/opscore/audit/verify").json()
            print(
                json.dumps(
                    {
                        "runs": args.runs,
                        "agents": args.agents,
                        "latency_s": args.latency,
                        "states": states,
                        "start_requests_s": round(started, 2),
                        "elapsed_s": round(elapsed, 2),
                        "runs_per_s": round(args.runs / elapsed, 1),
                        "audit_ok": verify["ok"],
                        "records": verify["records"],
                    }
                )
            )
        finally:
            sim.stop()
            server.stop()


if __name__ == "__main__":
    main()
