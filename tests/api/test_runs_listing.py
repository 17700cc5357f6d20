"""Workflow runs listed newest first (or oldest) with indexed filters, definitions paged, the run
view's tasks read at once, and a run's task graph: over HTTP, in process, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import re
import xml.etree.ElementTree as ET
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest

from opscore import diagrams
from opscore.api import create_app
from opscore.config import Settings
from opscore.engine import Context
from opscore.workflows.state import TASK, WORKFLOW
from tests.test_diagrams import SVG_NS, needs_dot

KEY = "listing-key"
CTX = Context(actor="key:test")

Scenario = Callable[[Any, httpx.AsyncClient], Awaitable[None]]


def in_app(database_url: str, scenario: Scenario) -> None:
    """Run ``scenario(app, client)`` against an app on ``database_url``, under its lifespan."""

    async def main() -> None:
        app = create_app(Settings(database_url=database_url, api_key=KEY))
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            headers = {"Authorization": f"Bearer {KEY}"}
            async with httpx.AsyncClient(transport=transport, base_url="http://test", headers=headers) as client:
                await scenario(app, client)

    asyncio.run(main())


async def pages(client: httpx.AsyncClient, path: str, **params: Any) -> tuple[list[dict[str, Any]], int]:
    items: list[dict[str, Any]] = []
    cursor, count = None, 0
    while True:
        answer = await client.get(path, params={**params, **({"cursor": cursor} if cursor else {})})
        assert answer.status_code == 200, answer.text
        count += 1
        items += answer.json()["items"]
        cursor = answer.json()["nextCursor"]
        if cursor is None:
            return items, count


def assert_error(answer: httpx.Response, status: int, code: str) -> None:
    assert answer.status_code == status, answer.text
    assert answer.json()["code"] == code and answer.json()["detail"]


def test_runs_are_listed_newest_first_and_filtered_by_index(database_url: str) -> None:
    async def scenario(app: Any, client: httpx.AsyncClient) -> None:
        engine = app.state.engine
        # session ids against creation order: the old listing (by sessionId) would come out reversed
        made = []
        for n in range(12):
            sid = f"s{11 - n:02d}"
            data = {"sessionId": sid, "workflowId": f"wf-{n % 3}", "agentId": f"agent-{n % 2}", "reason": None}
            made.append(await engine.create(WORKFLOW, sid, data, ctx=CTX))
        for sid in ("s11", "s08", "s05"):
            await engine.fire(WORKFLOW, sid, "fail", ctx=CTX, data={"reason": "it broke"})
        await engine.fire(WORKFLOW, "s02", "cancel", ctx=CTX)
        oldest_first = [e.entity_id for e in sorted(made, key=lambda e: (e.created_at, e.entity_id))]
        assert oldest_first == [f"s{11 - n:02d}" for n in range(12)]

        async def sids(**params: Any) -> list[str]:
            answer = await client.get("/v1/opscore/workflows", params=params)
            assert answer.status_code == 200, answer.text
            return [r["sessionId"] for r in answer.json()["items"]]

        assert await sids() == oldest_first[::-1]  # newest first by default
        assert await sids(order="desc") == oldest_first[::-1]
        assert await sids(order="asc") == oldest_first
        assert await sids(workflowId="wf-1") == ["s01", "s04", "s07", "s10"]
        assert await sids(workflowId="wf-1", order="asc") == ["s10", "s07", "s04", "s01"]
        assert await sids(agentId="agent-0", workflowId="wf-0") == ["s05", "s11"]
        assert await sids(state="failed") == ["s05", "s08", "s11"]
        assert await sids(state="failed", agentId="agent-1") == ["s08"]
        assert await sids(state="failed", workflowId="wf-2", agentId="agent-1") == []
        assert await sids(state="failed", workflowId="wf-0", order="asc") == ["s11", "s08", "s05"]
        assert await sids(state="pending", workflowId="wf-2") == ["s00", "s03", "s06", "s09"]
        assert await sids(state="cancelled") == ["s02"]
        assert await sids(workflowId="nope") == [] and await sids(state="nope") == []
        first = (await client.get("/v1/opscore/workflows", params={"limit": 1})).json()["items"][0]
        assert first["sessionId"] == "s00" and first["createdAt"] == made[-1].created_at

        for order, expected in (("desc", oldest_first[::-1]), ("asc", oldest_first)):
            for limit in (1, 5, 12):
                items, count = await pages(client, "/v1/opscore/workflows", order=order, limit=limit)
                assert [r["sessionId"] for r in items] == expected
                assert count == -(-12 // limit)  # a page is fetched with limit + 1: no empty last page
            items, _ = await pages(client, "/v1/opscore/workflows", order=order, limit=2, agentId="agent-1")
            assert [r["sessionId"] for r in items] == [s for s in expected if int(s[1:]) % 2 == 0]
            items, _ = await pages(client, "/v1/opscore/workflows", order=order, limit=1, state="failed")
            assert [r["sessionId"] for r in items] == [s for s in expected if s in ("s11", "s08", "s05")]

        desc_cursor = (await client.get("/v1/opscore/workflows", params={"limit": 2})).json()["nextCursor"]
        assert_error(
            await client.get("/v1/opscore/workflows", params={"cursor": desc_cursor, "order": "asc"}),
            422,
            "invalid_cursor",
        )
        for bad in ("garbage", "eyJwIjoiczAxIiwibyI6ImRlc2MifQ", "eyJwIjpbMSwyXSwibyI6ImRlc2MifQ"):
            assert_error(await client.get("/v1/opscore/workflows", params={"cursor": bad}), 422, "invalid_cursor")
        assert (await client.get("/v1/opscore/workflows", params={"order": "sideways"})).status_code == 422
        assert (await client.get("/v1/opscore/workflows", params={"workflowId": "a\x00b"})).status_code == 422
        assert (await client.get("/v1/opscore/workflows", params={"agentId": "x/y"})).status_code == 422

    in_app(database_url, scenario)


def test_workflow_definitions_are_paged_oldest_first(database_url: str) -> None:
    async def scenario(app: Any, client: httpx.AsyncClient) -> None:
        ids = ["zeta", "alpha", "mid", "beta", "omega"]
        for n, definition_id in enumerate(ids):
            body = {
                "id": definition_id,
                "name": definition_id,
                "version": str(n),
                "tasks": [{"taskId": "t", "agentCapability": "c"}],
            }
            answer = await client.post("/v1/opscore/workflow-definitions", json=body)
            assert answer.status_code == 201, answer.text
        everything = await client.get("/v1/opscore/workflow-definitions")
        assert [d["id"] for d in everything.json()["items"]] == ids and everything.json()["nextCursor"] is None
        for limit in (1, 2, 5):
            items, count = await pages(client, "/v1/opscore/workflow-definitions", limit=limit)
            assert [d["id"] for d in items] == ids and count == -(-5 // limit)
        assert_error(
            await client.get("/v1/opscore/workflow-definitions", params={"cursor": "nope"}), 422, "invalid_cursor"
        )
        assert (await client.get("/v1/opscore/workflow-definitions", params={"limit": 0})).status_code == 422

    in_app(database_url, scenario)


def test_the_run_view_reads_its_tasks_at_once(database_url: str) -> None:
    """``GET /workflows/{id}`` asks the store for all the run's tasks in one ``get_many``."""

    async def scenario(app: Any, client: httpx.AsyncClient) -> None:
        engine = app.state.engine
        task_ids = [f"t{n}" for n in range(6)]
        await engine.create(WORKFLOW, "run", {"sessionId": "run", "taskIds": task_ids}, ctx=CTX)
        for task_id in task_ids[:-1]:  # the last one not created (yet): left out, as before
            await engine.create(TASK, f"run:{task_id}", {"taskId": task_id, "attempt": 1}, ctx=CTX)
        store = engine.store
        calls: list[tuple[str, Any]] = []
        real_get, real_many = store.get, store.get_many

        async def get(entity_type: str, entity_id: str) -> Any:
            calls.append(("get", entity_type))
            return await real_get(entity_type, entity_id)

        async def get_many(entity_type: str, entity_ids: list[str]) -> Any:
            calls.append(("get_many", (entity_type, tuple(entity_ids))))
            return await real_many(entity_type, entity_ids)

        store.get, store.get_many = get, get_many
        try:
            answer = await client.get("/v1/opscore/workflows/run")
        finally:
            store.get, store.get_many = real_get, real_many
        assert answer.status_code == 200, answer.text
        assert [t["taskId"] for t in answer.json()["tasks"]] == task_ids[:-1]
        assert calls == [("get", WORKFLOW), ("get_many", (TASK, tuple(f"run:{t}" for t in task_ids)))]

    in_app(database_url, scenario)


# -- a run's task graph ---------------------------------------------------------------------------

GRAPH = {
    "id": "graph",
    "name": "graph",
    "version": "1",
    "tasks": [
        {"taskId": "fetch", "name": "Fetch", "agentCapability": "nobody-has-it", "maxRetries": 0,
         "nextTaskId": "summarise", "fallbackTaskId": "apologise"},
        {"taskId": "summarise", "name": "Summarise", "agentCapability": "nobody-has-it"},
        {"taskId": "apologise", "agentCapability": "nobody-has-it"},
    ],
}  # fmt: skip

NODE = re.compile(r'^\s*(t\d+)\["(.*)<br/>(.*)"\]:::(\w+)$')


def mermaid_graph(text: str) -> tuple[dict[str, tuple[str, str, str]], set[tuple[str, str, str]], set[str]]:
    """Nodes (by label) as (state line, class, id), edges as (from, to, kind), and the current nodes."""
    nodes, by_id = {}, {}
    for m in filter(None, map(NODE.match, text.splitlines())):
        nodes[m[2]] = (m[3], m[4], m[1])
        by_id[m[1]] = m[2]
    edges = set()
    for line in text.splitlines():
        if m := re.match(r"^\s*(t\d+) (-->|-\. fallback \.->) (t\d+)$", line):
            edges.add((by_id[m[1]], by_id[m[3]], "next" if m[2] == "-->" else "fallback"))
    current = {by_id[m[1]] for m in re.finditer(r"^\s*class (t\d+) current$", text, re.MULTILINE)}
    return nodes, edges, current


def test_a_runs_diagram_shows_its_task_graph(database_url: str) -> None:
    async def scenario(app: Any, client: httpx.AsyncClient) -> None:
        registered = await client.post("/v1/opscore/agents", json={"agentId": "starter", "capabilities": []})
        assert registered.status_code == 201, registered.text
        started = await client.post("/v1/opscore/agent/starter/workflow", json={"workflowDefinition": GRAPH})
        assert started.status_code == 202, started.text
        sid = started.json()["sessionId"]
        engine = app.state.engine
        # no agent has the capability: fetch waits; then it fails at its second attempt
        await engine.fire(TASK, f"{sid}:fetch", "fail", ctx=CTX, data={"attempt": 2})

        async def diagram(**params: Any) -> httpx.Response:
            return await client.get(f"/v1/opscore/workflows/{sid}/diagram", params=params)

        text = (await diagram(view="tasks")).text
        assert text.startswith("---\ntitle: ") and "\nflowchart LR\n" in text
        assert f"workflow run {sid}: graph v1 (running)" in text
        nodes, edges, current = mermaid_graph(text)
        assert nodes == {
            "Fetch (fetch)": ("failed · attempt 2", "failed", "t0"),
            "Summarise (summarise)": ("pending", "pending", "t1"),
            "apologise": ("pending", "pending", "t2"),
        }
        assert edges == {
            ("Fetch (fetch)", "Summarise (summarise)", "next"),
            ("Fetch (fetch)", "apologise", "fallback"),
        }
        assert current == {"Fetch (fetch)"}
        assert re.search(r"^\s*start_\(\(\" \"\)\) --> t0$", text, re.MULTILINE)
        for state, (fill_, stroke_) in diagrams.TASK_STATE_STYLES.items():
            assert f"classDef {state} fill:{fill_},stroke:{stroke_}" in text

        lifecycle = (await diagram()).text
        assert "stateDiagram-v2" in lifecycle and "flowchart" not in lifecycle  # the default is unchanged
        assert (await diagram(view="lifecycle")).text == lifecycle
        assert_error(await diagram(view="tasks", at="2026-01-01T00:00:00Z"), 422, "validation_error")
        assert (await diagram(view="graph")).status_code == 422
        assert_error(await client.get("/v1/opscore/workflows/nope/diagram", params={"view": "tasks"}), 404,
                     "unknown_workflow")  # fmt: skip

    in_app(database_url, scenario)


@needs_dot
def test_a_runs_task_graph_in_svg(database_url: str) -> None:
    async def scenario(app: Any, client: httpx.AsyncClient) -> None:
        await client.post("/v1/opscore/agents", json={"agentId": "starter", "capabilities": []})
        started = await client.post("/v1/opscore/agent/starter/workflow", json={"workflowDefinition": GRAPH})
        sid = started.json()["sessionId"]
        engine = app.state.engine
        await engine.fire(TASK, f"{sid}:apologise", "skip", ctx=CTX)
        answer = await client.get(f"/v1/opscore/workflows/{sid}/diagram", params={"view": "tasks", "format": "svg"})
        assert answer.status_code == 200 and answer.headers["content-type"] == "image/svg+xml", answer.text
        root = ET.fromstring(answer.text)
        nodes, edges = {}, {}
        for g in root.iter(f"{SVG_NS}g"):
            title = g.findtext(f"{SVG_NS}title") or ""
            if g.get("class") == "node":
                nodes[title] = g
            elif g.get("class") == "edge":
                edges[title] = g

        def texts(g: ET.Element) -> list[str]:
            return [t.text or "" for t in g.iter(f"{SVG_NS}text")]

        def painted(g: ET.Element) -> tuple[str, str]:
            shape = next(el for el in g if el.tag in (f"{SVG_NS}path", f"{SVG_NS}polygon"))
            return shape.get("fill", ""), shape.get("stroke", "")

        assert set(nodes) == {"fetch", "summarise", "apologise", "/start"}  # titled by task id
        assert texts(nodes["fetch"]) == ["Fetch (fetch)", "waiting"]
        assert texts(nodes["apologise"]) == ["apologise", "skipped"]
        assert painted(nodes["fetch"]) == diagrams.TASK_STATE_STYLES["waiting"]
        assert painted(nodes["summarise"]) == diagrams.TASK_STATE_STYLES["pending"]
        assert painted(nodes["apologise"]) == diagrams.TASK_STATE_STYLES["skipped"]
        assert set(edges) == {"/start->fetch", "fetch->summarise", "fetch->apologise"}
        dashed = {t for t, g in edges.items() if any(el.get("stroke-dasharray") for el in g)}
        assert dashed == {"fetch->apologise"}
        assert texts(edges["fetch->apologise"]) == ["fallback"] and texts(edges["fetch->summarise"]) == []
        graph_title = next(t.text for t in root.iter(f"{SVG_NS}text"))
        assert graph_title is not None and graph_title.startswith(f"workflow run {sid}: graph v1")

    in_app(database_url, scenario)


@pytest.mark.parametrize("fmt", ["mermaid", pytest.param("svg", marks=needs_dot)])
def test_task_graphs_take_any_task_id_and_name(fmt: str) -> None:
    """Ids and names with quotes, backslashes, markup and '#' are drawn as text, never as syntax."""
    nodes = [
        diagrams.TaskNode('a"b\\', 'say "hi" <b>#1</b>', "running", 3, next_task_id="x y"),
        diagrams.TaskNode("x y", None, "no-such-state"),
    ]
    text = diagrams.task_graph(nodes, fmt, start='a"b\\', current="x y", title='a "title" \\')
    if fmt == "mermaid":
        found, edges, current = mermaid_graph(text)
        label = "say #quot;hi#quot; #lt;b#gt;#35;1#lt;/b#gt; (a#quot;b\\)"
        assert found == {label: ("running · attempt 3", "running", "t0"), "x y": ("no-such-state", "pending", "t1")}
        assert edges == {(label, "x y", "next")} and current == {"x y"}
        assert text.splitlines()[1] == 'title: "a \\"title\\" \\\\"'
    else:
        root = ET.fromstring(text)
        shown = [t.text for t in root.iter(f"{SVG_NS}text")]
        assert 'say "hi" <b>#1</b> (a"b\\)' in shown and "running · attempt 3" in shown and "x y" in shown
