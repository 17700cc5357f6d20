"""Diagram endpoints and ``?at=`` over HTTP, against a real server (and in-process for workflow runs)."""

from __future__ import annotations

import asyncio
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from opscore import cli
from opscore.api import create_app
from opscore.config import Settings
from opscore.engine import Context
from opscore.machines import MACHINES, transition_rows
from tests.servers import Server
from tests.test_diagrams import fill, label, mermaid_classes, mermaid_edges, needs_dot, svg_parts

FORMATS = ["mermaid", pytest.param("svg", marks=needs_dot)]
MEDIA = {"mermaid": "text/vnd.mermaid; charset=utf-8", "svg": "image/svg+xml"}


def report(client: httpx.Client, agent_id: str, state: str) -> dict[str, Any]:
    body = {"agentId": agent_id, "timestamp": datetime.now(UTC).isoformat(), "state": state, "details": {}}
    answer = client.post(f"/v1/opscore/agent/{agent_id}/state", json=body)
    assert answer.status_code in (200, 409), answer.text
    return dict(answer.json())


def assert_error(answer: httpx.Response, status: int, code: str) -> None:
    assert answer.status_code == status, answer.text
    body = answer.json()
    assert body["code"] == code and isinstance(body["detail"], str) and body["detail"]


def just_before(moment: str) -> str:
    return (datetime.fromisoformat(moment) - timedelta(microseconds=1)).isoformat()


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_machine_diagram_in_every_format(server: Server, fmt: str) -> None:
    with server.client() as client:
        for name, decl in MACHINES.items():
            answer = client.get(f"/v1/opscore/machines/{name}/diagram", params={"format": fmt})
            assert answer.status_code == 200, answer.text
            assert answer.headers["content-type"] == MEDIA[fmt]
            if fmt == "mermaid":
                drawn = {(s, d, t) for (s, d), t in mermaid_edges(answer.text).items()}
                assert set(re.findall(r'^\s*state "(\w+)"', answer.text, re.MULTILINE)) == set(decl["states"])
            else:
                nodes, edges = svg_parts(answer.text)
                drawn = {(s, d, label(g)) for (s, d), g in edges.items() if s != "__initial__"}
                assert set(decl["states"]) <= set(nodes)
            assert drawn == {(r["source"], r["dest"], r["trigger"]) for r in transition_rows(decl)}


def test_diagram_errors_answer_the_one_shape(server: Server) -> None:
    with server.client() as client:
        assert_error(client.get("/v1/opscore/machines/nope/diagram"), 404, "unknown_machine")
        assert_error(client.get("/v1/opscore/agent/ghost/diagram"), 404, "unknown_agent")
        assert_error(
            client.get("/v1/opscore/agent/ghost/state", params={"at": "2026-01-01T00:00:00Z"}), 404, "unknown_agent"
        )
        assert_error(client.get("/v1/opscore/workflows/no-such-run/diagram"), 404, "unknown_workflow")
        assert_error(client.get("/v1/opscore/workflows/no-such-run/tasks/t1/diagram"), 404, "unknown_task")
        assert_error(
            client.get("/v1/opscore/machines/agent/diagram", params={"format": "png"}), 422, "validation_error"
        )
        report(client, "a1", "idle")
        assert_error(client.get("/v1/opscore/agent/a1/diagram", params={"last": -1}), 422, "validation_error")
        assert_error(client.get("/v1/opscore/agent/a1/diagram", params={"at": "soon"}), 422, "invalid_time")
    answer = server.anonymous().get("/v1/opscore/machines/agent/diagram")
    assert_error(answer, 401, "unauthorized")
    assert answer.headers["www-authenticate"] == "Bearer"
    assert_error(server.anonymous().get("/v1/opscore/agent/a1/diagram"), 401, "unauthorized")


def test_highlight_and_path_follow_the_agent(server: Server) -> None:
    with server.client() as client:
        url = "/v1/opscore/agent/a7/diagram"
        report(client, "a7", "idle")
        text = client.get(url).text
        assert mermaid_classes(text)["idle"] == "active"
        assert mermaid_edges(text)[("registered", "idle")] == "ready #1"

        report(client, "a7", "active")
        assert report(client, "a7", "error")["state"] == "error"
        assert report(client, "a7", "active")["code"] == "illegal_transition"  # refused: not on the path
        report(client, "a7", "idle")
        report(client, "a7", "active")
        text = client.get(url).text
        classes, edges = mermaid_classes(text), mermaid_edges(text)
        assert classes["active"] == "active"
        assert classes["idle"] == classes["registered"] == classes["error"] == "previous"
        assert classes["offline"] == "default"
        assert edges[("registered", "idle")] == "ready #1"
        assert edges[("idle", "active")] == "begin_task #2 #5"
        assert edges[("active", "error")] == "fail #3"
        assert edges[("error", "idle")] == "recover #4"
        assert ("error", "active") not in edges

        recent = client.get(url, params={"last": 2}).text
        assert mermaid_edges(recent)[("error", "idle")] == "recover #1"
        assert mermaid_edges(recent)[("idle", "active")] == "begin_task #2"
        assert mermaid_edges(recent)[("registered", "idle")] == "ready"

        bare = client.get(url, params={"last": 0}).text
        assert not any("#" in label for label in mermaid_edges(bare).values())
        assert "note" not in bare and mermaid_classes(bare)["active"] == "active"


@needs_dot
def test_svg_highlight_follows_the_agent(server: Server) -> None:
    with server.client() as client:
        report(client, "s1", "idle")
        first = client.get("/v1/opscore/agent/s1/diagram", params={"format": "svg"})
        assert first.headers["content-type"] == "image/svg+xml"
        report(client, "s1", "active")
        second = client.get("/v1/opscore/agent/s1/diagram", params={"format": "svg"})
    fills, labels = {}, {}
    for name, answer in (("first", first), ("second", second)):
        nodes, edges = svg_parts(answer.text)
        fills[name] = {state: fill(g) for state, g in nodes.items()}
        labels[name] = {pair: label(g) for pair, g in edges.items()}
    assert fills["first"]["idle"] == fills["second"]["active"] == "#ffd9cc"
    assert fills["first"]["active"] == "white"
    assert fills["second"]["idle"] == "#dbe9ff"
    assert labels["second"][("idle", "active")] == "begin_task #2"
    assert labels["first"][("idle", "active")] == "begin_task"


def test_at_before_between_and_after_the_records(server: Server) -> None:
    with server.client() as client:
        registered = client.post("/v1/opscore/agents", json={"agentId": "h1", "agentName": "history"})
        assert registered.status_code == 201, registered.text
        created = registered.json()["registeredAt"]
        report(client, "h1", "idle")
        report(client, "h1", "active")
        assert report(client, "h1", "registered")["code"] == "illegal_transition"
        report(client, "h1", "idle")
        records = client.get("/v1/opscore/agent/h1/audit").json()["items"]
        assert [(r["seq"], r["outcome"], r["dest"]) for r in records] == [
            (1, "applied", "idle"),
            (2, "applied", "active"),
            (3, "rejected", "registered"),
            (4, "applied", "idle"),
        ]

        def state_at(moment: str) -> dict[str, Any]:
            answer = client.get("/v1/opscore/agent/h1/state", params={"at": moment})
            assert answer.status_code == 200, answer.text
            return dict(answer.json())

        def diagram_at(moment: str) -> str:
            answer = client.get("/v1/opscore/agent/h1/diagram", params={"at": moment})
            assert answer.status_code == 200, answer.text
            return answer.text

        # before it existed: no state to invent
        assert_error(
            client.get("/v1/opscore/agent/h1/state", params={"at": just_before(created)}), 404, "not_yet_created"
        )
        assert_error(
            client.get("/v1/opscore/agent/h1/diagram", params={"at": just_before(created)}), 404, "not_yet_created"
        )

        # registered, before the first record
        before = state_at(just_before(records[0]["recordedAt"]))
        assert (before["state"], before["revision"], before["seq"], before["asOfRecordId"]) == (
            "registered",
            0,
            0,
            None,
        )
        text = diagram_at(just_before(records[0]["recordedAt"]))
        assert mermaid_classes(text)["registered"] == "active"
        assert "note" not in text

        # exactly at the first record (inclusive), and between the second and the refusal
        at_first = state_at(records[0]["recordedAt"])
        assert (at_first["state"], at_first["revision"], at_first["seq"]) == ("idle", 1, 1)
        assert at_first["asOfRecordId"] == records[0]["id"] and at_first["previousState"] == "registered"
        between = state_at(just_before(records[2]["recordedAt"]))
        assert (between["state"], between["revision"], between["seq"]) == ("active", 2, 2)
        assert between["since"] == records[1]["recordedAt"]
        text = diagram_at(just_before(records[2]["recordedAt"]))
        assert mermaid_classes(text)["active"] == "active"
        assert mermaid_edges(text)[("idle", "active")] == "begin_task #2"
        assert mermaid_edges(text)[("active", "idle")] == "finish_task"

        # the refusal counts in seq, not in revision or state
        refused = state_at(records[2]["recordedAt"])
        assert (refused["state"], refused["revision"], refused["seq"]) == ("active", 2, 3)

        # after the last record: the same as now
        later = state_at((datetime.now(UTC) + timedelta(days=1)).isoformat())
        current = client.get("/v1/opscore/agent/h1/state").json()
        assert (later["state"], later["revision"]) == (current["state"], current["revision"]) == ("idle", 3)
        assert later["seq"] == 4 and later["asOfRecordId"] == records[3]["id"]
        assert "at" not in current  # without ?at= the contract shape is unchanged
        assert mermaid_edges(diagram_at(later["at"]))[("active", "idle")] == "finish_task #3"


def test_cli_draws_an_agent_from_a_running_server(
    process_server: Server, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    server = process_server
    with server.client() as client:
        report(client, "c1", "idle")
    monkeypatch.setenv("OPSCORE_API_URL", server.url)
    monkeypatch.setenv("OPSCORE_API_KEY", server.api_key)
    assert cli.main(["diagram", "--agent", "c1", "--last", "1"]) == 0
    out = capsys.readouterr().out
    assert mermaid_classes(out)["idle"] == "active" and mermaid_edges(out)[("registered", "idle")] == "ready #1"
    assert cli.main(["diagram", "--agent", "c1", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "agent-c1.mmd").read_text(encoding="utf-8") == out
    assert cli.main(["diagram", "--agent", "nobody"]) == 1
    assert "unknown_agent" in capsys.readouterr().err


def test_workflow_and_task_diagrams_follow_the_run(tmp_path: Path) -> None:
    """Workflow runs are ``workflow`` entities keyed by sessionId; tasks ``task`` ``<sessionId>:<taskId>``."""

    async def scenario() -> dict[str, str]:
        app = create_app(Settings(database_url=f"sqlite:///{tmp_path / 'wf.db'}", api_key="secret-key"))
        async with app.router.lifespan_context(app):
            engine = app.state.engine
            ctx = Context(actor="test")
            await engine.upsert("workflow", "run-1", {}, ctx=ctx)
            await engine.fire("workflow", "run-1", "start", ctx=ctx)
            await engine.fire("workflow", "run-1", "pause", ctx=ctx)
            await engine.upsert("task", "run-1:t1", {}, ctx=ctx)
            await engine.fire("task", "run-1:t1", "dispatch", ctx=ctx)
            transport = httpx.ASGITransport(app=app)
            headers = {"Authorization": "Bearer secret-key"}
            async with httpx.AsyncClient(transport=transport, base_url="http://test", headers=headers) as client:
                run = await client.get("/v1/opscore/workflows/run-1/diagram")
                task = await client.get("/v1/opscore/workflows/run-1/tasks/t1/diagram")
                assert run.status_code == task.status_code == 200, (run.text, task.text)
                return {"run": run.text, "task": task.text}

    texts = asyncio.run(scenario())
    assert mermaid_classes(texts["run"])["paused"] == "active"
    assert mermaid_classes(texts["run"])["running"] == "previous"
    assert mermaid_edges(texts["run"])[("pending", "running")] == "start #1"
    assert mermaid_edges(texts["run"])[("running", "paused")] == "pause #2"
    assert mermaid_classes(texts["task"])["dispatched"] == "active"
    assert mermaid_edges(texts["task"])[("pending", "dispatched")] == "dispatch #1"


def test_svg_without_dot_answers_501_with_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    """In process, so that the dot lookup can be replaced; the real servers above draw real SVG."""
    from opscore import diagrams

    monkeypatch.setattr(diagrams, "find_dot", lambda: None)

    async def ask() -> tuple[httpx.Response, httpx.Response]:
        app = create_app(Settings(database_url="memory://", api_key="secret-key"))
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            headers = {"Authorization": "Bearer secret-key"}
            async with httpx.AsyncClient(transport=transport, base_url="http://test", headers=headers) as client:
                svg = await client.get("/v1/opscore/machines/agent/diagram", params={"format": "svg"})
                text = await client.get("/v1/opscore/machines/agent/diagram")
                return svg, text

    svg, text = asyncio.run(ask())
    assert_error(svg, 501, "renderer_missing")
    assert "graphviz" in svg.json()["detail"]
    assert text.status_code == 200 and text.text.startswith("---\ntitle:")
