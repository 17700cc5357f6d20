"""Workflow runs end to end over real HTTP: Ops-Core and the stand-in AgentKit as real processes."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.servers import Server, free_port
from tests.simulator import Simulator, wait_for

EXAMPLE = json.loads((Path(__file__).resolve().parents[1] / "examples/two_step_workflow.json").read_text())
TERMINAL = ("completed", "failed", "cancelled")

Env = Callable[..., tuple[Server, Simulator]]


@pytest.fixture
def stack(database_url: str, tmp_path: Path) -> Iterator[Env]:
    """``stack(agents=2, env={...}, ...)``: Ops-Core pointed at a simulator, both started."""
    started: list[Server | Simulator] = []

    def build(*, env: dict[str, str] | None = None, simulator: bool = True, **sim: Any) -> tuple[Server, Simulator]:
        port = free_port()
        server = Server(
            database_url=database_url,
            env={"AGENTKIT_API_URL": f"http://127.0.0.1:{port}", **(env or {})},
            log_path=tmp_path / "server.log",
        )
        server.start()
        started.append(server)
        simulator_ = Simulator(server, port=port, log_path=tmp_path / "simulator.log", **sim)
        if simulator:
            simulator_.start()
            started.append(simulator_)
        return server, simulator_

    yield build
    for process in reversed(started):
        process.stop()


def definition(tasks: list[dict[str, Any]], workflow_id: str = "wf", version: str = "1") -> dict[str, Any]:
    return {"id": workflow_id, "name": workflow_id, "version": version, "tasks": tasks}


def start(client: httpx.Client, body: dict[str, Any], agent: str = "sim-agent-0") -> str:
    answer = client.post(f"/v1/opscore/agent/{agent}/workflow", json=body)
    assert answer.status_code == 202, answer.text
    assert answer.json()["state"] in ("pending", "running")
    return str(answer.json()["sessionId"])


def run_of(client: httpx.Client, session_id: str) -> dict[str, Any]:
    answer = client.get(f"/v1/opscore/workflows/{session_id}")
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


def settled(client: httpx.Client, session_id: str, timeout: float = 60) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        run = run_of(client, session_id)
        return run if run["state"] in TERMINAL else None

    return dict(wait_for(check, timeout, f"run {session_id} to end"))


def tasks_by_id(run: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {t["taskId"]: t for t in run["tasks"]}


def audit(client: httpx.Client, session_id: str) -> list[dict[str, Any]]:
    return list(client.get(f"/v1/opscore/workflows/{session_id}/audit", params={"limit": 1000}).json()["items"])


def events(records: list[dict[str, Any]], entity_suffix: str) -> list[str]:
    return [r["event"] for r in records if r["entityId"].endswith(entity_suffix) and r["outcome"] == "applied"]


def test_two_step_example_end_to_end(stack: Env) -> None:
    server, sim = stack(agents=2)
    with server.client() as client:
        assert client.post("/v1/opscore/workflow-definitions", json=EXAMPLE).status_code == 201
        sid = start(client, {"workflowDefinitionId": EXAMPLE["id"], "initialPayload": {"text": "hello"}})
        run = settled(client, sid)
        assert run["state"] == "completed", run
        tasks = tasks_by_id(run)
        assert [tasks[t]["state"] for t in ("summarise", "review")] == ["succeeded", "succeeded"]
        assert tasks["summarise"]["result"]["parameters"] == {"text": "hello", "max_words": 120}
        assert run["path"] == ["summarise", "review"]

        calls = sim.calls()
        assert [c["body"]["task_name"] for c in calls] == ["summarise", "review"]
        for call, task_id in zip(calls, ("summarise", "review"), strict=True):
            body = call["body"]
            assert body["senderId"] == "opscore" and body["messageType"] == "workflow_task"
            assert body["opscore_session_id"] == sid and body["opscore_task_id"] == f"{sid}:{task_id}"
            assert body["payload"]["task_name"] == task_id
            assert body["payload"]["task_parameters"] == {"text": "hello", **tasks[task_id]["result"]["parameters"]}
        # the triggering agent has both capabilities, so it got both tasks
        assert {c["agentId"] for c in calls} == {"sim-agent-0"}

        records = audit(client, sid)
        assert events(records, sid) == ["start", "complete"]
        assert events(records, ":summarise") == ["dispatch", "begin", "succeed"]
        assert events(records, ":review") == ["dispatch", "begin", "succeed"]
        assert [r["id"] for r in records] == sorted(r["id"] for r in records)
        assert client.get("/v1/opscore/audit/verify").json()["ok"] is True
        listed = client.get("/v1/opscore/workflows", params={"workflowId": EXAMPLE["id"]}).json()["items"]
        assert [r["sessionId"] for r in listed] == [sid]
        assert client.get("/v1/opscore/workflows", params={"state": "running"}).json()["items"] == []


def test_failure_then_retry_then_success(stack: Env) -> None:
    server, sim = stack(agents=1)
    sim.control(scripts={"sim-agent-0": ["error", "ok"]})
    body = {"workflowDefinition": definition([{"taskId": "t", "agentCapability": "summarise_text",
                                               "retryBackoffSeconds": 0.05}])}  # fmt: skip
    with server.client() as client:
        sid = start(client, body)
        run = settled(client, sid)
        assert run["state"] == "completed", run
        task = tasks_by_id(run)["t"]
        assert (task["attempt"], task["failures"]) == (2, 1)
        assert [a["outcome"] for a in task["attempts"]] == ["failed", "succeeded"]
        assert "simulated failure" in task["attempts"][0]["error"]
        assert events(audit(client, sid), ":t") == ["dispatch", "begin", "fail_attempt", "dispatch", "begin", "succeed"]
    assert [c["body"]["payload"]["attempt"] for c in sim.calls()] == [1, 2]


def test_retries_exhausted_fail_the_run(stack: Env) -> None:
    server, sim = stack(agents=1)
    sim.control(scripts={"sim-agent-0": ["error"] * 5})
    tasks = [{"taskId": "t", "agentCapability": "summarise_text", "maxRetries": 2, "retryBackoffSeconds": 0.05}]
    with server.client() as client:
        sid = start(client, {"workflowDefinition": definition(tasks)})
        run = settled(client, sid)
        assert run["state"] == "failed", run
        assert "task 't' failed" in run["reason"]
        assert tasks_by_id(run)["t"]["state"] == "failed"
        assert events(audit(client, sid), sid) == ["start", "fail"]
    assert len(sim.calls()) == 3  # the first attempt and maxRetries retries, never more


def test_a_run_retried_after_failing_completes_without_the_old_reason(stack: Env) -> None:
    """The failure ``reason`` belongs to the failed run: retried and completed, the run carries none."""
    server, sim = stack(agents=1)
    sim.control(scripts={"sim-agent-0": ["error", "ok"]})
    tasks = [{"taskId": "t", "agentCapability": "summarise_text", "maxRetries": 0, "retryBackoffSeconds": 0.05}]
    with server.client() as client:
        sid = start(client, {"workflowDefinition": definition(tasks, "retried")})
        failed = settled(client, sid)
        assert failed["state"] == "failed" and "task 't' failed" in failed["reason"], failed
        retried = client.post(f"/v1/opscore/workflows/{sid}/transitions", json={"trigger": "retry"})
        assert retried.status_code == 200, retried.text
        assert retried.json()["reason"] is None  # running again: no longer failed
        run = settled(client, sid)
        assert run["state"] == "completed" and run["reason"] is None, run
        assert tasks_by_id(run)["t"]["state"] == "succeeded"
        [listed] = client.get("/v1/opscore/workflows", params={"workflowId": "retried"}).json()["items"]
        assert (listed["state"], listed["reason"]) == ("completed", None)
        assert events(audit(client, sid), sid) == ["start", "fail", "retry", "complete"]
    assert len(sim.calls()) == 2


def test_fallback_path(stack: Env) -> None:
    server, sim = stack(agents=1)
    sim.control(scripts={"sim-agent-0": ["error", "ok"]})
    tasks = [
        {"taskId": "a", "agentCapability": "summarise_text", "maxRetries": 0, "nextTaskId": "b", "fallbackTaskId": "c"},
        {"taskId": "b", "agentCapability": "summarise_text"},
        {"taskId": "c", "agentCapability": "summarise_text"},
    ]
    with server.client() as client:
        sid = start(client, {"workflowDefinition": definition(tasks, "fallback")})
        run = settled(client, sid)
        assert run["state"] == "completed", run
        states = {t: v["state"] for t, v in tasks_by_id(run).items()}
        assert states == {"a": "failed", "b": "skipped", "c": "succeeded"}
        assert run["path"] == ["a", "c"]
    assert [c["body"]["task_name"] for c in sim.calls()] == ["a", "c"]


def test_deadline_fails_the_attempt_and_the_retry_succeeds(stack: Env) -> None:
    server, sim = stack(agents=1)
    sim.control(scripts={"sim-agent-0": ["silent", "ok"]})  # AgentKit says 202, the agent never reports
    tasks = [{"taskId": "t", "agentCapability": "summarise_text", "timeoutSeconds": 1, "retryBackoffSeconds": 0.05}]
    with server.client() as client:
        sid = start(client, {"workflowDefinition": definition(tasks)})
        run = settled(client, sid)
        assert run["state"] == "completed", run
        task = tasks_by_id(run)["t"]
        assert "did not complete within" in task["attempts"][0]["error"]
        timed_out = [r for r in audit(client, sid) if r["event"] == "fail_attempt"]
        assert [r["details"]["cause"] for r in timed_out] == ["timeout"]
        assert timed_out[0]["actor"] == "system"


def test_pause_resume_cancel_and_illegal_triggers(stack: Env) -> None:
    server, sim = stack(agents=1, latency=1.0)
    with server.client() as client:
        client.post("/v1/opscore/workflow-definitions", json=EXAMPLE)
        sid = start(client, {"workflowDefinitionId": EXAMPLE["id"]})
        paused = client.post(f"/v1/opscore/workflows/{sid}/transitions", json={"trigger": "pause"})
        assert paused.status_code == 200 and paused.json()["state"] == "paused", paused.text
        # the task already with the agent finishes; the next one is not dispatched while paused
        wait_for(lambda: tasks_by_id(run_of(client, sid))["summarise"]["state"] == "succeeded", 30, "summarise")
        run = run_of(client, sid)
        assert run["state"] == "paused" and tasks_by_id(run)["review"]["state"] == "pending"
        assert len(sim.calls()) == 1
        illegal = client.post(f"/v1/opscore/workflows/{sid}/transitions", json={"trigger": "pause"})
        assert illegal.status_code == 409 and illegal.json()["code"] == "illegal_transition"
        resumed = client.post(f"/v1/opscore/workflows/{sid}/transitions", json={"trigger": "resume"})
        assert resumed.status_code == 200, resumed.text
        assert settled(client, sid)["state"] == "completed"
        for trigger in ("resume", "cancel", "retry"):
            answer = client.post(f"/v1/opscore/workflows/{sid}/transitions", json={"trigger": trigger})
            assert answer.status_code == 409, (trigger, answer.text)
        unknown = client.post(f"/v1/opscore/workflows/{sid}/transitions", json={"trigger": "explode"})
        assert unknown.status_code == 422
        rejected = [r for r in audit(client, sid) if r["outcome"] == "rejected"]
        assert [r["event"] for r in rejected] == ["pause", "resume", "cancel", "retry"]

        second = start(client, {"workflowDefinitionId": EXAMPLE["id"]})
        cancelled = client.post(f"/v1/opscore/workflows/{second}/transitions", json={"trigger": "cancel"})
        assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled", cancelled.text
        assert {t["state"] for t in cancelled.json()["tasks"]} == {"cancelled"}
        again = client.post(f"/v1/opscore/workflows/{second}/transitions", json={"trigger": "cancel"})
        assert again.status_code == 409
        # the agent finishing its (cancelled) task later changes nothing
        wait_for(lambda: sim.opscore_idle() == 1, 30, "the agent to finish")
        assert run_of(client, second)["state"] == "cancelled"
        assert client.post("/v1/opscore/workflows/nope/transitions", json={"trigger": "cancel"}).status_code == 404


def register_agent(client: httpx.Client, agent_id: str, capabilities: list[str], state: str = "idle") -> None:
    assert client.post("/v1/opscore/agents", json={"agentId": agent_id, "capabilities": capabilities}).is_success
    now = datetime.now(UTC).isoformat()
    report = client.post(
        f"/v1/opscore/agent/{agent_id}/state", json={"agentId": agent_id, "timestamp": now, "state": state}
    )
    assert report.status_code == 200, report.text


def test_agentkit_down_retries_then_fails(stack: Env) -> None:
    server, _ = stack(simulator=False)  # AGENTKIT_API_URL points at a port nobody listens on
    tasks = [{"taskId": "t", "agentCapability": "cap", "maxRetries": 2, "retryBackoffSeconds": 0.05}]
    with server.client() as client:
        register_agent(client, "lonely", ["cap"])
        sid = start(client, {"workflowDefinition": definition(tasks)}, agent="lonely")
        run = settled(client, sid)
        assert run["state"] == "failed", run
        task = tasks_by_id(run)["t"]
        assert task["attempt"] == 3 and all("unreachable" in a["error"] for a in task["attempts"])
        task_records = [r for r in audit(client, sid) if r["entityId"] == f"{sid}:t"]
        assert [r["details"].get("cause") for r in task_records if r["event"] in ("fail_attempt", "fail")] == [
            "unreachable"
        ] * 3
        assert [r["event"] for r in task_records] == ["dispatch", "fail_attempt"] * 2 + ["dispatch", "fail"]


def test_kill_9_mid_run_then_completion_without_double_dispatch(stack: Env) -> None:
    server, sim = stack(agents=1, latency=1.5)
    tasks = [
        {"taskId": "one", "agentCapability": "summarise_text", "timeoutSeconds": 3, "nextTaskId": "two",
         "retryBackoffSeconds": 0.05},
        {"taskId": "two", "agentCapability": "summarise_text", "timeoutSeconds": 3, "retryBackoffSeconds": 0.05},
    ]  # fmt: skip
    with server.client() as client:
        sid = start(client, {"workflowDefinition": definition(tasks)})
        wait_for(lambda: len(sim.calls()) >= 1, 30, "the first dispatch")
    server.kill()  # the agent's reports meanwhile hit a dead port and are lost, as with the real SDK
    server.start()
    with server.client() as client:
        run = settled(client, sid)
        assert run["state"] == "completed", run
        assert client.get("/v1/opscore/audit/verify").json()["ok"] is True
    sent = Counter((c["body"]["opscore_task_id"], c["body"]["payload"]["attempt"]) for c in sim.calls())
    assert sent and max(sent.values()) == 1, sent  # no attempt was ever sent twice
    assert {task for task, _ in sent} == {f"{sid}:one", f"{sid}:two"}


def test_task_waits_for_a_capable_idle_agent(stack: Env) -> None:
    server, sim = stack(agents=1, capabilities="summarise_text")
    with server.client() as client:
        client.post("/v1/opscore/workflow-definitions", json=EXAMPLE)
        sid = start(client, {"workflowDefinitionId": EXAMPLE["id"]})
        wait_for(lambda: tasks_by_id(run_of(client, sid))["review"]["state"] == "waiting", 30, "review waiting")
        sim.register("reviewer", ["review_text"])  # AgentKit registers it: report, webhook, idle
        run = settled(client, sid)
        assert run["state"] == "completed", run
        assert tasks_by_id(run)["review"]["agentId"] == "reviewer"
        assert events(audit(client, sid), ":review") == ["wait", "dispatch", "begin", "succeed"]


def test_silent_agent_goes_offline_and_its_task_fails_over(stack: Env) -> None:
    server, sim = stack(agents=1, heartbeat=0.3, env={"OPSCORE_AGENT_TIMEOUT_SECONDS": "2"})
    tasks = [{"taskId": "t", "agentCapability": "summarise_text", "retryBackoffSeconds": 0.05}]
    with server.client() as client:
        sim.register("ghost", ["summarise_text"], simulate=False)  # AgentKit accepts its tasks; it never reports
        register_agent(client, "ghost", ["summarise_text"])
        sid = start(client, {"workflowDefinition": definition(tasks)}, agent="ghost")  # the trigger is preferred
        run = settled(client, sid)
        assert run["state"] == "completed", run
        task = tasks_by_id(run)["t"]
        assert [a["agentId"] for a in task["attempts"]] == ["ghost", "sim-agent-0"]
        assert "offline" in task["attempts"][0]["error"]
        offline = [r for r in client.get("/v1/opscore/agent/ghost/audit").json()["items"] if r["dest"] == "offline"]
        assert [(r["event"], r["actor"]) for r in offline] == [("go_offline", "system")]
        assert client.get("/v1/opscore/agent/sim-agent-0").json()["state"] == "idle"


def test_concurrent_runs_never_give_one_agent_two_tasks(stack: Env) -> None:
    server, sim = stack(agents=3, latency=0.05)
    tasks = [
        {"taskId": "a", "agentCapability": "summarise_text", "timeoutSeconds": 20, "nextTaskId": "b"},
        {"taskId": "b", "agentCapability": "review_text", "timeoutSeconds": 20},
    ]
    with server.client() as client:
        client.post("/v1/opscore/workflow-definitions", json=definition(tasks, "busy")).raise_for_status()
        sessions = [start(client, {"workflowDefinitionId": "busy"}, agent=f"sim-agent-{i % 3}") for i in range(30)]
        runs = [settled(client, sid, timeout=120) for sid in sessions]
        assert {r["state"] for r in runs} == {"completed"}
        # an agent handed a second task while busy would leave one task to its deadline: attempt 2
        assert {t["attempt"] for r in runs for t in r["tasks"]} == {1}
    per_agent = Counter(c["agentId"] for c in sim.calls())
    assert sum(per_agent.values()) == 60


def test_starting_a_run_for_an_unknown_agent_is_404(server: Server) -> None:
    """DESIGN §5: unknown ids answer 404; only a state report registers an unknown agent."""
    inline = definition([{"taskId": "t", "agentCapability": "summarise_text"}], "inline-for-nobody")
    with server.client() as client:
        client.post("/v1/opscore/workflow-definitions", json=EXAMPLE).raise_for_status()
        for body in ({"workflowDefinitionId": EXAMPLE["id"]}, {"workflowDefinition": inline}):
            answer = client.post("/v1/opscore/agent/nobody/workflow", json=body)
            assert answer.status_code == 404, answer.text
            assert answer.json()["code"] == "unknown_agent" and "detail" in answer.json()
        assert client.get("/v1/opscore/workflows").json()["items"] == []
        assert client.get("/v1/opscore/workflow-definitions/inline-for-nobody").status_code == 404
        assert client.get("/v1/opscore/agent/nobody").status_code == 404  # and it was not registered either
