"""Definition validation: every problem listed at once, and the graph rules."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from opscore.errors import InvalidDefinition
from opscore.workflows.definitions import parse, validate
from tests.servers import Server

EXAMPLE = json.loads((Path(__file__).resolve().parents[1] / "examples/two_step_workflow.json").read_text())


def task(task_id: str, nxt: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"taskId": task_id, "name": task_id, "agentCapability": "cap", "nextTaskId": nxt, **extra}


def problems(body: Any) -> list[str]:
    with pytest.raises(InvalidDefinition) as info:
        validate(body, default_timeout=300)
    return list(info.value.extra["problems"])


def test_the_shared_example_is_valid_and_defaults_apply() -> None:
    definition = validate(EXAMPLE, default_timeout=42)
    assert definition.start == "summarise"
    summarise = definition.tasks["summarise"]
    assert (summarise.max_retries, summarise.timeout_seconds, summarise.next_task_id) == (3, 42.0, "review")


@pytest.mark.parametrize(
    ("tasks", "expected"),
    [
        pytest.param([task("a", "b"), task("a")], "duplicate taskId 'a'", id="duplicate"),
        pytest.param([task("a", "zz")], "'zz' is not a taskId", id="dangling-next"),
        pytest.param([task("a", fallbackTaskId="nope")], "'nope' is not a taskId", id="dangling-fallback"),
        pytest.param([task("a"), task("b")], "exactly one start task", id="two-starts"),
        pytest.param([task("a", "b"), task("b", "c"), task("c", "b")], "cycle: b -> c -> b", id="cycle"),
        pytest.param([task("a", "a")], "no start task", id="self-loop"),
        pytest.param([{"taskId": "a", "name": "a"}], "needs agentCapability or agentId", id="no-capability"),
        pytest.param([task("a", maxRetries=-1)], "maxRetries", id="negative-retries"),
        pytest.param([task("a", timeoutSeconds=0)], "timeoutSeconds", id="zero-timeout"),
    ],
)
def test_graph_rules(tasks: list[dict[str, Any]], expected: str) -> None:
    found = problems({"id": "w", "version": "1", "tasks": tasks})
    assert any(expected in p for p in found), found


def test_unreachable_task_is_named() -> None:
    # a -> b, and c -> b: c is a second start; d -> e -> d is unreachable (and a cycle)
    found = problems({"id": "w", "version": "1", "tasks": [task("a", "b"), task("b"), task("d", "e"), task("e", "d")]})
    assert any("unreachable" in p and "'d'" in p for p in found), found
    assert any(p.startswith("cycle") for p in found), found


def test_every_problem_is_listed_at_once() -> None:
    found = problems({"version": "", "tasks": [task("a", "missing", maxRetries="x"), task("a"), "not a task"]})
    joined = " | ".join(found)
    for fragment in ("id: required", "version: required", "maxRetries", "tasks[2]: must be an object"):
        assert fragment in joined, joined
    assert len(found) >= 4


def test_yaml_and_json_parse_to_the_same_definition() -> None:
    text = yaml.safe_dump(EXAMPLE)
    assert parse(text.encode(), "application/yaml") == EXAMPLE
    assert parse(json.dumps(EXAMPLE).encode(), "application/json") == EXAMPLE
    with pytest.raises(InvalidDefinition):
        parse(b"{not json", "application/json")


def test_definitions_over_http(server: Server) -> None:
    with server.client() as client:
        created = client.post("/v1/opscore/workflow-definitions", json=EXAMPLE)
        assert created.status_code == 201, created.text
        again = client.post(
            "/v1/opscore/workflow-definitions",
            content=yaml.safe_dump(EXAMPLE),
            headers={"Content-Type": "application/yaml"},
        )
        assert again.status_code == 200, again.text
        changed = client.post("/v1/opscore/workflow-definitions", json={**EXAMPLE, "name": "another name"})
        assert changed.status_code == 409 and changed.json()["code"] == "definition_exists"
        bad = client.post(
            "/v1/opscore/workflow-definitions",
            json={"id": "bad", "version": "1", "tasks": [task("a", "b"), task("c", "d")]},
        )
        assert bad.status_code == 422 and bad.json()["code"] == "invalid_definition"
        assert len(bad.json()["problems"]) >= 3, bad.json()
        assert client.get(f"/v1/opscore/workflow-definitions/{EXAMPLE['id']}").json() == EXAMPLE
        assert [d["id"] for d in client.get("/v1/opscore/workflow-definitions").json()["items"]] == [EXAMPLE["id"]]
        assert client.get("/v1/opscore/workflow-definitions/nope").status_code == 404
